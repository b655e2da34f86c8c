"""The fast CPU teacher engine: continuous batching over a slot KV cache, exact fp32.

    engine = make_engine("fast", "builtin:smollm2-135m-instruct", slots=64)
    engine.generate([Request((("user", "What is 2 + 2?"),))], GenParams(max_new_tokens=64))

Where plain ``generate`` loses time on a CPU (issue 4: it reaches about a third of the
machine's matrix-product rate), this engine does the following instead:

- a fixed number of decode slots; a sequence that finishes (EOS or ``max_new_tokens``)
  frees its slot at once and the next prompt is prefilled into it, so no finished
  sequence rides along and no row waits for the longest one of its batch;
- no padding: each prompt is prefilled at its own length (the prompts admitted together
  share the linear products, one matrix of all their tokens);
- the prompt prefix common to all requests (system prompt, template header) is computed
  once and its keys/values copied into every slot;
- a pre-allocated cache written in place, and a forward pass written out on the model's
  own weights (``llama_forward.py``) with fused q/k/v and gate/up products and the LM
  head only where a token is picked.

Greedy output equals ``generate``'s token for token up to fp32 reduction order (see
``llama_forward.py``; ``tests/test_engines.py`` checks it). Sampling draws request ``i``'s
tokens from its own generator seeded with ``seeds[i]``, so a row's output does not depend
on the batch it came in. Architectures the forward does not cover fall back to ``HFEngine``.
"""

from __future__ import annotations

import logging
from collections import deque

import torch

from service.teacher.base import Generation, GenParams, Request, TeacherEngine
from service.teacher.kv import split_by_length
from service.teacher.llama_forward import LlamaForward, unsupported_reason

log = logging.getLogger(__name__)

MIN_SHARED_PREFIX = 4  # tokens; below this the prefix copy is not worth a separate pass
CACHE_BUDGET = 6 * 2**30  # bytes of K/V cache before the slot count is reduced


def render_prompt(tokenizer, request: Request) -> list[int]:
    """Prompt token ids: the chat template with the generation prompt, then the prefill."""
    try:  # the shared definition, so every engine sees the same prompt tokens
        from service.teacher.hf_engine import render_prompt as shared
    except ImportError:
        text = tokenizer.apply_chat_template(
            request.as_openai(), add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text + request.prefill, add_special_tokens=False)["input_ids"]
    return shared(tokenizer, request)


def shared_prefix(prompts: list[list[int]]) -> int:
    """Length of the token prefix all prompts share, leaving each at least one own token
    (its last position's logits pick the first generated token)."""
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def stop_ids(model, tokenizer) -> set[int]:
    """Every id that ends a turn: the generation config's EOS (an int or a list) and the
    tokenizer's (as ``hf_engine.eos_token_ids``, which ``generate`` is given)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]) if e is not None}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def pick_tokens(
    logits: torch.Tensor, params: GenParams, gens: list[torch.Generator] | None
) -> list[int]:
    """Greedy argmax, or one draw per row from that row's generator after temperature and
    nucleus top-p, computed as ``hf_engine.SeededSampler`` does (so both engines draw the
    same token from the same logits and seed)."""
    if params.temperature <= 0 or gens is None:
        return logits.argmax(-1).tolist()
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token once the mass before it already reaches top_p (keeps >= 1).
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    # Inverse-CDF draw, one uniform per row from that row's generator.
    u = torch.cat([torch.rand(1, generator=g) for g in gens])
    cdf = probs.cumsum(dim=-1)
    chosen = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return chosen.clamp(max=probs.shape[-1] - 1).tolist()


class FastEngine(TeacherEngine):
    name = "fast"

    def __init__(
        self,
        model_ref: str,
        device: str = "cpu",
        slots: int = 64,
        prefill_tokens: int = 1024,
        share_prefix: bool = True,
        attn_groups: int = 4,
        pack_weights: bool = True,
        threads: int | None = None,
        model=None,
        tokenizer=None,
        **_options,  # batch_size and other options of other engines: not needed here
    ):
        from service.models import load_model

        if threads:
            torch.set_num_threads(threads)
        if model is None:
            model, tokenizer = load_model(model_ref, device=device)
        self.model, self.tokenizer = model, tokenizer
        self.slots = max(1, int(slots))
        self.prefill_tokens = max(1, int(prefill_tokens))
        self.share_prefix = share_prefix
        self.attn_groups = max(1, int(attn_groups))
        self.pack_weights = pack_weights
        self.stop = stop_ids(model, tokenizer)
        self.fallback = None
        reason = unsupported_reason(model)
        if reason:
            from service.teacher.hf_engine import HFEngine

            log.warning("fast engine falls back to transformers generate: %s", reason)
            self.fallback = HFEngine(model_ref, device=device, batch_size=self.slots)
            self.forward = None
        else:
            self.forward = LlamaForward(model)

    def generate(
        self, requests: list[Request], params: GenParams, seeds: list[int] | None = None
    ) -> list[Generation]:
        if not requests:
            return []
        if self.forward is None:
            return self.fallback.generate(requests, params, seeds)
        prompts = [render_prompt(self.tokenizer, r) for r in requests]
        gens = None
        if params.temperature > 0:
            seeds = list(seeds) if seeds is not None else list(range(len(requests)))
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        tokens, reasons = _Run(self, prompts, params, gens).run()
        out = []
        for prompt, toks, reason in zip(prompts, tokens, reasons, strict=True):
            # As HFEngine: the stop token is decoded too (a special one decodes to "").
            out.append(
                Generation(
                    text=self.tokenizer.decode(toks, skip_special_tokens=True),
                    tokens=len(toks),
                    prompt_tokens=len(prompt),
                    finish_reason=reason,
                    extra={"token_ids": toks},
                )
            )
        return out


class _Run:
    """One ``generate`` call: slots ``0..n-1`` hold live sequences (``req[i] == -1`` marks
    a slot freed this step); refills go into freed slots first."""

    def __init__(self, engine: FastEngine, prompts, params: GenParams, gens):
        self.fw = engine.forward
        self.engine, self.prompts, self.params, self.gens = engine, prompts, params, gens
        self.out: list[list[int]] = [[] for _ in prompts]
        self.reason: list[str] = ["length"] * len(prompts)
        self.prefix = shared_prefix(prompts) if engine.share_prefix and len(prompts) > 1 else 0
        if self.prefix < MIN_SHARED_PREFIX:
            self.prefix = 0
        max_len = max(len(p) for p in prompts) + params.max_new_tokens
        slots = min(engine.slots, len(prompts))
        fw = self.fw
        per_slot = fw.cache_bytes(1, max_len)
        if per_slot * slots > CACHE_BUDGET:
            slots = max(1, CACHE_BUDGET // per_slot)
        self.slots = slots
        self.cache = fw.new_cache(slots, max_len)
        # Weights packed for full decode steps (kept until a call needs another count).
        fw.pack(slots if engine.pack_weights else 0)
        self.saved = None
        if self.prefix:
            fw.prefill(self.cache, [0], [prompts[0][: self.prefix]])
            self.saved = self.cache.save(0, self.prefix)
        # Longest prompts first: slots then hold similar lengths side by side (cheap
        # attention groups, see kv.split_by_length), and memory peaks in the first steps.
        self.pending = deque(sorted(range(len(prompts)), key=lambda r: (-len(prompts[r]), r)))
        self.changed = True  # slots were refilled or moved: recompute the attention groups
        self.req: list[int] = []
        self.tok: list[int] = []
        self.pos: list[int] = []

    def record(self, r: int, t: int) -> bool:
        """Append token ``t`` to request ``r``; True when ``r`` is finished."""
        self.out[r].append(t)
        if t in self.engine.stop:
            self.reason[r] = "stop"
            return True
        return len(self.out[r]) >= self.params.max_new_tokens

    def gens_for(self, reqs: list[int]):
        return None if self.gens is None else [self.gens[r] for r in reqs]

    def admit(self) -> None:
        """Prefill pending prompts into free slots until none is free or none is pending."""
        while self.pending:
            free = [i for i, r in enumerate(self.req) if r < 0]
            free += range(len(self.req), self.slots)
            if not free:
                return
            take, budget = [], 0
            while self.pending and len(take) < len(free):
                size = len(self.prompts[self.pending[0]]) - self.prefix
                if take and budget + size > self.engine.prefill_tokens:
                    break
                take.append(self.pending.popleft())
                budget += size
            where = free[: len(take)]
            for s in where:
                if s == len(self.req):
                    self.req.append(-1), self.tok.append(0), self.pos.append(0)
                if self.saved is not None:
                    self.cache.load(s, self.saved)
            self.changed = True
            seqs = [self.prompts[r][self.prefix :] for r in take]
            logits = self.fw.prefill(self.cache, where, seqs, start=self.prefix)
            for s, r, t in zip(
                where, take, pick_tokens(logits, self.params, self.gens_for(take)), strict=True
            ):
                done = self.record(r, t)
                self.req[s], self.tok[s], self.pos[s] = (-1 if done else r), t, len(self.prompts[r])

    def compact(self) -> None:
        """Move the last live slots into the holes so that slots ``0..n-1`` are all live."""
        while self.req and self.req[-1] < 0:
            self.req.pop(), self.tok.pop(), self.pos.pop()
            self.changed = True
        for i in range(len(self.req)):
            if i >= len(self.req):
                break
            if self.req[i] < 0:
                j = len(self.req) - 1
                self.cache.move(j, i, self.pos[j])
                self.changed = True
                self.req[i], self.tok[i], self.pos[i] = self.req[j], self.tok[j], self.pos[j]
                self.req.pop(), self.tok.pop(), self.pos.pop()
                while self.req and self.req[-1] < 0:
                    self.req.pop(), self.tok.pop(), self.pos.pop()

    def run(self) -> tuple[list[list[int]], list[str]]:
        self.admit()
        self.compact()
        dev = self.fw.device
        groups = None
        while self.req:
            if self.changed:
                groups = split_by_length([p + 1 for p in self.pos], self.engine.attn_groups)
                self.changed = False
            tokens = torch.tensor(self.tok, device=dev)
            pos = torch.tensor(self.pos, device=dev)
            logits = self.fw.decode(self.cache, tokens, pos, groups)
            picked = pick_tokens(logits, self.params, self.gens_for(self.req))
            for i, (r, t) in enumerate(zip(self.req, picked, strict=True)):
                self.pos[i] += 1
                self.tok[i] = t
                if self.record(r, t):
                    self.req[i] = -1
            self.admit()
            self.compact()
        return self.out, self.reason
