"""RQ job functions. Thin: take a job id, its type and spec dict, run it, report through
the job record. Distillation is not an RQ job function: teacher workers run it in their
engine loop (``workers/teacher.py``).

- ``train_job`` runs prune, finetune, evaluate and merge in a child process
  (``python -m workers.child <job id>``) and watches it: a crash (even a segfault or the
  OOM killer) fails the job, not the worker, and a cancel that the child does not honour
  at its next step within DISTILLERY_CANCEL_GRACE seconds terminates it.

Why our own child rather than RQ's work horse (RQ's ``Worker`` forks one per job, kills
it on ``job_timeout`` and fails the job when it dies): a fork of a process that has
loaded torch and its thread pools is unsafe, a multi-GPU fine-tune must start under
torchrun (one process per rank), a cancel gets DISTILLERY_CANCEL_GRACE seconds to stop at
its next step before it is killed, and a child exits when its worker dies
(``workers/child.py``), which RQ's horse does not. The rest is RQ's: the worker
(``SimpleWorker``, so RQ forks nothing), dependencies, retries and abandoned-job handling
(``workers.lifecycle.on_rq_failure``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import redis
from rq import get_current_job

from service.settings import get_settings
from workers import records
from workers.execute import SPECS, StepFailed, execute
from workers.lifecycle import end

log = logging.getLogger("distillery.worker")


def _connection() -> redis.Redis:
    job = get_current_job()
    assert job is not None, "RQ job functions run inside a worker"
    return job.connection


def _no_retry() -> None:
    """A job that failed for a reason of its own is not worth a retry."""
    job = get_current_job()
    if job is not None:
        job.retries_left = 0


def train_job(job_id: str, job_type: str, spec: dict) -> str:
    conn = _connection()
    if job_type == "report":  # gathers results only: cheap, no model, no child
        try:
            return execute(conn, job_id)
        except StepFailed:
            _no_retry()
            raise
    SPECS[job_type].model_validate(spec)
    job = records.get(conn, job_id)
    if job is None or job["status"] in records.TERMINAL:
        return job["status"] if job else "missing"
    status = supervise_child(conn, job_id, job_type)
    if status == "failed":
        _no_retry()
        raise StepFailed(f"{job_type} {job_id} failed")
    return status


def _redis_url(conn: redis.Redis) -> str:
    kw = conn.connection_pool.connection_kwargs
    if "path" in kw:
        return f"unix://{kw['path']}?db={kw.get('db', 0)}"
    return f"redis://{kw.get('host', '127.0.0.1')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


def _stop(proc: subprocess.Popen, wait: float = 10.0) -> None:
    """SIGTERM the child's process group, then SIGKILL if it lingers."""
    for sig, timeout in ((signal.SIGTERM, wait), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            continue


def child_command(job_id: str, job_type: str, procs: int) -> list[str]:
    """``python -m workers.child JOB``; a finetune job with ``procs`` > 1 runs under
    torchrun, one child per rank (rank 0 runs the job, the others follow it)."""
    child = ["-m", "workers.child", job_id]
    if job_type != "finetune" or procs <= 1:
        return [sys.executable, *child]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={procs}", *child]  # fmt: skip


def supervise_child(conn: redis.Redis, job_id: str, job_type: str, poll: float = 0.5) -> str:
    """Run the job in ``python -m workers.child``; return the record's final status."""
    settings = get_settings()
    env = dict(os.environ, REDIS_URL=os.environ.get("REDIS_URL") or _redis_url(conn),
               DISTILLERY_WORKER_PID=str(os.getpid()))  # fmt: skip
    proc = subprocess.Popen(
        child_command(job_id, job_type, settings.train_procs),
        env=env,
        start_new_session=True,  # its own process group: we can end it and all it started
    )
    timeout = settings.job_timeout
    deadline = time.monotonic() + timeout + settings.cancel_grace if timeout > 0 else None
    cancel_seen: float | None = None
    why = ""
    try:
        while proc.poll() is None:
            time.sleep(poll)
            now = time.monotonic()
            if cancel_seen is None and records.cancel_requested(conn, job_id):
                cancel_seen = now
            if cancel_seen is not None and now - cancel_seen > settings.cancel_grace:
                why = "cancelled"
                _stop(proc)
            elif deadline is not None and now > deadline:
                why = "timeout"
                _stop(proc)
    finally:
        _stop(proc)  # the worker is stopping (cold shutdown): take the child down with it
    job = records.get(conn, job_id)
    if job is None:
        return "missing"
    if job["status"] in records.TERMINAL:
        return job["status"]
    if why == "cancelled":
        end(conn, job, "cancelled")
        return "cancelled"
    rc = proc.returncode
    how = f"signal {signal.Signals(-rc).name}" if rc and rc < 0 else f"exit code {rc}"
    error = {
        "code": "timeout" if why == "timeout" else "crashed",
        "message": "job ran past its time limit"
        if why == "timeout"
        else f"the job's process ended unexpectedly ({how})",
        "where": "workers.child",
    }
    end(conn, job, "failed", error=error)
    return "failed"
