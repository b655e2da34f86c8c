"""Counters for ``/metrics`` (``api/metrics.py``), kept in Redis because the API and the
workers are separate processes, on separate machines: a counter in one process's memory
would show only what that process did. Every writer updates them as it changes a job
record (``workers/records.py``), and the API reads them at scrape time.

- ``distillery:stats:jobs``: hash ``<type>|<status>`` -> how many job records are in
  that status now. ``records.create`` counts a new record as queued; the status
  transition script moves the count in the same Lua call that moves the status.
- ``distillery:stats:running``: set of the job hashes now running (the same script), so
  a scrape reads live progress (tokens/s) of running jobs without scanning all records.
- ``distillery:stats:durations``: hash of a histogram per ``<type>|<status>``:
  ``<type>|<status>|<upper bound>`` (per-bucket counts, not cumulative; their total is
  the count) and ``...|sum``, written when a job that had started finishes.
- ``distillery:stats:generated``: hash ``rows``, ``tokens``, ``prompt_tokens``,
  ``cached_rows``: what succeeded distill jobs wrote (from their result's usage).

Counting starts with the records written by this code; records older than it are not
in the counts.
"""

from __future__ import annotations

import json

import redis

JOBS_KEY = "distillery:stats:jobs"
RUNNING_KEY = "distillery:stats:running"
DURATIONS_KEY = "distillery:stats:durations"
GENERATED_KEY = "distillery:stats:generated"
# Seconds: jobs run from seconds (a tiny distill) to a day (DISTILLERY_JOB_TIMEOUT).
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)


def bucket_of(seconds: float) -> str:
    """The histogram bucket (its upper bound, as Prometheus writes ``le``) of a duration."""
    for bound in DURATION_BUCKETS:
        if seconds <= bound:
            return str(float(bound))
    return "+Inf"


def job_finished(conn: redis.Redis, key: str, status: str) -> None:
    """Record the duration of a job that just finished (hash ``key``), and what a
    succeeded distill job generated."""
    typ, started, finished, metrics = (
        v.decode() if isinstance(v, bytes) else v
        for v in conn.hmget(key, "type", "started_at", "finished_at", "metrics")
    )
    p = conn.pipeline(transaction=False)
    if started and finished:
        seconds = max(0.0, float(finished) - float(started))
        name = f"{typ}|{status}"
        p.hincrby(DURATIONS_KEY, f"{name}|{bucket_of(seconds)}", 1)
        p.hincrbyfloat(DURATIONS_KEY, f"{name}|sum", seconds)
    if status == "succeeded" and typ == "distill" and metrics:
        result = json.loads(metrics) or {}
        p.hincrby(GENERATED_KEY, "rows", int(result.get("rows") or 0))
        p.hincrby(GENERATED_KEY, "tokens", int(result.get("generated_tokens") or 0))
        p.hincrby(GENERATED_KEY, "prompt_tokens", int(result.get("prompt_tokens") or 0))
        p.hincrby(GENERATED_KEY, "cached_rows", int(result.get("cached_rows") or 0))
    p.execute()
