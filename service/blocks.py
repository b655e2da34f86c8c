"""Decoder blocks: score how much each run of blocks changes the hidden state, pick the
most redundant ones, and cut them out of a model.

    scores = score_blocks(model, batches)              # one pass over calibration batches
    removed = choose_blocks(scores, blocks=6, metric="angular")
    drop_blocks(model, removed)                        # model and config now have L-6 blocks

Hidden states are taken with forward hooks on the decoder layers: ``h_0`` is the input of
block 0 (the embeddings) and ``h_i`` the output of block ``i-1``, all *before* the final
norm. ``output_hidden_states=True`` would not do: transformers overwrites its last entry
with ``last_hidden_state``, which is after the final norm (``capture_outputs(...,
tie_last_hidden_states=True)`` in ``transformers/utils/output_capturing.py``) — the bug
PruneMe has. ``tests/test_prune.py`` checks both facts against the installed version.

Metrics:

- angular (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers",
  eq. 7): ``d(h_l, h_{l+n}) = arccos(cos(h_l, h_{l+n})) / pi`` at the last token of
  each sample, averaged over samples; drop the ``n`` contiguous blocks
  ``[l*, l*+n)`` with the smallest distance. The position read is the batch's
  ``read_index`` (``service/calibration.py``: the last *content* token, never a template
  token), else the last real token.
- bi (Men et al. 2024, ShortGPT, eq. 1): ``BI_i = 1 - E_t cos(h_i, h_{i+1})`` over every
  real token (padding masked, unlike ShortGPT's code); drop the ``n`` lowest-BI blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from service.errors import ModelError, SpecError

# Per-layer lists in configs that must lose the same entries as the layers. Gemma-3
# configs whose ``layer_types`` was not cut failed to load after depth pruning.
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")
# Lists of layer *indices* (Qwen-MoE's dense layers): kept ones are renumbered.
LAYER_INDEX_KEYS = ("mlp_only_layers",)
# Layer-count thresholds (Qwen2/3: layers from max_window_layers on use the sliding window
# when use_sliding_window is set): the count of kept layers below the old threshold.
LAYER_THRESHOLD_KEYS = ("max_window_layers",)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks of a causal LM (``model.model.layers`` for Llama)."""
    cfg = model.config.get_text_config()
    n = cfg.num_hidden_layers
    base = getattr(model, "base_model", model)
    for owner in (base, getattr(base, "language_model", None)):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) == n:
            return layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ModelError(f"cannot find the {n} decoder layers of {type(model).__name__}")


@dataclass
class BlockScores:
    """Sums gathered over calibration samples; the metrics are derived from them.

    ``angular_sum[i, j]`` sums over samples the angular distance between ``h_i`` and
    ``h_j`` at the last real token; ``cos_sum[i]`` sums ``cos(h_i, h_{i+1})`` over every
    real token. Both in float64.
    """

    num_layers: int
    samples: int
    tokens: int
    angular_sum: torch.Tensor  # (L+1, L+1)
    cos_sum: torch.Tensor  # (L,)
    # How the rows were presented and which tokens were read (service/calibration.py).
    read: dict = field(default_factory=dict)

    def angular(self, n: int) -> list[float]:
        """Mean distance from ``h_l`` to ``h_{l+n}`` for every start ``l`` in 0..L-n."""
        if not 1 <= n <= self.num_layers:
            raise ValueError(f"block size {n} outside 1..{self.num_layers}")
        d = torch.diagonal(self.angular_sum, offset=n) / max(self.samples, 1)
        return d.tolist()

    def distances(self, sizes: Iterable[int]) -> dict[str, list[float]]:
        return {str(n): self.angular(n) for n in sorted(set(sizes))}

    def block_influence(self) -> list[float]:
        """ShortGPT's BI of every block: 1 - mean cosine of its input and output."""
        return (1.0 - self.cos_sum / max(self.tokens, 1)).tolist()


class _Collector:
    """Forward hooks that reduce each block's output on the fly (two states in memory)."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.mask: torch.Tensor | None = None  # (B, T) bool, set per batch
        self.last_idx: torch.Tensor | None = None  # (B,) last real position
        self.prev: torch.Tensor | None = None
        self.last_states: list[torch.Tensor] = []
        self.cos_sum = torch.zeros(num_layers, dtype=torch.float64)

    def start(self, mask: torch.Tensor, read_index: torch.Tensor | None = None) -> None:
        self.mask = mask.bool()
        self.last_idx = read_index if read_index is not None else mask.long().sum(-1) - 1
        self.prev = None
        self.last_states = []

    def take(self, h: torch.Tensor) -> None:
        if isinstance(h, tuple):  # older layers return (hidden_states, ...)
            h = h[0]
        h = h.detach().to(torch.float64)
        rows = torch.arange(h.shape[0], device=h.device)
        self.last_states.append(h[rows, self.last_idx].cpu())
        if self.prev is not None:
            i = len(self.last_states) - 2
            cos = nn.functional.cosine_similarity(self.prev, h, dim=-1)  # (B, T)
            self.cos_sum[i] += cos.clamp(-1.0, 1.0)[self.mask].sum().cpu()
        self.prev = h

    def pre_hook(self, module, args, kwargs):
        self.take(args[0] if args else kwargs["hidden_states"])

    def post_hook(self, module, args, kwargs, output):
        self.take(output)


def score_blocks(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    on_batch: Callable[[int], None] | None = None,
) -> BlockScores:
    """Run the calibration batches (``input_ids``, ``attention_mask``, optional
    ``read_index``; right-padded) once and gather both metrics. ``on_batch(rows)`` is called after each batch (progress,
    cancellation)."""
    layers = decoder_layers(model)
    L = len(layers)
    col = _Collector(L)
    angular_sum = torch.zeros(L + 1, L + 1, dtype=torch.float64)
    samples = tokens = 0
    handles = [layers[0].register_forward_pre_hook(col.pre_hook, with_kwargs=True)]
    handles += [layer.register_forward_hook(col.post_hook, with_kwargs=True) for layer in layers]
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for batch in batches:
                ids = batch["input_ids"].to(device)
                mask = batch["attention_mask"].to(device)
                read = batch.get("read_index")
                col.start(mask, read.to(device) if read is not None else None)
                # The base model skips the LM head: its logits are not needed.
                model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
                if len(col.last_states) != L + 1:
                    raise ModelError(f"hooks saw {len(col.last_states)} states, expected {L + 1}")
                states = nn.functional.normalize(torch.stack(col.last_states, dim=1), dim=-1)
                cos = (states @ states.transpose(1, 2)).clamp(-1.0, 1.0)  # (B, L+1, L+1)
                angular_sum += (torch.arccos(cos) / math.pi).sum(0)
                samples += ids.shape[0]
                tokens += int(mask.sum())
                col.prev = None
                if on_batch is not None:
                    on_batch(ids.shape[0])
    finally:
        for h in handles:
            h.remove()
    return BlockScores(L, samples, tokens, angular_sum, col.cos_sum.clone())


def choose_blocks(scores: BlockScores, blocks: int, metric: str = "angular") -> list[int]:
    """0-based indices of the blocks to remove, ascending."""
    L = scores.num_layers
    if not 1 <= blocks < L:
        raise SpecError(
            f"cannot remove {blocks} of {L} blocks: a model needs at least one block left "
            f"(choose --blocks between 1 and {L - 1})"
        )
    if metric == "angular":
        d = scores.angular(blocks)
        start = min(range(len(d)), key=lambda i: (d[i], i))  # ties: the shallower run
        return list(range(start, start + blocks))
    if metric == "bi":
        bi = scores.block_influence()
        return sorted(sorted(range(L), key=lambda i: (bi[i], i))[:blocks])
    raise SpecError(f"unknown metric {metric!r}: expected angular or bi")


def drop_blocks(model: nn.Module, indices: Iterable[int]) -> nn.Module:
    """Remove decoder blocks in place and fix the config so the model saves, loads and
    generates: ``num_hidden_layers``, per-layer lists (``layer_types``), and every
    ``layer_idx`` renumbered 0..n-1 (the KV cache is indexed by it)."""
    layers = decoder_layers(model)
    L = len(layers)
    drop = set(indices)
    if not drop or not drop <= set(range(L)) or len(drop) >= L:
        raise SpecError(f"cannot drop blocks {sorted(drop)} from a model of {L} blocks")
    keep = [i for i in range(L) if i not in drop]
    kept = [layers[i] for i in keep]
    for new, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    # Replace the list's contents in place so the parent keeps the same attribute.
    for i in range(L - 1, -1, -1):
        del layers[i]
    layers.extend(kept)
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(cfg, "num_hidden_layers", None) != L:
            continue
        cut_layer_config(cfg, keep)
    return model


def cut_layer_config(cfg, keep: list[int]) -> None:
    """Make a config of ``L`` layers describe the kept ones (old 0-based indices, in
    order): per-layer lists lose the dropped entries, index lists are renumbered,
    thresholds become counts of kept layers, and a periodic pattern that a cut would shift
    is written out per layer."""
    L = cfg.num_hidden_layers
    new_index = {old: new for new, old in enumerate(keep)}
    step = getattr(cfg, "decoder_sparse_step", None)
    if isinstance(step, int) and step > 1:
        # Qwen-MoE: layer i is sparse when (i + 1) % step == 0 and i is not listed dense.
        # The modulus would shift with the indices; every kept layer's kind is kept by
        # listing the dense ones instead (transformers and vLLM read both fields).
        dense = set(getattr(cfg, "mlp_only_layers", None) or [])
        dense |= {i for i in range(L) if (i + 1) % step != 0}
        cfg.mlp_only_layers = sorted(dense)
        cfg.decoder_sparse_step = 1
    for key in PER_LAYER_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, list | tuple) and len(value) == L:
            setattr(cfg, key, [value[i] for i in keep])
    for key in LAYER_INDEX_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, list | tuple):
            setattr(cfg, key, [new_index[i] for i in value if i in new_index])
    for key in LAYER_THRESHOLD_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, int) and 0 <= value < L:
            setattr(cfg, key, sum(1 for i in keep if i < value))
    cfg.num_hidden_layers = len(keep)
