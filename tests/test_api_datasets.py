"""Datasets through the HTTP API (a real uvicorn and a real Redis): uploads good and bad,
size limit, listing with cursors, content, delete, tenants, and the error format."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import ALPACA_ROWS, GSM8K_ROWS

pytest_plugins = ["tests.redis_fixture"]

pytestmark = pytest.mark.integration


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_upload_multipart_and_ndjson(api):
    r = api.post("/v1/datasets", files={"file": ("alpaca.jsonl", jsonl(ALPACA_ROWS))})
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["id"].startswith("ds_") and ds["rows"] == len(ALPACA_ROWS)
    assert ds["name"] == "alpaca.jsonl" and ds["kinds"] == {"general": len(ALPACA_ROWS)}

    r = api.post(
        "/v1/datasets?name=gsm",
        content=jsonl(GSM8K_ROWS),
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert r.status_code == 201, r.text
    gsm = r.json()
    assert gsm["rows"] == len(GSM8K_ROWS) and gsm["kinds"] == {"math": len(GSM8K_ROWS)}

    content = api.get(f"/v1/datasets/{gsm['id']}/content")
    assert content.status_code == 200
    assert content.headers["content-type"].startswith("application/x-ndjson")
    assert [json.loads(x) for x in content.text.splitlines()] == GSM8K_ROWS
    assert api.get(f"/v1/datasets/{gsm['id']}").json()["sha256"] == gsm["sha256"]


def test_bad_rows_answer_422_with_each_line(api):
    body = (
        json.dumps(ALPACA_ROWS[0]) + "\n"
        + "{not json\n"
        + json.dumps({"instruction": "x"}) + "\n"  # no output
        + json.dumps({"question": 3, "answer": "4"}) + "\n"
    ).encode()  # fmt: skip
    r = api.post("/v1/datasets", content=body, headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "invalid_dataset"
    found = {(d["line"], d["field"]) for d in err["details"]}
    assert found == {(2, None), (3, "output"), (4, "question")}
    assert all(d["message"] for d in err["details"])
    assert api.get("/v1/datasets").json()["data"] == []  # nothing half-saved


def test_empty_and_unsupported_uploads(api):
    r = api.post("/v1/datasets", content=b"\n\n", headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_dataset"
    r = api.post("/v1/datasets", content=b"x", headers={"Content-Type": "image/png"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_upload_over_the_limit_is_413(api_url, tenant_key, monkeypatch):
    from service.settings import get_settings

    monkeypatch.setenv("DISTILLERY_MAX_UPLOAD_MB", "0.001")  # ~1 KB
    get_settings.cache_clear()
    try:
        with httpx.Client(
            base_url=api_url, headers={"Authorization": f"Bearer {tenant_key[1]}"}
        ) as c:
            big = jsonl(ALPACA_ROWS * 20)
            r = c.post(
                "/v1/datasets", content=big, headers={"Content-Type": "application/x-ndjson"}
            )
            assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"

            def chunks():  # no Content-Length: the limit holds while streaming too
                yield big

            r = c.post(
                "/v1/datasets", content=chunks(), headers={"Content-Type": "application/x-ndjson"}
            )
            assert r.status_code == 413
            r = c.post("/v1/datasets", files={"file": ("big.jsonl", big)})
            assert r.status_code == 413
    finally:
        monkeypatch.delenv("DISTILLERY_MAX_UPLOAD_MB")
        get_settings.cache_clear()


def test_list_pages_with_a_cursor_and_delete(api):
    ids = []
    for i in range(5):
        r = api.post(
            f"/v1/datasets?name=d{i}",
            content=jsonl(ALPACA_ROWS[: i + 1]),
            headers={"Content-Type": "application/x-ndjson"},
        )
        ids.append(r.json()["id"])
    first = api.get("/v1/datasets?limit=2").json()
    assert [d["id"] for d in first["data"]] == ids[::-1][:2] and first["has_more"]
    second = api.get(f"/v1/datasets?limit=2&after={first['next_cursor']}").json()
    third = api.get(f"/v1/datasets?limit=2&after={second['next_cursor']}").json()
    seen = [d["id"] for page in (first, second, third) for d in page["data"]]
    assert seen == ids[::-1] and not third["has_more"]

    assert api.delete(f"/v1/datasets/{ids[0]}").status_code == 204
    r = api.get(f"/v1/datasets/{ids[0]}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_auth_and_tenants(api, api_url, redis_conn):
    from api.keys import create_key

    ds = api.post("/v1/datasets", files={"file": ("a.jsonl", jsonl(ALPACA_ROWS))}).json()
    other = {"Authorization": f"Bearer {create_key(redis_conn, 'someone-else')}"}
    r = httpx.get(f"{api_url}/v1/datasets/{ds['id']}", headers=other)
    assert r.status_code == 404  # another tenant's id is not found, not forbidden
    assert httpx.get(f"{api_url}/v1/datasets", headers=other).json()["data"] == []
    r = httpx.get(f"{api_url}/v1/datasets")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = httpx.get(f"{api_url}/v1/datasets", headers={"Authorization": "Bearer dk_wrong"})
    assert r.status_code == 401


def test_errors_from_the_framework_are_json_too(api):
    r = api.get("/v1/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = api.put("/v1/datasets")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = api.get("/v1/datasets?limit=0")
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "invalid_request" and err["details"][0]["field"] == "query.limit"


def test_health_and_docs(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/docs").status_code == 200
    paths = api.get("/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/datasets", "/v1/distill", "/readyz"} <= set(paths)
