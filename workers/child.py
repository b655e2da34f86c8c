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
from workers.execute import StepFailed, execute


def exit_with_parent(poll: float = 1.0) -> None:
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].startswith("job_"):
        print("usage: python -m workers.child <job id>", file=sys.stderr)
        return 2
    logs.configure()
    exit_with_parent()
    conn = redis.Redis.from_url(os.environ["REDIS_URL"])
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
