"""Size and forward FLOPs per token of a decoder-only (Llama-family) model, from its
config alone, before and after pruning.

    python -m service.flops                          # Llama-3.1-8B 32 -> 26 blocks (paper check)
    python -m service.flops runs/demo/pruned 30      # a pruned model dir, original depth 30

How the FLOPs are counted (forward pass, one new token that attends to ``context``
positions; a multiply-add is 2 FLOPs):

- every linear layer: 2 x its weight count: q, k, v, o with grouped-query shapes
  (q and o are hidden x heads*head_dim, k and v hidden x kv_heads*head_dim), and the
  MLP's gate, up and down (hidden x intermediate each);
- attention: scores q.k over ``context`` keys and the weighted sum of ``context``
  values, 2 x 2 x context x heads*head_dim per layer (Kaplan et al. 2020, Table 1);
- the LM head: 2 x hidden x vocab;
- the embedding is a lookup: 0 FLOPs. Norms, activations, softmax, rotary and biases
  are elementwise and left out (well under 1% at these sizes).

The paper (Thangarasa et al. 2025) reports 8.03B -> 6.72B parameters and "16.3% fewer
FLOPs" for 6 of 32 blocks of Llama-3.1-8B: 16.3% is exactly the parameter saving, i.e.
the 2 x parameters rule that charges the embedding table like a matmul. Counting the
embedding as a lookup (as here) the saving is larger (17.5% at context 1024), because the cut
blocks are a bigger share of the real compute. ``compare`` reports both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# The paper's model (meta-llama/Llama-3.1-8B-Instruct config.json), written out so the
# sanity check needs no download.
LLAMA31_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}

# Context length the per-token attention cost is stated at (the builtin model's
# calibration/training rows are a few hundred tokens; 1024 covers a long chat turn).
DEFAULT_CONTEXT = 1024


def _shape(cfg: Any) -> dict:
    """The numbers that set size and compute, from a config dict or a PretrainedConfig."""
    if not isinstance(cfg, dict):
        cfg = cfg.to_dict()
    cfg = cfg.get("text_config") or cfg
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    # Qwen2 puts biases on q, k, v without an attention_bias field.
    qkv_bias = bool(cfg.get("attention_bias", False)) or cfg.get("model_type") == "qwen2"
    return {
        "hidden": hidden,
        "intermediate": cfg["intermediate_size"],
        "layers": cfg["num_hidden_layers"],
        "heads": heads,
        "kv_heads": cfg.get("num_key_value_heads") or heads,
        "head_dim": head_dim,
        "vocab": cfg["vocab_size"],
        # transformers' PretrainedConfig default is tied (True) when the key is absent.
        "tied": bool(cfg.get("tie_word_embeddings", True)),
        "qkv_bias": qkv_bias,
        "o_bias": bool(cfg.get("attention_bias", False)),
        "mlp_bias": bool(cfg.get("mlp_bias", False)),
    }


def layer_linear_weights(s: dict) -> int:
    """Weights of one block's matmuls (q, k, v, o, gate, up, down)."""
    q = s["heads"] * s["head_dim"]
    kv = s["kv_heads"] * s["head_dim"]
    h = s["hidden"]
    return h * q + 2 * h * kv + q * h + 3 * h * s["intermediate"]


def layer_params(s: dict) -> int:
    """All parameters of one block: matmul weights, biases, two RMSNorm weights."""
    q = s["heads"] * s["head_dim"]
    kv = s["kv_heads"] * s["head_dim"]
    biases = (q + 2 * kv if s["qkv_bias"] else 0) + (s["hidden"] if s["o_bias"] else 0)
    biases += 2 * s["intermediate"] + s["hidden"] if s["mlp_bias"] else 0
    return layer_linear_weights(s) + biases + 2 * s["hidden"]


def count_params(cfg: Any) -> dict:
    """Parameter counts: total (a tied LM head counted once), embedding, non-embedding."""
    s = _shape(cfg)
    embedding = s["vocab"] * s["hidden"]
    head = 0 if s["tied"] else embedding
    blocks = s["layers"] * layer_params(s)
    final_norm = s["hidden"]
    total = embedding + head + blocks + final_norm
    return {
        "total": total,
        "embedding": embedding,
        "lm_head": head,
        "blocks": blocks,
        "per_block": layer_params(s),
        "non_embedding": total - embedding,
    }


def forward_flops_per_token(cfg: Any, context: int = DEFAULT_CONTEXT) -> dict:
    """Forward FLOPs for one token attending to ``context`` positions (see module doc)."""
    s = _shape(cfg)
    linear = 2 * layer_linear_weights(s)
    attention = 2 * 2 * context * s["heads"] * s["head_dim"]
    head = 2 * s["hidden"] * s["vocab"]
    per_block = linear + attention
    return {
        "total": s["layers"] * per_block + head,
        "per_block": per_block,
        "per_block_linear": linear,
        "per_block_attention": attention,
        "lm_head": head,
        "context": context,
    }


def with_layers(cfg: Any, layers: int) -> dict:
    """The same config at another depth (the unpruned original of a pruned model)."""
    d = dict(cfg if isinstance(cfg, dict) else cfg.to_dict())
    if d.get("text_config"):
        d["text_config"] = {**d["text_config"], "num_hidden_layers": layers}
    else:
        d["num_hidden_layers"] = layers
    return d


def _saving(before: float, after: float) -> float:
    return 100.0 * (1.0 - after / before)


def compare(before_cfg: Any, after_cfg: Any, context: int = DEFAULT_CONTEXT) -> dict:
    """Params and FLOPs per token before and after pruning, and the savings in percent."""
    pb, pa = count_params(before_cfg), count_params(after_cfg)
    fb = forward_flops_per_token(before_cfg, context)
    fa = forward_flops_per_token(after_cfg, context)
    return {
        "layers": [_shape(before_cfg)["layers"], _shape(after_cfg)["layers"]],
        "params": [pb["total"], pa["total"]],
        "params_non_embedding": [pb["non_embedding"], pa["non_embedding"]],
        "flops_per_token": [fb["total"], fa["total"]],
        "context": context,
        "params_saving_pct": _saving(pb["total"], pa["total"]),
        "flops_saving_pct": _saving(fb["total"], fa["total"]),
        # The "2 x parameters" rule of thumb, for comparison with papers that use it.
        "flops_2n_saving_pct": _saving(2 * pb["total"], 2 * pa["total"]),
    }


def compare_dir(model_dir: Path, layers_before: int, context: int = DEFAULT_CONTEXT) -> dict:
    """``compare`` for a pruned model directory whose original had ``layers_before`` blocks."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return compare(with_layers(cfg, layers_before), cfg, context)


def format_comparison(c: dict) -> str:
    b, a = c["layers"]
    return (
        f"blocks {b} -> {a}: params {c['params'][0] / 1e9:.3f}B -> {c['params'][1] / 1e9:.3f}B "
        f"(-{c['params_saving_pct']:.1f}%), forward FLOPs/token at context {c['context']} "
        f"{c['flops_per_token'][0] / 1e9:.2f}G -> {c['flops_per_token'][1] / 1e9:.2f}G "
        f"(-{c['flops_saving_pct']:.1f}%; 2N rule -{c['flops_2n_saving_pct']:.1f}%)"
    )


if __name__ == "__main__":
    if len(sys.argv) == 3:
        print(format_comparison(compare_dir(Path(sys.argv[1]), int(sys.argv[2]))))
    else:
        print(
            "Llama-3.1-8B, " + format_comparison(compare(LLAMA31_8B, with_layers(LLAMA31_8B, 26)))
        )
