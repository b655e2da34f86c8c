"""The plain-transformers teacher engine: ``model.generate`` on padded batches.

It is the reference every other engine is held to: its greedy output is what the fast
CPU engine must reproduce token for token, and :func:`render_prompt` is the one way
all engines turn a request into prompt tokens (it lives in ``base.py``).

    from service.teacher.base import GenParams, Request
    from service.teacher.hf_engine import HFEngine
    engine = HFEngine("builtin:smollm2-135m-instruct", batch_size=16)
    engine.generate([Request((("user", "Name a colour."),))], GenParams(max_new_tokens=32))

Sampling with per-row seeds: ``model.generate`` samples a whole batch from the one
global torch RNG, so a row's text would depend on its batch mates. Instead a logits
processor draws each row's token from that row's own ``torch.Generator`` (seeded with
``seeds[i]``) and hands ``generate`` a one-hot choice that greedy search then takes.
Rows stay batched (no one-row-at-a-time cost) and a row's sample depends only on its
seed and its prompt.
"""

from __future__ import annotations

import torch

from service.models import load_model
from service.teacher.base import (
    Generation,
    GenParams,
    Request,
    TeacherEngine,
    render_prompt,
)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a turn: the generation config's EOS (an int or a list) and
    the tokenizer's."""
    return stop_ids(getattr(model.generation_config, "eos_token_id", None), tokenizer)


def stop_ids(configured: int | list[int] | None, tokenizer) -> list[int]:
    """A generation config's ``eos_token_id`` (an int, a list or None) and the tokenizer's
    EOS, as one sorted list (every engine stops at the same ids)."""
    ids: set[int] = set()
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def seeded_draw(
    logits: torch.Tensor, temperature: float, top_p: float, gens: list[torch.Generator]
) -> torch.Tensor:
    """One token per row from that row's generator: temperature, then nucleus ``top_p`` as
    in transformers' TopPLogitsWarper, then an inverse-CDF draw. Both CPU engines sample
    here, so they draw the same token from the same logits and seed."""
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token once the mass before it already reaches top_p (keeps >= 1).
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    # Inverse-CDF draw, one uniform per row from that row's generator
    # (torch.multinomial costs ~40 ms per row over a 49k vocabulary here).
    u = torch.cat([torch.rand(1, generator=g) for g in gens])
    cdf = probs.cumsum(dim=-1)
    chosen = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return chosen.clamp(max=probs.shape[-1] - 1)


class SeededSampler:
    """Logits processor: row ``b`` samples from its own generator (``seeded_draw``) and
    returns scores whose only finite entry is the chosen token, so greedy search picks it."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        chosen = seeded_draw(scores, self.temperature, self.top_p, self.generators)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(chosen)), chosen.to(out.device)] = 0.0
        return out


class HFEngine(TeacherEngine):
    name = "hf"

    def __init__(
        self,
        model_ref: str,
        device: str = "auto",
        batch_size: int = 16,
        dtype: torch.dtype | None = None,
    ):
        self.model_ref = model_ref
        self.model, self.tokenizer = load_model(model_ref, device=device, dtype=dtype)
        self.device = next(self.model.parameters()).device
        self.batch_size = batch_size
        self.capacity = batch_size  # rows the teacher loop hands one step (one generate)
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)
        self.pad_id = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.eos_ids[0]
        )

    def generate(
        self, requests: list[Request], params: GenParams, seeds: list[int] | None = None
    ) -> list[Generation]:
        if seeds is not None and len(seeds) != len(requests):
            raise ValueError(f"{len(seeds)} seeds for {len(requests)} requests")
        if seeds is None:
            seeds = list(range(len(requests)))
        prompts = [render_prompt(self.tokenizer, r) for r in requests]
        out: list[Generation] = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            out.extend(self._generate_batch(prompts[start:stop], params, seeds[start:stop]))
        return out

    @torch.inference_mode()
    def _generate_batch(
        self, prompts: list[list[int]], params: GenParams, seeds: list[int]
    ) -> list[Generation]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at column width
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention[i, width - len(p) :] = 1
        processors = []
        if params.temperature > 0:
            processors.append(SeededSampler(seeds, params.temperature, params.top_p))
        generated = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            max_new_tokens=params.max_new_tokens,
            do_sample=False,  # sampling, when asked, happens in SeededSampler
            temperature=None,
            top_p=None,
            top_k=None,
            logits_processor=processors or None,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
        )
        new_tokens = generated[:, width:].cpu().tolist()
        return [
            self._to_generation(toks, len(p)) for toks, p in zip(new_tokens, prompts, strict=True)
        ]

    def _to_generation(self, tokens: list[int], prompt_tokens: int) -> Generation:
        eos = set(self.eos_ids)
        end = next((i for i, t in enumerate(tokens) if t in eos), None)
        kept = tokens if end is None else tokens[: end + 1]
        return Generation(
            text=self.tokenizer.decode(kept, skip_special_tokens=True),
            tokens=len(kept),
            prompt_tokens=prompt_tokens,
            finish_reason="length" if end is None else "stop",
            extra={"token_ids": kept},
        )

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
