"""The row index written with every dataset: pages, one reason's pages, per-reason
counts and a text search give what a scan of the rows gives, locally and through the API.

    .venv/bin/python -m pytest tests/test_row_index.py -q
"""

from __future__ import annotations

import json
import random

import pytest

from service import row_index
from service.store import ArtifactStore
from tests.test_store import s3_server, s3_url  # noqa: F401  (fixtures: a moto S3 server)

pytest_plugins = ["tests.redis_fixture"]

REASONS = ["ok", "ok", "ok", "empty", "echoed_template", "leaked_template", "truncated"]


def distilled_rows(n: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        reason = rnd.choice(REASONS)
        rows.append({
            "instruction": f'Question {i}: what is {i} + {i}? «ünïcode» "quoted"',
            "output": f"It is {2 * i}.",
            "response": f"The sum is {2 * i}." if reason == "ok" else f"It is {2 * i}.",
            "original_response": f"It is {2 * i}.",
            "distilled": reason == "ok",
            "reason": reason,
        })  # fmt: skip
    return rows


def make(store: ArtifactStore, rows: list[dict], index: bool = True) -> str:
    with store.create("dataset", tenant="t1", rows=len(rows)) as tmp:
        (tmp / "rows.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        )
        if index:
            row_index.write_index(tmp)
    return store.list("dataset")[-1]["id"]


@pytest.mark.parametrize("indexed", [True, False])
def test_pages_reasons_and_counts_match_a_scan(tmp_path, indexed):
    store = ArtifactStore(tmp_path / "home")
    rows = distilled_rows(101)
    ds = make(store, rows, index=indexed)
    assert ("rows.index.json" in store.manifest("dataset", ds)["files"]) == indexed

    stats = row_index.counts(store, ds)
    expect = {r: sum(1 for x in rows if x["reason"] == r) for r in set(REASONS)}
    assert stats == {"rows": 101, "reasons": {k: v for k, v in expect.items() if v}}

    got, offset = [], 0
    while offset is not None:
        page = row_index.read_page(store, ds, offset, 7)
        assert page["total"] == 101
        got += page["data"]
        offset = page["next_offset"]
    assert [g["row"] for g in got] == rows and [g["index"] for g in got] == list(range(101))

    for reason in ("truncated", "empty", "no_answer"):
        want = [i for i, r in enumerate(rows) if r["reason"] == reason]
        page = row_index.read_page(store, ds, 2, 5, reason=reason)
        assert page["total"] == len(want)
        assert [d["index"] for d in page["data"]] == want[2:7]
        assert all(d["row"]["reason"] == reason for d in page["data"])


def test_a_search_scans_on_from_where_it_stopped(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path / "home")
    rows = distilled_rows(300, seed=1)
    rows[17]["instruction"] = "Tell me about <script>alert(1)</script> «Zürich»"
    ds = make(store, rows)
    page = row_index.read_page(store, ds, q="zürich")
    assert [d["index"] for d in page["data"]] == [17] and page["total"] is None
    assert page["next_offset"] is None
    # "instruction" is a key of every row, never a value's text: no match.
    assert row_index.read_page(store, ds, q="instruction")["data"] == []
    assert row_index.read_page(store, ds, q='"quoted"', limit=3)["data"][0]["index"] == 0

    # A small budget: each page reads a few rows; following next_offset finds them all.
    monkeypatch.setattr(row_index, "SEARCH_BUDGET_BYTES", 600)

    def has(r: dict) -> bool:
        return any(isinstance(v, str) and "4" in v for v in r.values())

    want = [i for i, r in enumerate(rows) if has(r) and r["reason"] == "ok"]
    got, offset, short = [], 0, 0
    while offset is not None:
        page = row_index.read_page(store, ds, offset, 5, reason="ok", q="4")
        got += [d["index"] for d in page["data"]]
        offset = page["next_offset"]
        short += offset is not None and len(page["data"]) < 5  # stopped by the budget
    assert got == want and short > 0


def test_pages_from_an_object_store(s3_url, s3_server, tmp_path):  # noqa: F811
    """Another machine (its own empty cache) pages, filters and searches the bucket's
    dataset with ranged reads; nothing of it is copied into its cache."""
    rows = distilled_rows(60, seed=3)
    ds = make(ArtifactStore(tmp_path / "writer", s3_url, s3_server), rows)
    reader = ArtifactStore(tmp_path / "reader", s3_url, s3_server)
    assert row_index.counts(reader, ds)["rows"] == 60
    page = row_index.read_page(reader, ds, 5, 4, reason="ok")
    ok = [i for i, r in enumerate(rows) if r["reason"] == "ok"]
    assert [d["index"] for d in page["data"]] == ok[5:9]
    assert [d["row"] for d in page["data"]] == [rows[i] for i in ok[5:9]]
    hit = row_index.read_page(reader, ds, q="question 42:")
    assert [d["index"] for d in hit["data"]] == [42]
    assert not (reader.kind_dir("dataset") / ds).exists()


def test_the_api_pages_a_distilled_upload(api, api_url, redis_conn):
    import httpx

    rows = distilled_rows(40, seed=2)
    body = "".join(json.dumps(r) + "\n" for r in rows)
    ds = api.post("/v1/datasets", files={"file": ("d.jsonl", body)}).json()["id"]
    stats = api.get(f"/v1/datasets/{ds}/stats").json()
    assert stats["rows"] == 40 and sum(stats["reasons"].values()) == 40
    page = api.get(f"/v1/datasets/{ds}/rows", params={"reason": "ok", "limit": 3}).json()
    ok = [i for i, r in enumerate(rows) if r["reason"] == "ok"]
    assert page["total"] == len(ok) and [d["index"] for d in page["data"]] == ok[:3]
    assert page["data"][0]["row"] == rows[ok[0]]
    r = api.get(f"/v1/datasets/{ds}/rows", params={"limit": 1000})
    assert r.status_code == 422 and "limit" in r.text

    from api.keys import create_key

    other = {"Authorization": f"Bearer {create_key(redis_conn, 'another')}"}
    for path in ("rows", "stats"):
        assert httpx.get(f"{api_url}/v1/datasets/{ds}/{path}", headers=other).status_code == 404
