"""Structured logs: JSON (or text) lines carrying the job id and tenant, from the API's
request log and from a real worker process running a real job.

    .venv/bin/python -m pytest -q tests/test_logs.py
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from service import logs
from tests.conftest import ALPACA_ROWS

pytest_plugins = ["tests.redis_fixture"]


def json_lines(text: str) -> list[dict]:
    """The lines that are JSON objects (a worker's stderr also carries tqdm bars)."""
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


@pytest.fixture
def captured():
    buf = io.StringIO()
    logs.configure("json", "INFO", buf)
    yield buf
    logs.configure("text", "INFO")


def test_json_and_text_lines_carry_the_context(captured):
    log = logging.getLogger("distillery.test")
    with logs.context(job_id="job_1"):
        logs.bind(tenant="acme")
        log.info("inside %d", 1, extra={"rows": 3})
    log.warning("outside")
    inside, outside = json_lines(captured.getvalue())
    assert inside["message"] == "inside 1" and inside["level"] == "INFO"
    assert inside["job_id"] == "job_1" and inside["tenant"] == "acme" and inside["rows"] == 3
    assert inside["logger"] == "distillery.test" and "time" in inside
    assert outside["level"] == "WARNING" and "job_id" not in outside and "tenant" not in outside

    text = io.StringIO()
    logs.configure("text", "INFO", text)
    with logs.context(job_id="job_2", tenant="acme"):
        log.info("plain")
    assert text.getvalue().rstrip().endswith("distillery.test [job_id=job_2 tenant=acme] plain")


@pytest.mark.integration
def test_api_request_lines_name_tenant_and_job(api, tenant_key, redis_conn, captured):
    from workers import records

    job = records.create(redis_conn, tenant=tenant_key[0], type="prune", spec={}, queue="train")
    assert api.get(f"/v1/jobs/{job['id']}").status_code == 200
    assert api.get("/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
    lines = [d for d in json_lines(captured.getvalue()) if d["logger"] == "distillery.api"]
    ok = next(d for d in lines if d["message"] == f"GET /v1/jobs/{job['id']} 200")
    assert ok["tenant"] == tenant_key[0] and ok["job_id"] == job["id"] and ok["status"] == 200
    denied = next(d for d in lines if d["message"] == "GET /v1/jobs 401")
    assert "tenant" not in denied and "job_id" not in denied


@pytest.mark.integration
def test_a_worker_logs_json_with_job_and_tenant(redis_server, session_home, tiny_llama, tmp_path):
    from api.datasets import save_dataset
    from service.specs import DistillSpec
    from service.store import ArtifactStore, new_id
    from tests.redis_fixture import own_db
    from workers.lifecycle import submit

    url, conn = own_db(redis_server, 7)
    store = ArtifactStore(session_home)
    teacher = new_id("model")
    with store.create("model", teacher, tenant="acme", parents=[]) as tmp:
        shutil.copytree(tiny_llama, tmp / "model")
    data = "".join(json.dumps(r) + "\n" for r in ALPACA_ROWS[:2]).encode()
    ds = save_dataset(store, "acme", data, "rows.jsonl")["id"]
    job = submit(conn, store, "acme", "distill", DistillSpec(teacher=teacher, dataset=ds))
    env = dict(os.environ, REDIS_URL=url, DISTILLERY_HOME=str(session_home),
               DISTILLERY_LOG_FORMAT="json", PYTHONUNBUFFERED="1")  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "workers.worker", "--queues", "teacher", "--burst"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    conn.flushdb()
    assert run.returncode == 0, run.stderr[-3000:]
    lines = json_lines(run.stdout + run.stderr)
    mine = [d for d in lines if d.get("job_id") == job["id"]]
    assert mine and all(d["tenant"] == "acme" for d in mine)
    assert any(d["message"].startswith("loaded teacher") for d in mine)
    # The teacher loop's own lines about the job, from its first rows to its end.
    assert any(d["message"].startswith(f"taking rows of job {job['id']}") for d in mine)
    assert any(d["message"].startswith(f"job {job['id']} succeeded") for d in mine)
