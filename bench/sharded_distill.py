"""Speed-up of one distill job sharded across N teacher worker processes, against one.

    DISTILLERY_HOME=/tmp/dhome .venv/bin/python -m bench.sharded_distill \\
        --data ../shared/data/alpaca/alpaca_5000.json --rows 64 --max-new-tokens 64 \\
        --engine fast --workers 1,3

For each worker count N: a Redis of its own (``workers.redis_server.start_redis``), N
``python -m workers.worker --queues teacher`` processes (torch threads: cores // N each,
at least 1, as teacher workers of one host share its cores; ``--threads`` sets
``DISTILLERY_THREADS`` instead), a warm-up job of N one-row shards so
every worker has loaded the teacher (not timed), then the job itself with ``shards=N``
(N = 1 is the single-worker path), timed from submission until its record says
succeeded. Greedy decoding, so every N must write the same rows as N = 1; the script
checks it. Prints one line per N: wall seconds, generated tokens/s, speed-up against
N = 1, which worker ran each shard, and the load average before and after (the machine
may be shared: read the figure with it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]


def start_workers(n: int, url: str, threads: int | None, logs: Path) -> list[subprocess.Popen]:
    env = dict(os.environ, REDIS_URL=url, PYTHONUNBUFFERED="1")
    env.pop("DISTILLERY_THREADS", None)
    if threads:
        env["DISTILLERY_THREADS"] = str(threads)
    return [
        subprocess.Popen(
            [sys.executable, "-m", "workers.worker", "--queues", "teacher", "--name", f"w{k}"],
            cwd=ROOT,
            env=env,
            stdout=(logs / f"w{k}.log").open("ab"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for k in range(n)
    ]


def wait_job(conn: redis.Redis, job_id: str, timeout: float = 7200) -> dict:
    from workers import records

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = records.get(conn, job_id)
        if rec["status"] in records.TERMINAL:
            return rec
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not finish in {timeout} s")


def run_once(args: argparse.Namespace, n: int, dataset: str, warm: str, logs: Path) -> dict:
    from rq import Queue, Worker

    from service.specs import DistillSpec
    from service.store import get_store
    from workers.redis_server import start_redis
    from workers.submit import submit

    threads = args.threads
    server = start_redis(Path(tempfile.mkdtemp(prefix="bench-redis-")))
    conn = redis.Redis.from_url(server.url)
    procs = start_workers(n, server.url, threads, logs)
    store = get_store()
    try:
        while len(Worker.all(queue=Queue("teacher", connection=conn))) < n:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a worker exited; see {logs}")
            time.sleep(0.2)
        common = dict(teacher=args.teacher, engine=args.engine, max_new_tokens=args.max_new_tokens)
        if args.batch_size:
            common["batch_size"] = args.batch_size
        for _ in range(3):  # until every worker has loaded the teacher
            spec = DistillSpec(dataset=warm, limit=n, shards=n, **common)
            rec = wait_job(conn, submit(conn, store, "bench", "distill", spec)["id"])
            assert rec["status"] == "succeeded", rec["error"]
            ran = {s["worker"] for s in rec["metrics"].get("shards", [])} or {"w0"}
            if len(ran) == n:
                break
        spec = DistillSpec(dataset=dataset, shards=n, **common)
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        rec = wait_job(conn, submit(conn, store, "bench", "distill", spec)["id"])
        seconds = time.perf_counter() - t0
        load_after = os.getloadavg()
        assert rec["status"] == "succeeded", rec["error"]
        path = store.path("dataset", rec["artifacts"]["dataset"]) / "rows.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        shards = rec["metrics"].get("shards") or [
            {"worker": "w0", "rows": len(rows), "threads": rec["metrics"].get("threads")}
        ]
        return {
            "workers": n,
            "threads_per_worker": sorted({s.get("threads") for s in shards}),
            "seconds": round(seconds, 2),
            "generated_tokens": rec["metrics"]["generated_tokens"],
            "tokens_per_s": round(rec["metrics"]["generated_tokens"] / seconds, 1),
            "shards": [(s.get("worker"), s.get("rows"), s.get("seconds")) for s in shards],
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in load_after],
            "rows": rows,
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/alpaca/alpaca_5000.json"))
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--teacher", default="builtin:smollm2-135m-instruct")
    p.add_argument("--engine", default="fast")
    p.add_argument("--batch-size", type=int, default=None, help="Default: the spec's.")
    p.add_argument("--workers", default="1,3", help="Worker counts to compare, 1 first.")
    p.add_argument("--threads", type=int, default=None, help="Torch threads per worker.")
    args = p.parse_args(argv)

    from api.datasets import save_dataset
    from service.datasets import read_dataset
    from service.store import get_store

    counts = [int(x) for x in args.workers.split(",")]
    rows = [r.source for r in read_dataset(args.data, limit=args.rows)]
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    store = get_store()
    dataset = save_dataset(store, "bench", body, "rows.jsonl")["id"]
    warm = save_dataset(store, "bench", body, "warm.jsonl")["id"]
    logs = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    print(f"{len(rows)} rows of {args.data.name}, {args.max_new_tokens} new tokens, engine "
          f"{args.engine}, {os.cpu_count()} cores; worker logs in {logs}", flush=True)  # fmt: skip
    base: dict | None = None
    for n in counts:
        res = run_once(args, n, dataset, warm, logs)
        base = base or res
        same = sum(a == b for a, b in zip(res["rows"], base["rows"], strict=True))
        print(
            f"workers {n} x {res['threads_per_worker']} threads: {res['seconds']} s, "
            f"{res['generated_tokens']} tokens, {res['tokens_per_s']} tok/s, "
            f"speed-up {base['seconds'] / res['seconds']:.2f}x, same rows {same}/{len(rows)}, "
            f"shards (worker, rows, s) {res['shards']}, load average before "
            f"{res['load_before']} after {res['load_after']}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
