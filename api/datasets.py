"""Datasets of the store, as the API sees them: validated uploads saved per tenant.

An upload is parsed and validated by ``service.datasets.parse_rows`` (every bad line is
reported with its line, field and message) and saved as ``rows.jsonl`` (one input object
per line, exactly as read) in a ``dataset`` artifact whose manifest carries the tenant.
"""

from __future__ import annotations

import json
from collections import Counter

from service.datasets import parse_rows
from service.store import ArtifactStore, NotFound, new_id


def save_dataset(
    store: ArtifactStore, tenant: str, data: bytes, name: str, source: str = "upload"
) -> dict:
    """Validate ``data`` (JSONL or a JSON array) and store it; return the manifest."""
    rows = parse_rows(data, name=name)
    body = "".join(json.dumps(r.source, ensure_ascii=False) + "\n" for r in rows).encode()
    kinds = dict(Counter(r.kind for r in rows))
    art_id = new_id("dataset")
    with store.create(
        "dataset", artifact_id=art_id, tenant=tenant, name=name, rows=len(rows), bytes=len(body), kinds=kinds,
        source=source,
    ) as tmp:  # fmt: skip
        (tmp / "rows.jsonl").write_bytes(body)
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
