"""The teacher's engine loop: one engine, rows from every job it holds in one running
batch, admitted by priority and fair share.

    loop = EngineLoop(engine)
    loop.add([Item(key="job_a/0", job="job_a", tenant="t1", index=0, request=..., params=...)])
    while not loop.idle:
        for item, generation in loop.step():
            ...  # write the row at once

This is the product's own code on purpose (DESIGN.md: the teacher tier's scheduling across
jobs is the product): vLLM batches whatever it is given, continuously, but it knows
nothing of jobs, tenants or callers waiting on an answer. What it is given, and when, is
decided here, before every engine step:

- **Interactive first.** Rows of interactive jobs (``POST /v1/distill?wait=``, or a spec
  with ``priority: interactive``) are admitted before any bulk row, with vLLM priority 0
  (bulk rows get 1).
- **The bulk share shrinks while interactive rows are in flight.** On a CPU one step of a
  full batch costs several times a step of two rows, and vLLM does not preempt a running
  request to admit a waiting one (vLLM #40004: its scheduler stops at ``max_num_seqs``,
  and the KV cache fills before that). So while any interactive row is pending or
  running, bulk rows in the engine are cut down to ``bulk_while_interactive``: the most
  recently admitted bulk rows (the ones with the least work done) are taken out
  (``engine.preempt``) and put back at the front of their job's queue. A greedy row comes
  back with the tokens it had generated appended to its prompt and continues after them
  (vLLM's prefix cache holds the prompt), so its work is kept; a sampled row starts over,
  so that its sample stays the one its seed draws.
- **Fair share for bulk work.** Free room goes one row at a time to the tenant with the
  fewest rows in the engine, then to its job with the fewest (ties round-robin), so two
  tenants' jobs converge to equal shares of the batch whatever their sizes and order of
  arrival, and no job holds more than ``job_cap`` rows in the engine. A job alone may
  fill the engine (work-conserving); one that arrives later takes the slots that free
  until the shares are equal.

Every finished row comes back from :meth:`EngineLoop.step` at once, in the step it
finished in; the caller makes it durable. :meth:`EngineLoop.cancel_job` aborts a job's
rows in the engine before the next step.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from dataclasses import dataclass, field

from service.teacher.base import Generation, GenParams, Request, TeacherEngine

INTERACTIVE_PRIORITY, BULK_PRIORITY = 0, 1


@dataclass
class Item:
    """One row to generate. ``key`` is unique across everything the loop holds."""

    key: str
    job: str
    tenant: str
    index: int
    request: Request
    params: GenParams
    seed: int | None = None
    interactive: bool = False
    meta: dict = field(default_factory=dict)  # the caller's (the row, its cache key, ...)


def default_capacity(engine: TeacherEngine) -> int:
    """Rows an engine runs at once: vLLM's ``max_num_seqs``, else what the engine says."""
    cap = getattr(engine, "capacity", None)
    return int(cap) if cap else 64


class EngineLoop:
    def __init__(
        self,
        engine: TeacherEngine,
        capacity: int | None = None,
        job_cap: int | None = None,
        bulk_while_interactive: int = 16,
    ):
        self.engine = engine
        self.capacity = max(1, capacity or default_capacity(engine))
        self.job_cap = max(1, job_cap or self.capacity)
        self.bulk_while_interactive = max(0, bulk_while_interactive)
        self.pending: dict[str, deque[Item]] = {}  # job -> rows not yet in the engine
        self.running: dict[str, tuple[int, Item]] = {}  # key -> (admission number, row)
        self.in_engine: Counter[str] = Counter()  # job -> rows in the engine
        self.interactive_jobs: set[str] = set()
        self.tenant_of: dict[str, str] = {}
        self._tenants: deque[str] = deque()  # bulk round-robin: tenants...
        self._jobs: dict[str, deque[str]] = {}  # ...then each tenant's jobs
        self._seq = itertools.count()
        self.preempted = 0  # bulk rows taken out to make room for interactive ones
        self.resumed = 0  # of those, rows that continue from their tokens

    # -- what the loop holds -----------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not self.running and not any(self.pending.values())

    def held(self, job: str | None = None) -> int:
        """Rows held (pending or in the engine), of one job or of all."""
        if job is not None:
            return len(self.pending.get(job, ())) + self.in_engine[job]
        return sum(len(q) for q in self.pending.values()) + len(self.running)

    def jobs(self) -> set[str]:
        return {j for j in self.pending if self.held(j)} | {
            j for j, n in self.in_engine.items() if n
        }

    def add(self, items: list[Item]) -> None:
        for item in items:
            job = item.job
            if job not in self.pending:
                self.pending[job] = deque()
                self.tenant_of[job] = item.tenant
                if item.interactive:
                    self.interactive_jobs.add(job)
                else:
                    if item.tenant not in self._jobs:
                        self._jobs[item.tenant] = deque()
                        self._tenants.append(item.tenant)
                    self._jobs[item.tenant].append(job)
            self.pending[job].append(item)

    def cancel_job(self, job: str) -> list[Item]:
        """Drop a job's rows: abort those in the engine, forget the pending ones; returns
        them all (the caller releases what it had claimed)."""
        dropped = list(self.pending.get(job, ()))
        keys = [k for k, (_, it) in self.running.items() if it.job == job]
        if keys:
            self.engine.abort(keys)
            dropped += [self.running.pop(k)[1] for k in keys]
        self._forget(job)
        return dropped

    def _forget(self, job: str) -> None:
        self.pending.pop(job, None)
        self.in_engine.pop(job, None)
        self.interactive_jobs.discard(job)
        tenant = self.tenant_of.pop(job, None)
        jobs = self._jobs.get(tenant) if tenant is not None else None
        if jobs is not None and job in jobs:
            jobs.remove(job)
            if not jobs:
                del self._jobs[tenant]
                self._tenants.remove(tenant)

    # -- admission -------------------------------------------------------------------------

    def _start(self, item: Item) -> None:
        priority = INTERACTIVE_PRIORITY if item.interactive else BULK_PRIORITY
        prefix = item.meta.get("prefix")
        self.engine.start(item.key, item.request, item.params, item.seed, priority, prefix)
        self.running[item.key] = (next(self._seq), item)
        self.in_engine[item.job] += 1

    def _interactive_waiting(self) -> bool:
        return any(self.pending.get(j) or self.in_engine[j] for j in self.interactive_jobs)

    def _preempt_bulk(self, keep: int) -> None:
        bulk = sorted(
            ((seq, it) for seq, it in self.running.values() if not it.interactive),
            key=lambda p: p[0],
        )
        victims = [it for _, it in bulk[keep:]]
        if not victims:
            return
        generated = self.engine.preempt([it.key for it in victims])
        for it in victims:
            # A greedy row continues from what it generated (the same tokens it would
            # have produced); a sampled row starts over, so its sample stays its seed's.
            if it.params.temperature == 0 and generated.get(it.key):
                it.meta["prefix"] = generated[it.key]
                self.resumed += 1
        for it in reversed(victims):  # newest last, so the oldest victim runs first again
            del self.running[it.key]
            self.in_engine[it.job] -= 1
            self.pending[it.job].appendleft(it)
        self.preempted += len(victims)

    def admit(self) -> None:
        bulk_cap = self.capacity
        if self._interactive_waiting():
            bulk_cap = self.bulk_while_interactive
            self._preempt_bulk(bulk_cap)
        room = self.capacity - len(self.running)
        for job in list(self.interactive_jobs):
            queue = self.pending.get(job)
            while room > 0 and queue:
                self._start(queue.popleft())
                room -= 1
        bulk = sum(1 for _, it in self.running.values() if not it.interactive)
        # One row at a time to the tenant with the fewest rows in the engine, then its job
        # with the fewest (ties: round-robin order). A job that arrives while another fills
        # the engine takes every slot that frees until the two hold equal shares, rather
        # than alternating with it and keeping it ahead by its head start.
        while room > 0 and bulk < bulk_cap:
            best = None
            for rank, tenant in enumerate(self._tenants):
                jobs = [j for j in self._jobs[tenant]
                        if self.pending.get(j) and self.in_engine[j] < self.job_cap]  # fmt: skip
                if not jobs:
                    continue
                held = sum(self.in_engine[j] for j in self._jobs[tenant])
                if best is None or held < best[0]:
                    best = (held, rank, tenant, min(jobs, key=lambda j: self.in_engine[j]))
            if best is None:
                break
            _, _, tenant, job = best
            self._start(self.pending[job].popleft())
            self._tenants.remove(tenant)  # to the back of the round-robin
            self._tenants.append(tenant)
            self._jobs[tenant].remove(job)
            self._jobs[tenant].append(job)
            room -= 1
            bulk += 1

    def step(self) -> list[tuple[Item, Generation]]:
        """Admit, run one engine step, return the rows that finished in it."""
        self.admit()
        if not self.running:
            return []
        done = []
        for key, gen in self.engine.step():
            entry = self.running.pop(key, None)
            if entry is None:  # aborted meanwhile
                continue
            item = entry[1]
            self.in_engine[item.job] -= 1
            done.append((item, gen))
        for item, _ in done:
            if not self.held(item.job):
                self._forget(item.job)
        return done
