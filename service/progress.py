"""Progress and cancellation for long work.

Every ``run_*`` function takes a :class:`Reporter`. The CLI passes a console one (a
progress bar on a terminal, plain lines otherwise); workers pass one that writes the
job record and its event stream. ``check()`` raises CancelledError when the job was
cancelled, so running work stops at the next batch or step.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from service.errors import CancelledError


class Reporter:
    """No-op reporter; subclasses override what they need."""

    def progress(self, **fields: Any) -> None:
        """Latest counters: rows_done/rows_total, step/steps_total, loss, tokens_per_s..."""

    def event(self, message: str, level: str = "info", **data: Any) -> None:
        """Something worth a line in the job's history."""

    def cancelled(self) -> bool:
        return False

    def check(self) -> None:
        if self.cancelled():
            raise CancelledError("cancelled")


class ConsoleReporter(Reporter):
    """tqdm bar when stderr is a terminal, else a line every ``every`` seconds."""

    def __init__(self, desc: str = "", every: float = 10.0):
        self.desc = desc
        self.every = every
        self._last = 0.0
        self._bar = None

    def progress(self, **fields: Any) -> None:
        done = fields.get("rows_done", fields.get("step"))
        total = fields.get("rows_total", fields.get("steps_total"))
        extra = {
            k: v
            for k, v in fields.items()
            if k not in ("rows_done", "rows_total", "step", "steps_total")
        }
        if sys.stderr.isatty() and done is not None and total:
            from tqdm import tqdm

            if self._bar is None or self._bar.total != total:
                self._bar = tqdm(total=total, desc=self.desc, dynamic_ncols=True)
            self._bar.n = done
            self._bar.set_postfix({k: _fmt(v) for k, v in extra.items()}, refresh=True)
            return
        now = time.monotonic()
        if now - self._last >= self.every or (done is not None and done == total):
            self._last = now
            parts = [f"{done}/{total}"] if done is not None else []
            parts += [f"{k}={_fmt(v)}" for k, v in extra.items()]
            print(f"[{self.desc}] " + " ".join(parts), file=sys.stderr, flush=True)

    def event(self, message: str, level: str = "info", **data: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        print(f"[{self.desc}] {level}: {message}", file=sys.stderr, flush=True)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
