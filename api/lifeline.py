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


def describe(pids: list[int]) -> str:
    """``pid 123 (redis-server ...)`` for each pid, for a message to an operator."""
    out = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            cmd = "?"
        out.append(f"pid {pid} ({cmd[:80]})")
    return ", ".join(out)
