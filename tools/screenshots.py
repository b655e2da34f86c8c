"""Screenshots of the web console for the README (docs/console/*.png), made on purpose
by ``make screenshots`` and committed; ``make test`` never writes them.

    .venv/bin/python -m tools.screenshots --data-dir ../shared/data --out docs/console

Starts ``distillery up`` on a fresh temporary home (Redis, the API, a teacher and a
trainer worker), then through the API: uploads 24 Alpaca rows, distills them with the
builtin teacher (SmolLM2-135M-Instruct, 64 new tokens), prunes the builtin by 6 blocks,
fine-tunes the pruned model on the distilled rows (the loss curve). Debian's chromium, driven by Playwright, signs in and captures each page. Takes a
few minutes on a CPU; ``up`` is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from api.client import Client
from api.redis_server import free_port


def start_up(home: Path) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    env = dict(os.environ, DISTILLERY_HOME=str(home))
    env.pop("REDIS_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "up", "--port", str(port)], env=env,
        stdout=subprocess.PIPE, stderr=(home / "up.log").open("wb"), start_new_session=True,
    )  # fmt: skip
    url = proc.stdout.readline().decode().strip()  # printed once the API answers
    if not url:
        raise SystemExit(f"distillery up did not start: {(home / 'up.log').read_text()[-3000:]}")
    return proc, url, (home / "api_key").read_text().strip()


def wait(c: Client, job_id: str, timeout: float = 3600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            job = c.wait(job_id, timeout=max(deadline - time.monotonic(), 1), poll=0.5)
            break
        except httpx.TransportError:  # a busy machine: ask again
            if time.monotonic() > deadline:
                raise
    if job.status != "succeeded":
        raise SystemExit(f"{job_id} {job.status}: {job.error}")
    return job


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("docs/console"))
    ap.add_argument("--rows", type=int, default=24)
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    rows = json.loads((args.data_dir / "alpaca" / "alpaca_5000.json").read_text())[: args.rows]
    home = Path(tempfile.mkdtemp(prefix="distillery-screens-"))
    proc, url, key = start_up(home)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with Client(url, key, timeout=600) as c:
            ds = c.upload_dataset(("".join(json.dumps(r) + "\n" for r in rows)).encode(),
                                  name="alpaca-24.jsonl")  # fmt: skip
            distill = c.submit_job("distill", dataset=ds.id, max_new_tokens=64)
            prune = c.submit_job("prune", calibration=ds.id, blocks=6, samples=16)
            distilled = wait(c, distill.id).artifacts["dataset"]
            pruned = wait(c, prune.id).artifacts["model"]
            ft = c.submit_job("finetune", model=pruned, dataset=distilled, epochs=2,
                              batch_size=4, micro_batch_size=4, max_length=128)  # fmt: skip
            with sync_playwright() as p:
                browser = p.chromium.launch(
                    executable_path=shutil.which("chromium"), args=["--no-sandbox"]
                )
                page = browser.new_page(base_url=url, viewport={"width": 1360, "height": 900})
                page.set_default_timeout(300_000)  # a busy machine answers slowly

                def shot(name: str, path: str | None = None, full: bool = True) -> None:
                    if path:
                        page.goto(path)
                    page.screenshot(path=str(args.out / f"{name}.png"), full_page=full)
                    print(args.out / f"{name}.png", file=sys.stderr)

                page.goto("/ui/login")
                shot("login", full=False)
                page.fill("input[name=api_key]", key)
                page.click("button:text('Sign in')")
                # The jobs table while the fine-tune trains: its bar moves.
                deadline = time.monotonic() + 600
                while c.get_job(ft.id).progress.get("step", 0) < 3 and time.monotonic() < deadline:
                    time.sleep(0.5)
                shot("jobs", "/ui", full=False)
                wait(c, ft.id)
                shot("job", f"/ui/jobs/{ft.id}")
                shot("viewer", f"/ui/datasets/{distilled}")
                stats = c.http.get(f"/v1/datasets/{distilled}/stats").json()["reasons"]
                rejected = max((r for r in stats if r != "ok"), key=stats.get, default=None)
                if rejected:
                    shot("viewer-filtered", f"/ui/datasets/{distilled}?reason={rejected}")
                shot("datasets", "/ui/datasets", full=False)
                recovered = c.get_job(ft.id).artifacts["model"]
                shot("models", "/ui/models", full=False)
                shot("model", f"/ui/models/{recovered}")
                shot("new", "/ui/new")
                browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # `up` stops its pieces in order
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
