"""Fixtures for the service tests: a real Redis (started the way ``distillery up`` starts
one: ``api.redis_server.start_redis``, AOF on, in a temp dir), flushed per test; the
API served by a real uvicorn on a free port; real worker processes
(``python -m workers.worker``); and API keys of fresh tenants.

Use from a test module with ``pytest_plugins = ["tests.redis_fixture"]``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory, session_home):
    from api.redis_server import start_redis

    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def flush(conn: redis.Redis) -> None:
    """Everything but the workers' own registrations (the session's workers stay alive)."""
    for key in conn.scan_iter(count=1000):
        if not key.startswith(b"rq:worker"):
            conn.delete(key)


@pytest.fixture
def redis_conn(redis_server) -> redis.Redis:
    conn = redis.Redis.from_url(redis_server.url)
    flush(conn)
    return conn


def wait_for(predicate, timeout: float = 60.0, every: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class LiveServer:
    """uvicorn serving the app in a thread of the test process."""

    def __init__(self, app):
        import uvicorn

        from api.redis_server import free_port

        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_for(lambda: self.server.started, 30, what="uvicorn to start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="session")
def api_url(redis_server) -> str:
    from api.app import create_app

    with LiveServer(create_app(redis_server.url)) as live:
        yield live.url


@pytest.fixture
def tenant_key(redis_conn) -> tuple[str, str]:
    """(tenant, API key) of a fresh tenant: its datasets and jobs start empty."""
    from api.keys import create_key

    tenant = f"t{uuid.uuid4().hex[:10]}"
    return tenant, create_key(redis_conn, tenant)


@pytest.fixture
def tiny_model(session_home, tiny_llama, tenant_key) -> str:
    """The tiny random Llama as a model id (mdl_...) of the fresh tenant: over the API,
    models are named by id, never by a path on the server (``distillery models import``)."""
    from service.models import import_model
    from service.store import ArtifactStore

    return import_model(ArtifactStore(session_home), tenant_key[0], tiny_llama)["id"]


@pytest.fixture
def api(api_url, tenant_key) -> httpx.Client:
    """An HTTP client of the live API, authenticated as a fresh tenant."""
    with httpx.Client(
        base_url=api_url, headers={"Authorization": f"Bearer {tenant_key[1]}"}, timeout=60
    ) as client:
        yield client


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory) -> Path:
    """Evaluation data for the workers: the generated ``arith`` task, and
    ``arith_rows.jsonl`` training rows (``service/synthetic.py``)."""
    from service.synthetic import write_synthetic

    folder = tmp_path_factory.mktemp("eval-data")
    write_synthetic(folder, rows=12, mc_docs=20)
    return folder


def start_worker(
    queues: str,
    url: str,
    home: Path,
    log: Path,
    eval_data: Path | None = None,
    *,
    name: str | None = None,
    fast_recovery: bool = False,
    **env: str | None,
) -> subprocess.Popen:
    """A ``workers.worker`` process. ``fast_recovery``: it notices dead peers fast
    (heartbeats every second, sweeps every 3). ``env``: more variables (None unsets)."""
    full = dict(os.environ, REDIS_URL=url, DISTILLERY_HOME=str(home), PYTHONUNBUFFERED="1")
    if eval_data is not None:
        full["DISTILLERY_EVAL_DATA"] = str(eval_data)
    for k, v in env.items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    cmd = [sys.executable, "-m", "workers.worker", "--queues", queues]
    if name:
        cmd += ["--name", name]
    if fast_recovery:
        cmd += ["--monitor-interval", "1", "--maintenance-interval", "3"]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=full, stdout=log.open("ab"), stderr=subprocess.STDOUT
    )


def own_db(redis_server, db: int) -> tuple[str, redis.Redis]:
    """A database of its own on the session's Redis (emptied): no other worker takes its
    jobs."""
    url = redis_server.url.rsplit("/", 1)[0] + f"/{db}"
    conn = redis.Redis.from_url(url)
    conn.flushdb()
    return url, conn


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM (warm), then SIGTERM again (cold), then SIGKILL."""
    for _ in range(2):
        if proc.poll() is None:
            proc.terminate()
            try:
                # at least 1.1 s: RQ ignores a second signal within one second
                proc.wait(max(timeout / 2, 1.1))
            except subprocess.TimeoutExpired:
                pass
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def workers(redis_server, session_home, tmp_path_factory, eval_data):
    """One teacher and one trainer worker, as `distillery up` runs them; their logs are
    under the yielded folder."""
    from rq import Queue, Worker

    logs = tmp_path_factory.mktemp("worker-logs")
    procs = {
        q: start_worker(q, redis_server.url, session_home, logs / f"{q}.log", eval_data)
        for q in ("teacher", "train")
    }
    conn = redis.Redis.from_url(redis_server.url)
    for q in procs:
        wait_for(
            lambda q=q: Worker.all(queue=Queue(q, connection=conn)) or procs[q].poll() is not None,
            120,
            what=f"the {q} worker to register",
        )
        assert procs[q].poll() is None, (logs / f"{q}.log").read_text()
    yield logs
    for p in procs.values():
        stop_process(p)
