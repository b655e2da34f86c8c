"""Tie a started process's life to its starter's, and find who still holds a folder.

    proc = subprocess.Popen(cmd, preexec_fn=parent_death_signal(signal.SIGTERM))
    holders(home / "redis")        # pids of processes with a file under it open

``distillery up`` starts Redis, the API and the workers in sessions of their own (so a
Ctrl-C reaches only it, and it stops them in order). A session of their own also means
that when ``up`` dies without stopping them (SIGKILL, the OOM killer, a closed terminal)
nothing ends them: Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``, set in the
child between fork and exec and kept across exec) does. It fires when the thread that
started the child ends, so ``up`` starts every piece from its main thread.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def parent_death_signal(sig: int) -> Callable[[], None]:
    """A ``preexec_fn`` that has the kernel send ``sig`` to the child when its parent
    dies; a child whose parent is already gone by then exits at once."""
    parent = os.getpid()

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            os._exit(70)  # not Linux, or refused: better no piece than an orphan
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(71)

    return preexec


def holders(folder: Path) -> list[int]:
    """Pids of the processes (of this user) with a file under ``folder`` open or as their
    working directory, read from ``/proc/<pid>/fd``; empty where /proc is missing."""
    root = str(Path(folder).resolve())
    prefix = root.rstrip("/") + "/"
    found: list[int] = []
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    me = os.getpid()
    for pid in pids:
        if pid == me:
            continue
        try:
            links = [f"/proc/{pid}/cwd"] + [
                f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")
            ]
        except OSError:  # gone, or another user's
            continue
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target == root or target.startswith(prefix):
                found.append(pid)
                break
    return found


# What each piece of `distillery up` is, by the module or executable it runs.
ROLES = {
    "redis-server": "Redis, the job store",
    "workers.worker": "worker",
    "workers.child": "a trainer job's process",
    "api.cli": "distillery",
    "uvicorn": "the API",
}


def name_of(argv: list[str]) -> str:
    """A process named by what it is, whole, whatever the path it was started from:
    ``redis-server (Redis, the job store)``, ``python -m workers.worker --queues teacher
    (worker)``; an unknown one by its executable's name and its arguments."""
    if not argv:
        return "?"
    exe = Path(argv[0]).name
    args = argv[1:]
    if exe.startswith("python") and len(args) >= 2 and args[0] == "-m":
        exe, args = f"python -m {args[1]}", args[2:]
        role = ROLES.get(exe.removeprefix("python -m "))
    else:
        role = ROLES.get(exe)
    shown = " ".join(a if len(a) <= 40 else Path(a).name for a in args[:4])
    text = f"{exe} {shown}".strip()
    return f"{text} ({role})" if role else text


def describe(pids: list[int]) -> str:
    """``pid 123 redis-server 127.0.0.1:6379 (Redis, the job store)`` for each pid, for a
    message to an operator."""
    out = []
    for pid in pids:
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            out.append(f"pid {pid} (?)")
            continue
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        if len(argv) == 1 and " " in argv[0]:  # a process that rewrote its title (RQ's)
            argv = argv[0].split()
        out.append(f"pid {pid} {name_of(argv)}")
    return ", ".join(out)
