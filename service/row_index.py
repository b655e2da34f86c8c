"""A dataset's row index, built when the dataset is written, so that any page of it (all
rows, or only those of one reason) and its per-reason counts are read without scanning
the rows: the web console's viewer opens a 1,000,000-row dataset as fast as a 10-row one
(``bench/viewer.py``; docs/performance.md).

Beside ``rows.jsonl`` in the artifact:

- ``rows.index.json``: ``{"version", "rows", "reasons": [name per code], "counts"}``;
- ``rows.spans.npy``: int64 ``(rows, 2)``, each row's byte start and end in rows.jsonl;
- ``rows.reasons.npy``: uint8 ``(rows,)``, each row's reason code (a distilled row's
  ``reason``: ok, empty, echoed_template, ... as ``service/templates.py`` writes them;
  ``""`` for a row without one, an uploaded dataset's).

Reading a page is then a slice of the spans (after ``flatnonzero`` over the reason
codes: 1 MB for a million rows) and one ranged read of rows.jsonl per row, which works
the same on a local disk and in an object store (``ArtifactStore.read_range``). A text
search cannot be indexed this way; it scans rows from the cursor on until the page is
full or a byte budget is spent, and says where to continue (``next_offset``).
"""

from __future__ import annotations

import io
import json
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from threading import Lock
from typing import Any

import numpy as np

from service.store import ArtifactStore

ROWS = "rows.jsonl"
INDEX = "rows.index.json"
SPANS = "rows.spans.npy"
REASONS = "rows.reasons.npy"
VERSION = 1
# A text search reads at most this much of rows.jsonl per page before it answers with
# what it found and where to go on: a page of a search answers in bounded time.
SEARCH_BUDGET_BYTES = 64 << 20


@dataclass(frozen=True)
class RowIndex:
    rows: int
    reasons: list[str]  # code -> name
    counts: dict[str, int]
    spans: np.ndarray
    codes: np.ndarray

    def positions(self, reason: str | None) -> np.ndarray:
        """Row numbers of one reason (all rows when None), in order."""
        if reason is None:
            return np.arange(self.rows)
        if reason not in self.reasons:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self.codes == self.reasons.index(reason))


def build(rows_path: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """(index document, spans, codes) of a JSONL file; blank lines are not rows."""
    starts, ends, names = [], [], []
    pos = 0
    with rows_path.open("rb") as fh:
        for line in fh:
            if line.strip():
                starts.append(pos)
                ends.append(pos + len(line.rstrip(b"\r\n")))
                row = json.loads(line)
                reason = row.get("reason") if isinstance(row, dict) else None
                names.append(reason if isinstance(reason, str) else "")
            pos += len(line)
    counts = Counter(names)
    reasons = sorted(counts, key=lambda r: (-counts[r], r))
    if len(reasons) > 255:
        raise ValueError(f"{len(reasons)} distinct reasons: the index holds at most 255")
    code_of = {r: i for i, r in enumerate(reasons)}
    codes = np.fromiter((code_of[n] for n in names), dtype=np.uint8, count=len(names))
    spans = np.stack([np.asarray(starts, np.int64), np.asarray(ends, np.int64)], axis=1)
    doc = {"version": VERSION, "rows": len(names), "reasons": reasons, "counts": dict(counts)}
    return doc, spans.reshape(-1, 2), codes


def write_index(folder: Path) -> dict:
    """Index ``folder/rows.jsonl`` (a dataset being written); return the index document."""
    doc, spans, codes = build(folder / ROWS)
    np.save(folder / SPANS, spans)
    np.save(folder / REASONS, codes)
    (folder / INDEX).write_text(json.dumps(doc))
    return doc


# Datasets are immutable by id: an index once read serves every later page. A few are
# kept (a million rows' index is 17 MB).
_CACHE: OrderedDict[tuple, RowIndex] = OrderedDict()
_CACHE_SIZE = 8
_LOCK = Lock()


def _read(store: ArtifactStore, dataset_id: str, name: str) -> bytes:
    return b"".join(store.read_range("dataset", dataset_id, name))


def load_index(store: ArtifactStore, dataset_id: str) -> RowIndex:
    """The dataset's index; one built now, in memory, for a dataset written before
    indexes were (read once, then cached like the others)."""
    key = (str(store.root), store.remote, dataset_id)
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    files = store.manifest("dataset", dataset_id).get("files") or {}
    if INDEX in files:
        doc = json.loads(_read(store, dataset_id, INDEX))
        spans = np.load(io.BytesIO(_read(store, dataset_id, SPANS)))
        codes = np.load(io.BytesIO(_read(store, dataset_id, REASONS)))
    else:
        doc, spans, codes = build(store.path("dataset", dataset_id) / ROWS)
    index = RowIndex(doc["rows"], doc["reasons"], doc["counts"], spans, codes)
    with _LOCK:
        _CACHE[key] = index
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return index


def _rows_at(store: ArtifactStore, dataset_id: str, spans: np.ndarray) -> list[dict]:
    """The rows at ``spans``: one ranged read when they lie close together (a page of
    all rows is contiguous), else one per row."""
    if not len(spans):
        return []
    first, last = int(spans[0][0]), int(spans[-1][1])
    if last - first <= 8 << 20:
        raw = b"".join(store.read_range("dataset", dataset_id, ROWS, first, last))
        return [json.loads(raw[int(a) - first : int(b) - first]) for a, b in spans]
    return [
        json.loads(b"".join(store.read_range("dataset", dataset_id, ROWS, int(a), int(b))))
        for a, b in spans
    ]


def _matches(row: Any, needle: str) -> bool:
    """Whether any string value of the row contains ``needle`` (lower case)."""
    if isinstance(row, str):
        return needle in row.lower()
    if isinstance(row, dict):
        return any(_matches(v, needle) for v in row.values())
    if isinstance(row, list):
        return any(_matches(v, needle) for v in row)
    return False


def read_page(
    store: ArtifactStore,
    dataset_id: str,
    offset: int = 0,
    limit: int = 20,
    reason: str | None = None,
    q: str | None = None,
) -> dict:
    """A page of rows: ``{"data": [{"index", "row"}], "total", "offset", "next_offset"}``.

    ``offset`` counts rows of the selection (all rows, or those of ``reason``).
    ``total`` is the selection's size, None with a text search ``q`` (a search scans:
    its ``next_offset`` is where the scan stopped, None at the end)."""
    index = load_index(store, dataset_id)
    pos = index.positions(reason)
    if not q:
        chosen = pos[offset : offset + limit]
        rows = _rows_at(store, dataset_id, index.spans[chosen])
        end = offset + len(chosen)
        return {
            "data": [{"index": int(i), "row": r} for i, r in zip(chosen, rows, strict=True)],
            "total": int(len(pos)),
            "offset": offset,
            "next_offset": end if end < len(pos) else None,
        }
    data, k = _search(store, dataset_id, index, pos, offset, limit, q.lower())
    return {"data": data, "total": None, "offset": offset,
            "next_offset": k if k < len(pos) else None}  # fmt: skip


def _search(store, dataset_id, index, pos, k: int, limit: int, needle: str):
    """Scan the selection from its ``k``-th row, reading rows.jsonl sequentially in big
    chunks (one ranged read per chunk in an object store), until ``limit`` rows match,
    the selection ends or ``SEARCH_BUDGET_BYTES`` are read; return (rows, where it
    stopped). Raw bytes are tested first (cheap), then the decoded values (a key name is
    no match). Rows are UTF-8 in the file (ensure_ascii=False); a query with characters
    JSON escapes is looked for escaped."""
    raw_needle = json.dumps(needle, ensure_ascii=False)[1:-1].encode()
    data: list[dict] = []
    if k >= len(pos):
        return data, k
    base = int(index.spans[pos[k]][0])
    buf = bytearray()
    chunk = max(1 << 16, min(1 << 20, SEARCH_BUDGET_BYTES))
    chunks = store.read_range("dataset", dataset_id, ROWS, base, chunk=chunk)
    spent = 0  # bytes of the rows scanned

    def done() -> bool:
        return k >= len(pos) or len(data) >= limit or spent >= SEARCH_BUDGET_BYTES

    try:
        for piece in chunks:
            buf += piece
            while not done():
                start, end = (int(x) for x in index.spans[pos[k]])
                if end > base + len(buf):
                    break
                raw = bytes(buf[start - base : end - base])
                k += 1
                spent += len(raw)
                if raw_needle in raw.lower():
                    row = json.loads(raw)
                    if _matches(row, needle):
                        data.append({"index": int(pos[k - 1]), "row": row})
            if done():
                break
            drop = min(int(index.spans[pos[k]][0]) - base, len(buf))  # what no row needs
            if drop > 0:
                del buf[:drop]
                base += drop
    finally:
        chunks.close()
    return data, k


def counts(store: ArtifactStore, dataset_id: str) -> dict:
    """``{"rows", "reasons": {name: rows}}``, from the index."""
    index = load_index(store, dataset_id)
    return {"rows": index.rows, "reasons": dict(index.counts)}
