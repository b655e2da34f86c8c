"""Keep server paths out of what a client reads.

    from service.redact import redact, redact_text
    redact_text("saved 24 blocks to /srv/distillery/jobs/job_1/model")  # 'saved 24 blocks to …/model'
    redact({"out": "/srv/distillery/jobs/job_1/rows.jsonl", "rows": 8})

Job records, their events and metrics, and error messages reach API clients; the
messages the core writes (and the exceptions of the libraries under it) name files on
the server: the store, the builtin model's copy, the Python installation. Every path
is replaced by ``…/<its last component>``, which says which file without saying where.
The whole message, paths included, stays in the server's log.

A path is recognised by where it starts: a root of this process (``$DISTILLERY_HOME``,
``$HOME``, the working directory, the Python prefix, the temporary directory, the
Hugging Face cache), ``~/``, or one of the usual top-level folders of a Unix machine.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

TOP_LEVEL = (
    "home", "root", "tmp", "usr", "opt", "var", "etc", "srv", "mnt", "data", "work", "proc",
    "sys", "run", "media", "nix", "lib", "lib64", "bin", "sbin", "dev", "scratch", "gpfs",
    "lustre", "fsx", "private", "Users", "Volumes", "workspace",
)  # fmt: skip
# What ends a path inside a message: space, quotes, brackets, separators.
PATH_CHARS = r"[^\s'\"`,;:()\[\]{}<>]*"


def _roots() -> list[str]:
    roots = {
        Path.home(),
        Path.cwd(),
        Path(sys.prefix),
        Path(sys.base_prefix),
        Path(tempfile.gettempdir()),
    }
    for var in ("DISTILLERY_HOME", "HF_HOME", "HF_HUB_CACHE", "DISTILLERY_EVAL_DATA", "TMPDIR"):
        if os.environ.get(var):
            roots.add(Path(os.environ[var]).expanduser())
    out = set()
    for r in roots:
        for form in (r, r.resolve()):
            text = str(form).rstrip("/")
            if len(text) > 1:  # never "/" itself
                out.add(text)
    return sorted(out, key=len, reverse=True)


@lru_cache(maxsize=8)
def _pattern(roots: tuple[str, ...]) -> re.Pattern[str]:
    starts = [re.escape(r) + r"(?=/|\b)" for r in roots]
    starts += [r"~[\w.-]*/", r"/(?:" + "|".join(TOP_LEVEL) + r")(?=/)"]
    # Not inside a URL ("http://host/tmp/x"), a word or base64 text ("ab+/tmp/").
    return re.compile(r"(?<![\w:/+=.~-])(?:" + "|".join(starts) + r")" + PATH_CHARS)


def _short(match: re.Match[str]) -> str:
    name = match.group(0).rstrip("/").rsplit("/", 1)[-1]
    return f"…/{name}" if name and not name.startswith("~") else "…"


def redact_text(text: str) -> str:
    """``text`` with every server path replaced by ``…/<last component>``."""
    if "/" not in text:
        return text
    return _pattern(tuple(_roots())).sub(_short, text)


def redact(value: Any) -> Any:
    """``redact_text`` on every string inside dicts and lists (keys are left alone)."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value
