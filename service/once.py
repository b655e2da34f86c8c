"""Things made on first use and shared between processes: made once, published whole.

The converted builtin model, store artifacts fetched into a machine's cache: several
processes (a teacher and a trainer worker starting a pipeline's ``prune`` and ``distill``
steps at the same moment) may all find one missing at once. Each such
thing is made under an inter-process lock (``filelock``; the lock file sits beside the
target), by the one process holding it, into a temporary sibling that is renamed into
place when complete. The others wait on the lock, then find it done. A complete target is
never deleted to be replaced by an equal one: another process may be reading it.

    with made_once(out) as todo:
        if todo:             # only the first process gets here; the others wait, then skip
            build_into(tmp)
            publish(tmp, out)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock


def lock_for(target: Path) -> FileLock:
    """The lock guarding ``target``: ``.NAME.lock`` beside it (same filesystem, and never
    inside the folder that the rename publishes)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(target.with_name(f".{target.name}.lock")))


@contextmanager
def made_once(target: Path, done: Callable[[Path], bool] | None = None) -> Iterator[bool]:
    """Hold ``target``'s lock; yield True when it still has to be made (``done(target)``
    is false once the lock is held), False when another process made it meanwhile."""
    done = done or Path.exists
    target = Path(target)
    if done(target):  # the common case: no lock taken at all
        yield False
        return
    with lock_for(target):
        yield not done(target)


def publish(tmp: Path, target: Path) -> Path:
    """Rename the complete ``tmp`` into place. If ``target`` already exists (a complete
    artifact is immutable by name), keep it and discard ``tmp``: the existing one may be in
    use by another process, and replacing it would pull it from under that reader."""
    tmp, target = Path(tmp), Path(target)
    try:
        os.rename(tmp, target)  # a directory onto an existing non-empty one raises
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    return target
