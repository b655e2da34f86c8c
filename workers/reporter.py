"""A Reporter that writes progress into the job record and events into its Redis stream.

Every ``run_*`` function of ``service`` reports through a :class:`service.progress.Reporter`;
in a worker it is this one. Progress is throttled (record at most every ``every``
seconds, a progress event at most once a second) so a fast loop cannot flood Redis;
``flush()`` writes the last values. ``cancelled()`` reads the job's cancel flag, so
running work stops at its next batch or step; ``check()`` also enforces the job's
deadline, which is how the teacher worker times out a job without killing its process
(and its loaded engine).

A pipeline's step also forwards its progress and log events to the pipeline's own
stream (``forward_to``), each with the step's name in ``pipeline_step``, so a client following the
pipeline sees its steps advance rather than nothing between ``running`` and the end.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from service.errors import DistilleryError
from service.progress import Reporter
from workers import records


class JobTimeout(DistilleryError):
    code = "timeout"


class RecordReporter(Reporter):
    def __init__(
        self,
        conn: redis.Redis,
        job_id: str,
        *,
        deadline: float | None = None,
        every: float = 0.5,
        event_every: float = 1.0,
        forward_to: str | None = None,
        step: str | None = None,
    ):
        self.conn = conn
        self.job_id = job_id
        self.forward_to, self.step = forward_to, step  # the pipeline, and this step's name
        self.deadline = deadline  # time.monotonic() value; None = no limit
        self.every = every
        self.event_every = event_every
        self.latest: dict[str, Any] = {}
        self._last_write = 0.0
        self._last_event = 0.0
        self._last_cancel_check = 0.0
        self._cancelled = False
        self._dirty = False

    def progress(self, **fields: Any) -> None:
        self.latest.update(fields)
        self._dirty = True
        now = time.monotonic()
        if now - self._last_write >= self.every:
            self._write(now)

    def _write(self, now: float) -> None:
        doc = dict(self.latest, updated_at=time.time())
        records.update(self.conn, self.job_id, progress=doc)
        self._last_write = now
        self._dirty = False
        if now - self._last_event >= self.event_every:
            records.add_event(self.conn, self.job_id, "progress", type="progress", data=doc)
            if self.forward_to:
                records.add_event(self.conn, self.forward_to, f"{self.step}: progress",
                                  type="progress", data={**doc, "job_id": self.job_id,
                                                         "pipeline_step": self.step})  # fmt: skip
            self._last_event = now

    def flush(self) -> None:
        if self._dirty:
            self._last_event = 0.0
            self._write(time.monotonic())

    def event(self, message: str, level: str = "info", **data: Any) -> None:
        records.add_event(self.conn, self.job_id, message, type="log", level=level, data=data)
        if self.forward_to:
            records.add_event(self.conn, self.forward_to, f"{self.step}: {message}", type="log",
                              level=level, data={**data, "job_id": self.job_id, "pipeline_step": self.step})  # fmt: skip

    def cancelled(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and now - self._last_cancel_check >= 0.2:
            self._last_cancel_check = now
            self._cancelled = records.cancel_requested(self.conn, self.job_id)
        return self._cancelled

    def check(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise JobTimeout("job ran past its time limit (DISTILLERY_JOB_TIMEOUT)")
        super().check()
