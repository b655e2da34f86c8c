"""Errors the core raises on bad input. Each carries a stable ``code`` so the API can
map it to a status and a JSON body without knowing the details."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field


class DistilleryError(Exception):
    """Base class: a clear, user-facing problem with the input or the environment."""

    code = "error"

    def __init__(self, message: str, details: object | None = None):
        super().__init__(message)
        self.message = message
        self.details = details


class ModelError(DistilleryError):
    code = "invalid_model"


class SpecError(DistilleryError):
    code = "invalid_spec"


class CancelledError(DistilleryError):
    code = "cancelled"


@dataclass(frozen=True)
class RowError:
    """One problem in one row: where it is and what is wrong."""

    line: int
    field: str | None
    message: str
    file: str | None = None

    def as_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "field": self.field, "message": self.message}

    def __str__(self) -> str:
        where = f"{self.file}:" if self.file else "line "
        fld = f" field '{self.field}'" if self.field else ""
        return f"{where}{self.line}:{fld} {self.message}"


@dataclass
class DatasetError(DistilleryError):
    """A dataset failed validation; ``errors`` lists every bad row (capped)."""

    errors: list[RowError] = field(default_factory=list)
    summary: str = "invalid dataset"
    code = "invalid_dataset"

    def __post_init__(self) -> None:
        shown = "; ".join(str(e) for e in self.errors[:5])
        more = f" (+{len(self.errors) - 5} more)" if len(self.errors) > 5 else ""
        DistilleryError.__init__(
            self,
            f"{self.summary}: {shown}{more}" if shown else self.summary,
            [e.as_dict() for e in self.errors],
        )


def new_error_id() -> str:
    """The id that ties an error a client sees to the server's log lines about it."""
    return f"err_{uuid.uuid4().hex[:16]}"
