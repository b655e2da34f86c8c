"""Dataset formats and validation.

Reads ``.jsonl`` and ``.json`` files (or raw bytes from an upload) in four shapes and
normalises them to one :class:`Row`:

- Alpaca / Dolly: ``instruction``, optional ``input``, ``output``
- GSM8K: ``question``, ``answer`` (final answer after ``####``) — marked ``math``
- chat: ``messages`` = ``[{"role", "content"}, ...]`` ending with an assistant turn
- ``prompt`` / ``response``
- plain text ``{"text": ...}``, for calibration only (``read_dataset(..., text=True)``;
  ``service/calibration.py`` also reads ``.txt`` files, one document per line)

A distilled row (any shape plus ``response``, ``original_response``, ``distilled``,
``reason``) trains on ``response``, the response distillation kept.

A malformed line or a missing field is an error naming the file, line and field;
nothing is dropped silently (blank lines in JSONL are not rows and are skipped).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from service.errors import DatasetError, RowError

MAX_ERRORS = 100  # errors listed before validation stops collecting


class Row(BaseModel):
    """One normalised training example."""

    model_config = ConfigDict(frozen=True)

    instruction: str
    input: str = ""
    response: str
    kind: Literal["general", "math"] = "general"
    system: str | None = None
    # Earlier chat turns before the final user turn (chat shape only).
    history: tuple[tuple[str, str], ...] = ()
    # The input object exactly as read; output rows keep these fields.
    source: dict[str, Any]

    @property
    def prompt(self) -> str:
        """The user turn: instruction plus its input, as Alpaca formats it."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction


def _need_str(obj: dict, key: str, line: int, errors: list[RowError], optional=False) -> str:
    if key not in obj:
        if not optional:
            errors.append(RowError(line, key, "missing field"))
        return ""
    value = obj[key]
    if not isinstance(value, str):
        errors.append(RowError(line, key, f"must be a string, got {type(value).__name__}"))
        return ""
    return value


def normalise(obj: Any, line: int, text: bool = False) -> tuple[Row | str | None, list[RowError]]:
    """Turn one parsed JSON value into a Row (or, with ``text``, a ``{"text": ...}`` row
    into its string), or the errors that prevent it."""
    errors: list[RowError] = []
    if not isinstance(obj, dict):
        return None, [RowError(line, None, f"must be a JSON object, got {type(obj).__name__}")]
    if "original_response" in obj and "response" in obj:
        return _from_distilled(obj, line)
    if "messages" in obj:
        return _from_chat(obj, line)
    if "question" in obj or "answer" in obj:
        q = _need_str(obj, "question", line, errors)
        a = _need_str(obj, "answer", line, errors)
        if not errors and not q.strip():
            errors.append(RowError(line, "question", "must not be empty"))
        if errors:
            return None, errors
        return Row(instruction=q, response=a, kind="math", source=obj), []
    if "prompt" in obj or "response" in obj:
        p = _need_str(obj, "prompt", line, errors)
        r = _need_str(obj, "response", line, errors)
        if not errors and not p.strip():
            errors.append(RowError(line, "prompt", "must not be empty"))
        if errors:
            return None, errors
        return Row(instruction=p, response=r, source=obj), []
    if "instruction" in obj or "output" in obj:
        ins = _need_str(obj, "instruction", line, errors)
        inp = _need_str(obj, "input", line, errors, optional=True)
        out = _need_str(obj, "output", line, errors)
        if not errors and not ins.strip():
            errors.append(RowError(line, "instruction", "must not be empty"))
        if errors:
            return None, errors
        return Row(instruction=ins, input=inp, response=out, source=obj), []
    if text and "text" in obj:
        doc = _need_str(obj, "text", line, errors)
        if not errors and not doc.strip():
            errors.append(RowError(line, "text", "must not be empty"))
        return (None, errors) if errors else (doc, [])
    shapes = "instruction/output, question/answer, messages, prompt/response"
    return None, [
        RowError(
            line,
            None,
            f"unknown row shape: expected {shapes}"
            + (", or text" if text else "")
            + ("" if text or "text" not in obj else " (text rows serve calibration only)"),
        )
    ]


# Fields a distilled row adds to its input row (see service/distill.py).
DISTILLED_FIELDS = ("response", "original_response", "distilled", "reason", "rejected_rewrite")


def _from_distilled(obj: dict, line: int) -> tuple[Row | None, list[RowError]]:
    """A distilled row: its input shape gives the prompt, ``response`` (the kept one) is
    the training target. Read as its input shape alone, an Alpaca row would train on
    ``output`` = the original response, and a prompt/response row would lose it."""
    errors: list[RowError] = []
    target = _need_str(obj, "response", line, errors)
    _need_str(obj, "original_response", line, errors)
    if errors:
        return None, errors
    base = {k: v for k, v in obj.items() if k not in DISTILLED_FIELDS}
    if "prompt" in base:
        base["response"] = obj["original_response"]
    row, errors = normalise(base, line)
    if not isinstance(row, Row):
        return None, errors
    return row.model_copy(update={"response": target, "source": obj}), []


def _from_chat(obj: dict, line: int) -> tuple[Row | None, list[RowError]]:
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        return None, [RowError(line, "messages", "must be a non-empty list")]
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            return None, [RowError(line, where, "must be an object with role and content")]
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            return None, [RowError(line, f"{where}.role", "must be system, user or assistant")]
        if not isinstance(content, str):
            return None, [RowError(line, f"{where}.content", "must be a string")]
        turns.append((role, content))
    system = turns[0][1] if turns[0][0] == "system" else None
    body = turns[1:] if system is not None else turns
    if len(body) < 2 or body[-1][0] != "assistant" or body[-2][0] != "user":
        return None, [
            RowError(line, "messages", "must end with a user turn followed by an assistant turn")
        ]
    if not body[-2][1].strip():
        return None, [RowError(line, "messages", "the last user turn must not be empty")]
    return (
        Row(
            instruction=body[-2][1],
            response=body[-1][1],
            system=system,
            history=tuple(body[:-2]),
            source=obj,
        ),
        [],
    )


def _json_lines(data: bytes, name: str) -> Iterator[tuple[int, Any, RowError | None]]:
    for i, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield (
                i,
                None,
                RowError(i, None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})", name),
            )
            continue
        try:
            yield i, json.loads(text), None
        except json.JSONDecodeError as exc:
            yield i, None, RowError(i, None, f"invalid JSON: {exc.msg} (column {exc.colno})", name)


def parse_rows(
    data: bytes, name: str = "<upload>", fmt: str | None = None, text: bool = False
) -> list[Row]:
    """Parse and validate a whole dataset; raise DatasetError listing the bad rows.

    ``fmt`` is ``jsonl`` or ``json``; by default it follows the name's suffix, and a
    body that starts with ``[`` is read as a JSON array. ``text``: ``{"text": ...}`` rows
    are accepted too and come back as strings (calibration sets).
    """
    if fmt is None:
        fmt = "json" if name.endswith(".json") or data.lstrip()[:1] == b"[" else "jsonl"
    items: Iterable[tuple[int, Any, RowError | None]]
    if fmt == "json":
        try:
            doc = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DatasetError([RowError(1, None, f"not valid UTF-8: {exc.reason}", name)]) from exc
        except json.JSONDecodeError as exc:
            raise DatasetError(
                [RowError(exc.lineno, None, f"invalid JSON: {exc.msg}", name)]
            ) from exc
        if not isinstance(doc, list):
            raise DatasetError(
                [RowError(1, None, "a .json dataset must be an array of rows", name)]
            )
        # In a JSON array, "line" is the 1-based position of the row in the array.
        items = ((i, obj, None) for i, obj in enumerate(doc, start=1))
    else:
        items = _json_lines(data, name)
    rows: list = []
    errors: list[RowError] = []
    for line, obj, err in items:
        if err is None:
            row, errs = normalise(obj, line, text)
            errs = [RowError(e.line, e.field, e.message, name) for e in errs]
        else:
            row, errs = None, [err]
        if errs:
            errors.extend(errs)
            if len(errors) >= MAX_ERRORS:
                break
        elif row is not None:
            rows.append(row)
    if errors:
        raise DatasetError(errors[:MAX_ERRORS], summary=f"{name} has invalid rows")
    if not rows:
        raise DatasetError([], summary=f"{name} holds no rows")
    return rows


def read_dataset(path: str | Path, limit: int | None = None, text: bool = False) -> list[Row]:
    """Read a dataset file; ``limit`` keeps the first K rows (after validation).
    ``text``: plain-text rows are accepted too (see ``parse_rows``)."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError([], summary=f"dataset file not found: {p}")
    rows = parse_rows(p.read_bytes(), name=str(p), text=text)
    return rows[:limit] if limit else rows


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Write rows atomically (temporary name, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def dataset_path(ref: str) -> Path:
    """A dataset reference is a file path (CLI) or a dataset id ``ds_...`` of the store."""
    from service.store import get_store, is_artifact_id

    if is_artifact_id(ref):
        return get_store().path("dataset", ref) / "rows.jsonl"
    return Path(ref).expanduser()


def load_rows(ref: str, limit: int | None = None) -> list[Row]:
    """Read the rows of a dataset reference (path or id)."""
    return read_dataset(dataset_path(ref), limit=limit)
