"""Worker entry point.

    distillery worker --queues teacher          # distillation; keeps its engine loaded
    distillery worker --queues train            # prune, finetune, evaluate, merge
    python -m workers.worker --queues teacher --url redis://127.0.0.1:6379/0

The teacher worker is not an RQ worker: it runs one engine loop over the rows of every
distill job it holds (``workers/teacher.py``), keeping its engine loaded. The trainer
worker is an RQ SimpleWorker: no fork per job, because it runs each job in a fresh child
process of its own (``workers.jobs.train_job``).

A SimpleWorker runs the job in its main thread and so cannot send heartbeats while a
long job runs; :class:`DistilleryWorker` sends them from a side thread. The heartbeats
keep the worker visible to ``/readyz`` and keep the job out of RQ's abandoned-job
cleanup; when they stop (the worker died), RQ requeues the job within about
``3 * job_monitoring_interval + 10`` seconds plus one maintenance interval, and it resumes.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

import redis
from rq import SimpleWorker
from rq.job import Job
from rq.queue import Queue

from service import logs
from workers import records
from workers.connect import configured_url
from workers.lifecycle import QUEUES

WORKER_TTL = 30  # seconds; an idle worker re-registers every WORKER_TTL - 15 s
MONITOR_INTERVAL = 10  # seconds between heartbeats while a job runs
MAINTENANCE_INTERVAL = 60  # seconds between abandoned-job sweeps (RQ default: 600)


class DistilleryWorker(SimpleWorker):
    def execute_job(self, job: Job, queue: Queue) -> None:
        done = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, done), daemon=True, name="heartbeat")
        beat.start()
        tenant = self.connection.hget(records.job_key(job.id), "tenant")
        try:
            # Every line logged while the job runs (ours, rq's, the engine's) carries
            # its id and tenant (service/logs.py).
            with logs.context(job_id=job.id, tenant=tenant.decode() if tenant else None):
                super().execute_job(job, queue)
        finally:
            done.set()
            beat.join(timeout=5)

    def _beat(self, job: Job, done: threading.Event) -> None:
        while not done.wait(self.job_monitoring_interval):
            try:
                if self.execution is not None:
                    self.maintain_heartbeats(job)
            except Exception as exc:  # Redis hiccup: the next beat retries
                self.log.warning("heartbeat failed: %s", exc)

    def get_heartbeat_ttl(self, job: Job) -> int:
        # Jobs run with job_timeout=-1 (they time themselves out); SimpleWorker would then
        # use RQ's 420 s default. Our side thread beats every job_monitoring_interval; three
        # missed beats (plus slack for a loaded machine) and the job counts as abandoned.
        return 3 * self.job_monitoring_interval + 10


def parse_queues(text: str) -> list[str]:
    names = [q.strip() for q in text.split(",") if q.strip()]
    bad = [q for q in names if q not in QUEUES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"queues must be among {', '.join(QUEUES)}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--queues",
        type=parse_queues,
        required=True,
        help="Comma-separated queues: teacher (distillation), train (the rest).",
    )
    p.add_argument("--url", help="Redis URL (default: REDIS_URL, or the `distillery up` one).")
    p.add_argument("--name", help="Worker name (default: random).")
    p.add_argument("--burst", action="store_true", help="Exit when the queues are empty.")
    p.add_argument(
        "--monitor-interval",
        type=int,
        default=MONITOR_INTERVAL,
        help="Seconds between heartbeats while a job runs; a job is abandoned after "
        "3 missed beats + 10 s.",
    )
    p.add_argument(
        "--maintenance-interval",
        type=int,
        default=MAINTENANCE_INTERVAL,
        help="Seconds between sweeps that requeue abandoned jobs.",
    )


def run(args: argparse.Namespace) -> int:
    from service.settings import get_settings

    settings = get_settings()
    url = args.url or configured_url(settings.home_dir())
    if not url:
        print("error: no Redis: set REDIS_URL or start `distillery up`", file=sys.stderr)
        return 2
    os.environ["REDIS_URL"] = url  # child processes of train jobs connect to the same Redis
    logs.configure()  # DISTILLERY_LOG_FORMAT=json: one JSON object per line
    conn = redis.Redis.from_url(url)
    if "teacher" in args.queues:
        if len(args.queues) > 1:
            print("error: a teacher worker serves the teacher queue alone", file=sys.stderr)
            return 2
        from workers.teacher import run as run_teacher

        run_teacher(conn, name=args.name, burst=args.burst)
        return 0
    worker = DistilleryWorker(
        args.queues,
        name=args.name,
        connection=conn,
        worker_ttl=WORKER_TTL,
        job_monitoring_interval=args.monitor_interval,
        maintenance_interval=args.maintenance_interval,
    )
    worker.work(burst=args.burst, logging_level=settings.log_level, with_scheduler=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="distillery worker", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
