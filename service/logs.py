"""Log lines of the API and the workers, as text or as one JSON object per line
(``DISTILLERY_LOG_FORMAT=json``, python-json-logger), with the job id and tenant of the
work in hand on every line logged while it runs.

    from service import logs
    logs.configure()                          # once per process: API, worker, job child
    with logs.context(job_id=job_id, tenant=tenant):
        log.info("loaded teacher %s", ref)    # {"message": ..., "job_id": ..., "tenant": ...}

The job id and tenant travel in a ``contextvars`` variable rather than in every call's
``extra=``: the code that logs (rq, service modules) does not know them. The variable
holds a dict that :func:`bind` fills in place, so a value found later in the same
request or job (the API learns the tenant in its auth dependency, after the request
log's context was opened) still reaches the lines logged after it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import IO, Any

FIELDS = ("job_id", "tenant")
CONTEXT: ContextVar[dict[str, Any] | None] = ContextVar("distillery_log_context", default=None)
# Loggers that bring handlers of their own; theirs are dropped so every line has one format.
PROPAGATE = ("uvicorn", "uvicorn.error", "uvicorn.access", "rq.worker", "rq.job")


@contextmanager
def context(**fields: Any) -> Iterator[dict[str, Any]]:
    """Fields (job_id, tenant) added to every record logged inside the block."""
    outer = CONTEXT.get() or {}
    doc = {**outer, **{k: v for k, v in fields.items() if v is not None}}
    token = CONTEXT.set(doc)
    try:
        yield doc
    finally:
        CONTEXT.reset(token)


def bind(**fields: Any) -> None:
    """Add fields to the current context (no-op outside one)."""
    doc = CONTEXT.get()
    if doc is not None:
        doc.update({k: v for k, v in fields.items() if v is not None})


class ContextFilter(logging.Filter):
    """Copies the context onto each record; ``record.context`` is its text form."""

    def filter(self, record: logging.LogRecord) -> bool:
        doc = CONTEXT.get() or {}
        for k, v in doc.items():
            if not hasattr(record, k):
                setattr(record, k, v)
        shown = [f"{k}={getattr(record, k)}" for k in FIELDS if getattr(record, k, None)]
        record.context = f" [{' '.join(shown)}]" if shown else ""
        return True


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        # Extra attributes of a record (job_id, tenant, a request's status...) become
        # keys of their own; "context" is the text form only.
        return JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            reserved_attrs=[*logging.LogRecord("", 0, "", 0, "", (), None).__dict__, "context"],
        )
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s%(context)s %(message)s")


def configure(fmt: str | None = None, level: str | None = None, stream: IO | None = None) -> None:
    """Route every log record of this process through one handler of the chosen format
    (default: the settings'). Idempotent: a second call replaces the handler it added."""
    if fmt is None or level is None:
        from service.settings import get_settings

        s = get_settings()
        fmt, level = fmt or s.log_format, level or s.log_level
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(formatter(fmt))
    handler._distillery = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_distillery", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in PROPAGATE:
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
