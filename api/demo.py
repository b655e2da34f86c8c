"""The main job through the HTTP API (what ``make run`` runs).

    .venv/bin/python -m api.demo --data-dir ../shared/data [--url http://127.0.0.1:8000]

If no service answers at ``--url``, starts ``distillery up`` in the background (its
output in $DISTILLERY_HOME/logs/up.log). Then uploads the Alpaca sample, submits the
pipeline (prune 6 of 30 blocks of the embedded model ∥ self-distill → LoRA-recover →
evaluate baseline / pruned / recovered), follows its steps, prints the table, and
leaves the service running with its URL printed. Sizes are those of ``bench/main_job.py``.

Rerunning is cheap: an identical dataset already uploaded is reused, and a pipeline of
the same spec that is running or has succeeded is followed rather than submitted again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

from api.client import Client
from service import main_job_options as main_job

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[run] {msg}", file=sys.stderr, flush=True)


def answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def ensure_service(url: str, eval_data: Path | None, timeout: float = 600) -> None:
    if answers(url):
        log(f"using the service at {url}")
        return
    from service.settings import get_settings

    home = get_settings().home_dir()
    u = urlparse(url)
    env = dict(os.environ)
    if eval_data is not None:
        env["DISTILLERY_EVAL_DATA"] = str(eval_data.resolve())
    (home / "logs").mkdir(exist_ok=True)
    out = (home / "logs" / "up.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "up", "--host", u.hostname or "127.0.0.1",
         "--port", str(u.port or 8000)],
        cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,  # outlives this script: the service stays up
    )  # fmt: skip
    log(f"starting `distillery up` (pid {proc.pid}; log {home / 'logs' / 'up.log'})")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"`distillery up` exited; see {home / 'logs' / 'up.log'}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"the service did not become ready in {timeout:.0f}s")


def canonical_sha256(path: Path) -> str:
    """The sha256 the service will give this file's rows.jsonl (api/datasets.py)."""
    from service.datasets import parse_rows

    rows = parse_rows(path.read_bytes(), name=path.name)
    body = "".join(json.dumps(r.source, ensure_ascii=False) + "\n" for r in rows)
    return hashlib.sha256(body.encode()).hexdigest()


def upload_once(client: Client, path: Path) -> str:
    digest = canonical_sha256(path)
    after = None
    while True:
        page = client.list_datasets(after=after, limit=100)
        for d in page.data:
            if d.sha256 == digest:
                log(f"dataset {path.name} already uploaded: {d.id}")
                return d.id
        if not page.has_more:
            break
        after = page.next_cursor
    ds = client.upload_dataset(path)
    log(f"uploaded {path.name}: {ds.id} ({ds.rows} rows)")
    return ds.id


def submit_once(client: Client, spec: dict) -> str:
    from service.specs import PipelineSpec

    want = PipelineSpec(**spec).model_dump(mode="json")
    for job in client.list_jobs(type="pipeline", limit=100).data:
        if job.spec == want and job.status in ("queued", "running", "succeeded"):
            log(f"following the pipeline already {job.status}: {job.id}")
            return job.id
    job = client.submit_job("pipeline", **spec)
    log(f"submitted pipeline {job.id}")
    return job.id


def follow(client: Client, job_id: str, every: float = 2.0, report: float = 15.0):
    """Print each step's status changes, and its progress now and then, until the end."""
    shown: dict[str, tuple[str, float]] = {}
    while True:
        try:
            job = client.get_job(job_id)
        except httpx.TransportError as exc:  # the job runs on; so does following it
            log(f"the service did not answer ({type(exc).__name__}); asking again")
            time.sleep(every)
            continue
        now = time.monotonic()
        for c in job.children:
            prev = shown.get(c.id)
            changed = prev is None or prev[0] != c.status
            if changed or (c.status == "running" and now - prev[1] >= report):
                from api.commands import _fmt_progress

                extra = _fmt_progress(c.progress) if c.status == "running" else ""
                log(f"{c.step:<20} {c.status:<10} {extra}")
                shown[c.id] = (c.status, now)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(every)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=os.environ.get("DISTILLERY_URL", "http://127.0.0.1:8000"))
    main_job.add_options(ap)
    args = ap.parse_args(argv)

    data_dir = Path(args.data_dir)
    eval_data: Path | None = data_dir if data_dir.is_dir() else None
    from service.settings import get_settings

    alpaca, tasks, generated = main_job.dataset_and_tasks(
        args, get_settings().home_dir() / "generated-data"
    )
    note = main_job.generated_note(args, alpaca) if generated else ""
    if generated:
        eval_data = alpaca.parent
        log(note)
    ensure_service(args.url, eval_data)
    with Client(args.url) as client:
        ds = upload_once(client, alpaca)
        spec = main_job.pipeline_fields(args, ds, tasks)
        job_id = submit_once(client, spec)
        job = follow(client, job_id)
    if job.status != "succeeded":
        err = job.error.message if job.error else job.status
        log(f"pipeline {job.id} {job.status}: {err}")
        return 1
    from service.pipeline import print_table

    print_table(job.metrics)
    if note:
        print(f"\n{note}")
    print(f"\npipeline {job.id}; models {job.artifacts}")
    print(f"service running at {args.url} (docs: {args.url}/docs); stop it with Ctrl-C in its")
    print("terminal, or: kill -INT $(cat ${DISTILLERY_HOME:-~/.distillery}/up.pid)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
