"""One ``FastEngine.generate`` call: requests flow through a fixed number of decode slots.

Slots ``0..n-1`` of the :class:`~service.teacher.kv.SlotCache` hold live sequences. Each
decode step feeds every live slot its last token, plus draft tokens looked up in its own
history (``lookup.py``; greedy only), in one forward pass. A slot whose sequence ends
(EOS or ``max_new_tokens``) is refilled with the next prompt at once; when none is left,
the last live slot moves into the hole, so a step never computes a finished sequence.
"""

from __future__ import annotations

from collections import deque

import torch

from service.teacher.base import GenParams
from service.teacher.kv import split_by_length
from service.teacher.lookup import NgramLookup

MIN_SHARED_PREFIX = 4  # tokens; below this the prefix copy is not worth a separate pass
CACHE_BUDGET = 6 * 2**30  # bytes of K/V cache before the slot count is reduced
REGROUP_EVERY = 8  # steps; with drafts lengths grow unevenly, so the cut is refreshed


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


class SlotRun:
    def __init__(self, engine, prompts: list[list[int]], params: GenParams, gens, pick):
        self.fw, self.engine, self.pick = engine.forward, engine, pick
        self.prompts, self.params, self.gens = prompts, params, gens
        self.out: list[list[int]] = [[] for _ in prompts]
        self.reason: list[str] = ["length"] * len(prompts)
        self.lookahead = engine.lookahead if params.temperature <= 0 else 0
        self.lookups: dict[int, NgramLookup] = {}
        self.stats = {"steps": 0, "rows": 0, "drafted": 0, "accepted": 0}
        self.prefix = shared_prefix(prompts) if engine.share_prefix and len(prompts) > 1 else 0
        if self.prefix < MIN_SHARED_PREFIX:
            self.prefix = 0
        max_len = max(len(p) for p in prompts) + params.max_new_tokens
        slots = min(engine.slots, len(prompts))
        per_slot = self.fw.cache_bytes(1, max_len)
        if per_slot * slots > CACHE_BUDGET:
            slots = max(1, CACHE_BUDGET // per_slot)
        self.slots = slots
        self.cache = self.fw.new_cache(slots, max_len)
        # Weights packed for full decode steps (kept until a call needs another count).
        self.fw.pack(slots if engine.pack_weights else 0)
        self.saved = None
        if self.prefix:
            self.fw.prefill(self.cache, [0], [prompts[0][: self.prefix]])
            self.saved = self.cache.save(0, self.prefix)
        # Longest prompts first: slots then hold similar lengths side by side (cheap
        # attention groups, see kv.split_by_length), and memory peaks in the first steps.
        self.pending = deque(sorted(range(len(prompts)), key=lambda r: (-len(prompts[r]), r)))
        self.changed = True  # slots were refilled or moved: recompute the attention groups
        self.req: list[int] = []  # request in each slot, -1 once it finished
        self.tok: list[int] = []  # its last token, not yet in the cache
        self.pos: list[int] = []  # where that token goes: the slot's cached length

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
            picked = self.pick(logits, self.params, self.gens_for(take))
            for s, r, t in zip(where, take, picked, strict=True):
                done = self.record(r, t)
                self.req[s], self.tok[s], self.pos[s] = (-1 if done else r), t, len(self.prompts[r])
                if self.lookahead and not done:
                    self.lookups[r] = NgramLookup(self.prompts[r] + [t])

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

    def drafts(self) -> list[list[int]]:
        if not self.lookahead:
            return [[] for _ in self.req]
        out = []
        for r in self.req:
            # Never draft past max_new_tokens (that also keeps positions inside the cache).
            room = self.params.max_new_tokens - len(self.out[r]) - 1
            out.append(self.lookups[r].propose(min(self.lookahead, room)))
        return out

    def step(self, groups) -> None:
        """One forward pass over the live slots; accept each slot's longest run of drafts
        that equals the model's own greedy choices, plus the model's next token."""
        drafts = self.drafts()
        counts = [1 + len(d) for d in drafts]
        flat = [t for tok, d in zip(self.tok, drafts, strict=True) for t in (tok, *d)]
        dev = self.fw.device
        logits = self.fw.decode(
            self.cache,
            torch.tensor(flat, device=dev),
            torch.tensor(self.pos, device=dev),
            counts,
            groups,
            self.saved,
        )
        picked = self.pick(logits, self.params, self.gens_for(self.req))
        self.stats["steps"] += 1
        self.stats["rows"] += len(flat)
        row = 0
        for i, (r, draft) in enumerate(zip(self.req, drafts, strict=True)):
            emitted, done = 0, False
            for j in range(len(draft) + 1):
                t = picked[row + j]
                emitted += 1
                done = self.record(r, t)
                if done or j == len(draft) or draft[j] != t:
                    break
            row += len(draft) + 1
            self.stats["drafted"] += len(draft)
            self.stats["accepted"] += emitted - 1
            # The fed token and the accepted drafts are now cached; the last pick is next.
            self.pos[i] += emitted
            self.tok[i] = t
            if done:
                self.req[i] = -1
                self.lookups.pop(r, None)
            elif self.lookahead:
                self.lookups[r].extend(self.out[r][-emitted:])

    def run(self) -> tuple[list[list[int]], list[str]]:
        self.admit()
        self.compact()
        groups, since = None, 0
        while self.req:
            if self.changed or (self.lookahead and since >= REGROUP_EVERY):
                groups = split_by_length([p + 1 for p in self.pos], self.engine.attn_groups)
                self.changed, since = False, 0
            self.step(groups)
            since += 1
            self.admit()
            self.compact()
        return self.out, self.reason
