"""What a client reads of a failure, and what the server's log keeps: a code, a message
without server paths and an error id for the client; the message with its paths, the
innermost frame and the trace in the log, under the same id (a key of its own in JSON
logs)."""

from __future__ import annotations

import io
import json
import logging

import httpx
import pytest

pytest_plugins = ["tests.redis_fixture"]


def read_settings(path):
    return json.loads(path.read_text())  # the line a trace points at


def test_an_unexpected_job_error_gives_the_client_an_id_and_the_log_the_trace(tmp_path):
    from service import logs
    from service.errors import ModelError
    from workers.lifecycle import error_doc

    stream = io.StringIO()
    logs.configure(fmt="json", level="INFO", stream=stream)
    try:
        (tmp_path / "settings.json").write_text("{not json")
        with pytest.raises(ValueError) as caught:
            read_settings(tmp_path / "settings.json")
        internal = error_doc(caught.value, "evaluate")
        known = error_doc(
            ModelError(f"cannot load model 'x' from {tmp_path}/m: no weights"), "prune"
        )
    finally:
        logs.configure()
    for doc in (internal, known):
        text = json.dumps(doc)
        assert doc["error_id"].startswith("err_") and str(tmp_path) not in text
        assert "Traceback" not in text and "test_errors.py" not in text and "trace" not in doc
    assert internal["code"] == "internal" and internal["where"] == "evaluate"
    assert "JSONDecodeError" in internal["message"] and internal["error_id"] in internal["message"]
    assert known["code"] == "invalid_model" and known["message"].endswith("…/m: no weights")

    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    logged = {x.get("error_id"): x for x in lines}
    trace = logged[internal["error_id"]]["exc_info"]
    assert "Traceback" in trace and "test_errors.py" in trace and "read_settings" in trace
    assert logged[internal["error_id"]]["level"] == "ERROR"
    assert str(tmp_path) in logged[known["error_id"]]["message"]  # the operator sees the path


@pytest.mark.integration
def test_an_unexpected_api_error_is_a_500_with_only_an_id(
    api, session_home, caplog: pytest.LogCaptureFixture
):
    """A dataset whose manifest is damaged on disk: the route fails unexpectedly."""
    r = api.post(
        "/v1/datasets", content=b'{"prompt": "a", "response": "b"}\n',
        headers={"Content-Type": "application/x-ndjson"},
    )  # fmt: skip
    assert r.status_code == 201, r.text
    ds = r.json()["id"]
    from service.store import MANIFEST, ArtifactStore

    store = ArtifactStore.from_settings()
    manifest = store.path("dataset", ds) / MANIFEST
    manifest.write_text("{damaged")
    try:
        with caplog.at_level(logging.ERROR, logger="api.errors"):
            r = api.get(f"/v1/datasets/{ds}")
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["code"] == "internal" and err["error_id"] in err["message"]
        assert str(session_home) not in r.text and "Traceback" not in r.text
        [record] = [x for x in caplog.records if getattr(x, "error_id", None) == err["error_id"]]
        assert record.exc_info and "JSONDecodeError" in repr(record.exc_info[1])
        # The damaged artifact fails its own reads only: listings skip it (and log it).
        # (a new connection: uvicorn closes one whose request raised)
        with (
            caplog.at_level(logging.WARNING, logger="service.store"),
            httpx.Client(base_url=api.base_url, headers=api.headers) as fresh,
        ):
            r = fresh.get("/v1/datasets")
        assert r.status_code == 200 and r.json()["data"] == []
        assert any("damaged manifest" in x.getMessage() for x in caplog.records)
    finally:  # the store is the session's: leave nothing damaged for later tests
        store.delete("dataset", ds)
