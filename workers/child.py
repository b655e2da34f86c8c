"""Run one trainer job in a process of its own (started by ``workers.jobs.train_job``).

    REDIS_URL=redis://127.0.0.1:6379/0 python -m workers.child job_0123...

A crash here (an exception, a segfault, the OOM killer) ends this process only; the
worker watching it records the failure and takes the next job. If the worker itself
dies, this process notices that its parent is gone and exits too, so a retried job never
runs twice at once.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import redis

from service import logs
from workers import records
from workers.execute import StepFailed, execute, worker_gone


def exit_with_parent(poll: float = 0.2) -> None:
    """Exit when the worker is gone: the parent, or under torchrun (whose agent outlives
    the worker) the worker whose pid ``DISTILLERY_WORKER_PID`` names."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll)
            if os.getppid() != parent or worker_gone():
                os._exit(3)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def follow(conn: redis.Redis, job_id: str, poll: float = 0.2) -> int:
    """A non-zero torchrun rank of a finetune job: once rank 0 has started the job, train
    this rank's share on the same spec and work folder; the record, progress, checkpoints
    and output are rank 0's (``service/distributed.py``). If rank 0 fails before training,
    torchrun ends this rank with it."""
    from service.finetune import run_finetune
    from service.settings import get_settings
    from service.specs import FinetuneSpec
    from workers.outputs import resolve_job_refs, work_dir

    while (status := records.status(conn, job_id)) == "queued":
        time.sleep(poll)
    if status != "running":
        return 0  # cancelled or settled before it started: rank 0 does not train either
    job = records.get(conn, job_id)
    spec = FinetuneSpec.model_validate(resolve_job_refs(conn, job["tenant"], job["spec"]))
    work = work_dir(get_settings().home_dir(), job_id)
    run_finetune(spec, work / "model", resume=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].startswith("job_"):
        print("usage: python -m workers.child <job id>", file=sys.stderr)
        return 2
    logs.configure()
    exit_with_parent()
    conn = redis.Redis.from_url(os.environ["REDIS_URL"])
    if int(os.environ.get("RANK", "0")) > 0:
        return follow(conn, args[0])
    tenant = conn.hget(records.job_key(args[0]), "tenant")
    try:
        with logs.context(job_id=args[0], tenant=tenant.decode() if tenant else None):
            status = execute(conn, args[0])
    except StepFailed as exc:
        print(f"job {args[0]} failed: {exc}", file=sys.stderr)
        return 1
    print(f"job {args[0]} {status}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
