"""Datasets of the store, as the API sees them: validated uploads saved per tenant.

An upload is parsed and validated by ``service.datasets.parse_rows`` (every bad line is
reported with its line, field and message) and saved as ``rows.jsonl`` (one input object
per line, exactly as read) in a ``dataset`` artifact whose manifest carries the tenant.
"""

from __future__ import annotations

import json
from collections import Counter

from service.datasets import parse_rows
from service.errors import DatasetError, DistilleryError, RowError
from service.row_index import write_index
from service.settings import get_settings
from service.store import ArtifactStore, NotFound, new_id


class TooLarge(DistilleryError):
    code = "too_large"


def check_limits(rows: list, name: str) -> None:
    """DISTILLERY_MAX_DATASET_ROWS (413) and DISTILLERY_MAX_ROW_KB (422, per line)."""
    settings = get_settings()
    if len(rows) > settings.max_dataset_rows:
        raise TooLarge(
            f"{name} has {len(rows)} rows; the limit is {settings.max_dataset_rows} "
            "(DISTILLERY_MAX_DATASET_ROWS)",
            {"rows": len(rows), "limit": settings.max_dataset_rows},
        )
    limit = int(settings.max_row_kb * 1024)
    errors = []
    for i, row in enumerate(rows, start=1):
        size = len(json.dumps(row.source, ensure_ascii=False).encode())
        if size > limit:
            errors.append(
                RowError(
                    i,
                    None,
                    f"row of {size} bytes is over the {limit}-byte limit (DISTILLERY_MAX_ROW_KB)",
                    name,
                )  # fmt: skip
            )
    if errors:
        raise DatasetError(errors[:100], summary=f"{name} has rows over the size limit")


def save_dataset(
    store: ArtifactStore, tenant: str, data: bytes, name: str, source: str = "upload"
) -> dict:
    """Validate ``data`` (JSONL or a JSON array) and store it; return the manifest."""
    rows = parse_rows(data, name=name)
    check_limits(rows, name)
    body = "".join(json.dumps(r.source, ensure_ascii=False) + "\n" for r in rows).encode()
    kinds = dict(Counter(r.kind for r in rows))
    art_id = new_id("dataset")
    with store.create(
        "dataset", artifact_id=art_id, tenant=tenant, name=name, rows=len(rows), bytes=len(body), kinds=kinds,
        source=source,
    ) as tmp:  # fmt: skip
        (tmp / "rows.jsonl").write_bytes(body)
        write_index(tmp)  # the console's viewer pages through it (service/row_index.py)
    return store.manifest("dataset", art_id)


def owned(store: ArtifactStore, kind: str, artifact_id: str, tenant: str) -> dict:
    """The manifest of a tenant's artifact; another tenant's id is simply not found."""
    manifest = store.manifest(kind, artifact_id)
    if manifest.get("tenant") != tenant:
        raise NotFound(f"no {kind} {artifact_id!r}")
    return manifest


def page(items: list[dict], after: str | None, limit: int) -> tuple[list[dict], bool]:
    """Newest first; the page after the item whose id is ``after``."""
    items = sorted(items, key=lambda m: (m.get("created_at", 0), m["id"]), reverse=True)
    if after:
        ids = [m["id"] for m in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return items[:limit], len(items) > limit
