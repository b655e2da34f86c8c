"""`distillery up` as a user runs it: Redis, API and workers come up, a job runs through
the CLI client commands, Ctrl-C stops every piece, and a restart finds the job again
(Redis' append-only file)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ALPACA_ROWS
from tests.redis_fixture import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def start_up(home: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DISTILLERY_REDIS_URL")}
    env.update(DISTILLERY_HOME=str(home), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen(
        [sys.executable, "-m", "api.cli", "up", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=(home / "up.err").open("wb"),
        text=True,
    )


def wait_ready(url: str, proc: subprocess.Popen, home: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, (home / "up.err").read_text()
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("service not ready: " + (home / "up.err").read_text())


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    return proc.wait(90)


def pieces(home: Path) -> list[str]:
    """Processes of this service still alive (matched by their home in the environment)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"DISTILLERY_HOME={home}".encode() in env or str(home / "redis") in cmd:
            out.append(cmd)
    return out


def descendants(root: int) -> set[int]:
    """Every live process below ``root`` (by parent pid). Matching by environment alone
    misses pieces whose title was rewritten (RQ workers and redis-server do it; with
    setproctitle, which vLLM brings, the rewrite overwrites /proc/PID/environ)."""
    parent: dict[int, int] = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            parent[int(pid)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = set(), [root]
    while todo:
        here = todo.pop()
        kids = [p for p, pp in parent.items() if pp == here]
        found.update(kids)
        todo += kids
    return found


def alive(pids: set[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


def cli(home: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DISTILLERY_HOME=str(home), DISTILLERY_URL=url)
    env.pop("DISTILLERY_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_up_runs_a_job_stops_cleanly_and_keeps_it(tmp_path, tiny_llama):
    from api.redis_server import free_port

    home, port = tmp_path / "home", free_port()
    home.mkdir()
    url = f"http://127.0.0.1:{port}"
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ALPACA_ROWS[:3]))

    proc = start_up(home, port)
    try:
        wait_ready(url, proc, home)
        key_file = home / "api_key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        printed = wait_for(lambda: "API key" in (home / "up.err").read_text(), 30, 0.2, "the key")
        assert printed and key_file.read_text().strip() in (home / "up.err").read_text()

        up = cli(home, url, "datasets", "upload", str(data))
        assert up.returncode == 0, up.stderr
        ds = json.loads(up.stdout)["id"]
        # over the API a model is an id of the tenant's: the operator imports the directory
        imp = cli(home, url, "models", "import", str(tiny_llama), "--tenant", "local")
        assert imp.returncode == 0, imp.stderr
        model = imp.stdout.strip()
        sub = cli(home, url, "jobs", "submit", "distill", "--teacher", model,
                  "--dataset", ds, "--max-new-tokens", "4", "--watch")  # fmt: skip
        assert sub.returncode == 0, sub.stderr
        job_id = json.loads(sub.stdout)["id"]
        assert "status succeeded" in sub.stderr
        listed = cli(home, url, "jobs", "list")
        assert job_id in listed.stdout and "succeeded" in listed.stdout
        result = cli(home, url, "jobs", "result", job_id)
        assert len(result.stdout.splitlines()) == 3
        bad = cli(home, url, "jobs", "get", "job_" + "0" * 20)
        assert bad.returncode == 1 and "404 not_found" in bad.stderr
    finally:
        code = stop(proc)
    assert code == 0
    assert pieces(home) == []  # Redis, API and both workers are gone

    proc = start_up(home, port)  # the same home: the same Redis data
    try:
        wait_ready(url, proc, home)
        key = (home / "api_key").read_text().strip()
        job = httpx.get(f"{url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"})
        assert job.status_code == 200 and job.json()["status"] == "succeeded"
    finally:
        assert stop(proc) == 0


def redis_servers(home: Path) -> list[int]:
    """Pids of redis-server processes with a file of this home's Redis folder open (a
    redis-server rewrites its command line, so it is found by its open files)."""
    from api.lifeline import holders

    def comm(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:  # ended meanwhile
            return ""

    return [pid for pid in holders(home / "redis") if comm(pid) == "redis-server"]


def test_a_killed_up_leaves_nothing_and_a_restart_keeps_everything(tmp_path):
    """SIGKILL (what the OOM killer or a closed terminal does): no piece outlives `up`;
    the jobs and keys written up to the kill are there after a restart."""
    from api.redis_server import free_port

    home, port = tmp_path / "home", free_port()
    home.mkdir()
    url = f"http://127.0.0.1:{port}"
    proc = start_up(home, port)
    try:
        wait_ready(url, proc, home)
        assert len(redis_servers(home)) == 1
        key = (home / "api_key").read_text().strip()
        auth = {"Authorization": f"Bearer {key}"}
        rows = "".join(json.dumps(r) + "\n" for r in ALPACA_ROWS[:2])
        ds = httpx.post(
            f"{url}/v1/datasets",
            content=rows,
            headers={**auth, "Content-Type": "application/x-ndjson"},
        ).json()["id"]
        # a hub teacher, offline: the job fails at once and costs no compute
        job = httpx.post(f"{url}/v1/jobs", headers=auth, json={
            "type": "distill", "teacher": "org/name", "dataset": ds}).json()  # fmt: skip
        assert job["status"] == "queued", job

        # A second `up` on this live home: refused, and it starts no Redis of its own.
        second = subprocess.run(
            [sys.executable, "-m", "api.cli", "up", "--port", str(free_port())],
            cwd=ROOT, env={**os.environ, "DISTILLERY_HOME": str(home)},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode == 1 and "another `distillery up`" in second.stderr
        assert "redis-server" in second.stderr  # it names the pieces it found
        assert len(redis_servers(home)) == 1

        made = cli(home, url, "keys", "create", "--tenant", "other")  # just before the kill
        assert made.returncode == 0, made.stderr
        other = made.stdout.strip()
        kids = descendants(proc.pid)
        assert len(kids) >= 4  # Redis, API, two workers (and maybe a job's child)
    finally:
        proc.kill()  # SIGKILL: `up` gets no chance to stop anything
        proc.wait()
    killed = time.monotonic()
    left = wait_for(lambda: not alive(kids) and not pieces(home), 15, 0.1, "the pieces to end")
    assert left, (alive(kids), pieces(home))
    print(f"every piece ended {time.monotonic() - killed:.2f}s after SIGKILL of up")

    proc = start_up(home, port)
    try:
        wait_ready(url, proc, home)
        assert len(redis_servers(home)) == 1
        got = httpx.get(f"{url}/v1/jobs/{job['id']}", headers=auth)
        assert got.status_code == 200 and got.json()["spec"]["dataset"] == ds
        assert httpx.get(f"{url}/v1/datasets/{ds}", headers=auth).status_code == 200
        lst = httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {other}"})
        assert lst.status_code == 200, lst.text  # the key made a moment before the kill
    finally:
        assert stop(proc) == 0
    assert pieces(home) == []


def test_up_refuses_a_home_whose_redis_is_alive(tmp_path):
    """A Redis still working on the home's files (an earlier stack's, or one started by
    hand): `up` says so and exits, and never starts a second server on the same AOF."""
    from api.redis_server import free_port

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DISTILLERY_REDIS_URL")}
    env["DISTILLERY_HOME"] = str(home)
    first = subprocess.Popen(
        [sys.executable, "-m", "api.redis_server"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        redis_url = first.stdout.readline().strip()
        assert redis_url.startswith("redis://")
        [pid] = redis_servers(home)
        up = subprocess.run(
            [sys.executable, "-m", "api.cli", "up", "--port", str(free_port())],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert up.returncode == 1, up.stderr
        assert "in use by" in up.stderr and f"pid {pid}" in up.stderr, up.stderr
        assert redis_servers(home) == [pid]  # no second server on the same files
    finally:
        # SIGTERM, not SIGINT: a test run started as a background job of a script
        # inherits SIGINT ignored, and so would this process.
        first.send_signal(signal.SIGTERM)
        first.wait(30)
    assert redis_servers(home) == []


def test_up_restarts_a_redis_that_dies_and_a_running_job_finishes(tmp_path, tiny_llama):
    """Redis SIGKILLed under a running distill job: `up` starts it again on its port from
    its append-only file, the API and the workers reconnect by themselves, and the job
    finishes with every row, no person acting."""
    from api.redis_server import free_port

    home, port = tmp_path / "home", free_port()
    home.mkdir()
    url = f"http://127.0.0.1:{port}"
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (ALPACA_ROWS * 16)[:48]))
    proc = start_up(home, port)
    try:
        wait_ready(url, proc, home)
        auth = {"Authorization": f"Bearer {(home / 'api_key').read_text().strip()}"}
        ds = json.loads(cli(home, url, "datasets", "upload", str(data)).stdout)["id"]
        model = cli(home, url, "models", "import", str(tiny_llama), "--tenant", "local")
        job = httpx.post(f"{url}/v1/jobs", headers=auth, json={
            "type": "distill", "teacher": model.stdout.strip(), "dataset": ds,
            "max_new_tokens": 48, "engine": "hf"}).json()  # fmt: skip

        def running() -> bool:
            got = httpx.get(f"{url}/v1/jobs/{job['id']}", headers=auth).json()
            return got["status"] == "running" and got["progress"].get("rows_done", 0) > 0

        wait_for(running, 240, 0.2, "the job to be running with rows written")
        (old,) = redis_servers(home)
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: "restarted Redis" in (home / "up.err").read_text(), 60, 0.2,
                 "up to restart Redis")  # fmt: skip
        assert [p for p in redis_servers(home) if p != old]

        def finished() -> dict | None:
            try:
                got = httpx.get(f"{url}/v1/jobs/{job['id']}", headers=auth, timeout=5)
            except httpx.HTTPError:
                return None
            if got.status_code == 200 and got.json()["status"] in ("succeeded", "failed"):
                return got.json()
            return None

        done = wait_for(finished, 300, 0.5, "the job to finish after the restart")
        assert done["status"] == "succeeded", done
        rows = httpx.get(f"{url}/v1/jobs/{job['id']}/result", headers=auth).text.splitlines()
        assert len(rows) == 48
        wait_ready(url, proc, home, timeout=60)  # both workers back on their queues
    finally:
        assert stop(proc) == 0
    assert pieces(home) == []
