"""Jobs through the HTTP API with a real Redis and real worker processes (one teacher,
one trainer), on the tiny random Llama: a distill job and its rows, polling, the SSE
stream, cancelling queued and running work, a crashing trainer child, idempotency,
POST /v1/distill?wait=, validation and readiness."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import httpx
import pytest

from tests.conftest import ALPACA_ROWS

pytest_plugins = ["tests.redis_fixture"]
pytestmark = pytest.mark.integration

TERMINAL = ("succeeded", "failed", "cancelled")
PROVENANCE = ("response", "original_response", "distilled", "reason")


def wait_for(*args, **kwargs):
    from tests.redis_fixture import wait_for as wait  # loaded by pytest_plugins, not here

    return wait(*args, **kwargs)


def upload(api, rows) -> str:
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    r = api.post("/v1/datasets", content=body, headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def submit(api, **body) -> dict:
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return r.json()


def wait_job(api, job_id, timeout=180.0, until=TERMINAL) -> dict:
    seen: list[dict] = []

    def done():
        job = api.get(f"/v1/jobs/{job_id}").json()
        seen.append(job)
        return job if job["status"] in until else None

    job = wait_for(done, timeout, 0.2, f"job {job_id} to reach {until}")
    job["_polled"] = seen
    return job


def distill_body(tiny_model, dataset, **kw) -> dict:
    return {"type": "distill", "teacher": tiny_model, "dataset": dataset,
            "max_new_tokens": 8, "batch_size": 4, **kw}  # fmt: skip


def test_distill_job_rows_and_provenance(api, workers, tiny_model):
    ds = upload(api, ALPACA_ROWS)
    job = submit(api, **distill_body(tiny_model, ds))
    assert job["status"] == "queued" and job["type"] == "distill" and job["spec"]["dataset"] == ds
    done = wait_job(api, job["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["started_at"] >= done["created_at"] and done["finished_at"] >= done["started_at"]
    assert done["progress"]["rows_done"] == done["progress"]["rows_total"] == len(ALPACA_ROWS)
    assert done["metrics"]["rows"] == len(ALPACA_ROWS)
    statuses = [j["status"] for j in done["_polled"]]
    assert statuses == sorted(statuses, key=["queued", "running", "succeeded"].index)

    r = api.get(f"/v1/jobs/{job['id']}/result")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    rows = [json.loads(line) for line in r.text.splitlines()]
    assert len(rows) == len(ALPACA_ROWS)
    for src, row in zip(ALPACA_ROWS, rows, strict=True):
        assert all(k in row for k in PROVENANCE), row
        assert row["instruction"] == src["instruction"]
        assert row["original_response"] == src["output"]
        assert row["output"] == row["response"]
        assert row["distilled"] or row["response"] == src["output"]

    out_ds = done["artifacts"]["dataset"]
    meta = api.get(f"/v1/datasets/{out_ds}").json()
    assert meta["rows"] == len(ALPACA_ROWS) and meta["source"] == job["id"]
    assert api.get(f"/v1/datasets/{out_ds}/content").text == r.text

    events = api.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    assert [e["message"] for e in events if e["type"] == "status"] == [
        "queued", "running", "succeeded"
    ]  # fmt: skip
    assert any(e["type"] == "progress" for e in events)
    page = api.get(f"/v1/jobs/{job['id']}/events?after={events[0]['id']}&limit=1").json()
    assert page["data"][0]["id"] == events[1]["id"] and page["has_more"]


def test_teacher_worker_keeps_its_engine(api, workers, tiny_model):
    log = workers / "teacher.log"
    loads = lambda: log.read_text().count(f"loaded teacher {tiny_model}")  # noqa: E731
    ds = upload(api, ALPACA_ROWS[:2])
    assert wait_job(api, submit(api, **distill_body(tiny_model, ds))["id"])["status"] == "succeeded"
    before = loads()
    assert before >= 1
    assert wait_job(api, submit(api, **distill_body(tiny_model, ds))["id"])["status"] == "succeeded"
    assert loads() == before  # the second job used the loaded engine


def test_sse_stream_follows_a_job(api, api_url, workers, tiny_model):
    ds = upload(api, ALPACA_ROWS[:4])
    job = submit(api, **distill_body(tiny_model, ds, batch_size=1))
    events = []
    with api.stream(
        "GET", f"/v1/jobs/{job['id']}/events", headers={"Accept": "text/event-stream"}
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        block: dict = {}
        for line in r.iter_lines():
            if line.startswith("data: "):
                block["data"] = json.loads(line[6:])
            elif line.startswith("id: "):
                block["id"] = line[4:]
            elif line == "" and block:
                events.append(block)
                block = {}
    # the stream ends by itself once the job has ended
    statuses = [e["data"]["message"] for e in events if e["data"]["type"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    assert any(e["data"]["type"] == "progress" for e in events)
    assert all(e["id"] == e["data"]["id"] for e in events)
    # resuming after an event replays only what came after it
    with api.stream(
        "GET",
        f"/v1/jobs/{job['id']}/events",
        headers={"Accept": "text/event-stream", "Last-Event-ID": events[-2]["id"]},
    ) as r:
        ids = [line[4:] for line in r.iter_lines() if line.startswith("id: ")]
    assert ids == [events[-1]["id"]]


def test_cancel_a_running_distill_job(api, workers, tiny_model):
    # 320 distinct rows, cache bypassed: minutes of work for the one teacher worker.
    # (A queued job's cancel: tests/test_teacher_loop.py, where no worker can take it.)
    rows = [{**r, "instruction": f"{r['instruction']} ({k})"}
            for k, r in enumerate(ALPACA_ROWS * 40)]  # fmt: skip
    long = upload(api, rows)
    running = submit(api, **distill_body(tiny_model, long, cache=False, max_new_tokens=64))
    wait_for(
        lambda: api.get(f"/v1/jobs/{running['id']}").json()["progress"].get("rows_done", 0) >= 1,
        120, 0.2, "the long job to make progress",
    )  # fmt: skip
    r = api.post(f"/v1/jobs/{running['id']}/cancel")
    assert r.status_code == 200 and r.json()["cancel_requested"]
    done = wait_job(api, running["id"], timeout=60)
    assert done["status"] == "cancelled"
    assert done["progress"]["rows_done"] < done["progress"]["rows_total"]
    assert api.get(f"/v1/jobs/{running['id']}/result").status_code == 409
    r = api.post(f"/v1/jobs/{running['id']}/cancel")
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"

    # the worker is still there and takes new work
    ds = upload(api, ALPACA_ROWS[:2])
    assert wait_job(api, submit(api, **distill_body(tiny_model, ds))["id"])["status"] == "succeeded"


def test_partial_rows_of_a_running_distill_job(api, workers, tiny_model):
    rows = [{**r, "instruction": f"{r['instruction']} [{k}]"}
            for k, r in enumerate(ALPACA_ROWS * 40)]  # fmt: skip
    job = submit(api, **distill_body(tiny_model, upload(api, rows), cache=False,
                                     max_new_tokens=64))  # fmt: skip
    wait_for(
        lambda: api.get(f"/v1/jobs/{job['id']}").json()["progress"].get("rows_done", 0) >= 2,
        120, 0.1, "rows of the job",
    )  # fmt: skip
    assert api.get(f"/v1/jobs/{job['id']}/result").status_code == 409  # not finished
    r = api.get(f"/v1/jobs/{job['id']}/result?partial=true")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    got = [json.loads(line) for line in r.text.splitlines()]
    assert len(got) >= 2 and len({g["index"] for g in got}) == len(got)
    for g in got:  # each row with its input position and its provenance
        assert g["instruction"] == rows[g["index"]]["instruction"] and "reason" in g
    api.post(f"/v1/jobs/{job['id']}/cancel")
    assert wait_job(api, job["id"], timeout=60)["status"] == "cancelled"


def finetune_body(tiny_model, ds) -> dict:
    return {"type": "finetune", "model": tiny_model, "dataset": ds, "epochs": 20,
            "batch_size": 1, "micro_batch_size": 1, "checkpoint_every": 1000}  # fmt: skip


def child_pid(job_id: str) -> int | None:
    out = subprocess.run(["pgrep", "-f", f"workers.child {job_id}"], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    return pids[0] if pids else None


def test_cancel_a_running_trainer_job_and_survive_a_crash(api, workers, tiny_model):
    ds = upload(api, ALPACA_ROWS)
    job = submit(api, **finetune_body(tiny_model, ds))
    wait_for(
        lambda: api.get(f"/v1/jobs/{job['id']}").json()["progress"].get("step", 0) >= 1,
        180, 0.2, "fine-tuning to take a step",
    )  # fmt: skip
    assert api.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    assert wait_job(api, job["id"], timeout=60)["status"] == "cancelled"

    crash = submit(api, **finetune_body(tiny_model, ds))
    pid = wait_for(lambda: child_pid(crash["id"]), 120, 0.2, "the child process")
    wait_for(lambda: api.get(f"/v1/jobs/{crash['id']}").json()["status"] == "running", 60)
    os.kill(pid, signal.SIGKILL)  # as the OOM killer would
    done = wait_job(api, crash["id"], timeout=60)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "crashed" and "SIGKILL" in done["error"]["message"]
    # the trainer worker survived: the next job runs
    ok = submit(api, **{**finetune_body(tiny_model, ds), "epochs": 1, "limit": 2})
    done = wait_job(api, ok["id"], timeout=180)
    assert done["status"] == "succeeded", done["error"]
    model = api.get(f"/v1/models/{done['artifacts']['model']}").json()
    assert model["op"] == "finetune" and model["parents"] == [tiny_model, ds]
    assert [step["ref"] for step in model["lineage"]][:1] == [done["artifacts"]["model"]]


def test_idempotency_key(api, workers, tiny_model):
    ds = upload(api, ALPACA_ROWS[:2])
    body = distill_body(tiny_model, ds)
    first = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    again = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    other = api.post("/v1/jobs", json={**body, "seed": 1}, headers={"Idempotency-Key": "k1"})
    assert other.status_code == 409
    assert wait_job(api, first.json()["id"])["status"] == "succeeded"


def test_distill_endpoint_waits_or_answers_202(api, workers, tiny_model):
    rows = ALPACA_ROWS[:3]
    r = api.post(
        "/v1/distill?wait=120",
        json={"rows": rows, "teacher": tiny_model, "max_new_tokens": 8},
        timeout=150,
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["job"]["status"] == "succeeded" and len(out["rows"]) == 3
    assert all(k in row for row in out["rows"] for k in PROVENANCE)
    assert [row["instruction"] for row in out["rows"]] == [x["instruction"] for x in rows]

    r = api.post(
        "/v1/distill?wait=0", json={"rows": rows, "teacher": tiny_model, "max_new_tokens": 8}
    )
    assert r.status_code == 202 and r.json()["rows"] is None
    assert wait_job(api, r.json()["job"]["id"])["status"] == "succeeded"

    r = api.post("/v1/distill", json={"rows": [{"instruction": "x"}], "teacher": tiny_model})
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "output"


def test_specs_are_validated_at_submission(api, api_url, redis_conn, tiny_model):
    from api.keys import create_key

    ds = upload(api, ALPACA_ROWS[:2])
    r = api.post("/v1/jobs", json={"type": "distill", "dataset": ds, "max_new_tokens": 0})
    assert r.status_code == 422 and "max_new_tokens" in r.json()["error"]["details"][0]["field"]
    r = api.post("/v1/jobs", json={"type": "explode", "dataset": ds})
    assert r.status_code == 422
    for kind in ("distill", "pipeline"):  # bf16 only on vllm: never fp32 in its place
        bad = {"type": kind, "dataset": ds, "engine": "hf", "dtype": "bfloat16"}
        r = api.post("/v1/jobs", json=bad)
        assert r.status_code == 422 and "vllm engine only" in r.text, r.text
    r = api.post("/v1/jobs", json={"type": "distill", "dataset": "/etc/passwd"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_spec"
    r = api.post("/v1/jobs", json={"type": "distill", "dataset": ds, "teacher": "/nonexistent/m"})
    assert r.status_code == 422
    r = api.post(
        "/v1/jobs",
        json={"type": "prune", "calibration": ds, "blocks": 2, "model": "mdl_" + "0" * 20},
    )
    assert r.status_code == 404
    other = {"Authorization": f"Bearer {create_key(redis_conn, 'other-tenant')}"}
    r = httpx.post(f"{api_url}/v1/jobs", json=distill_body(tiny_model, ds), headers=other)
    assert r.status_code == 404  # another tenant's dataset does not exist for them
    assert api.get("/v1/jobs").json()["data"] == []  # nothing was queued


def test_list_jobs_with_cursor_and_filters(api, redis_conn, tiny_model):
    from api.keys import tenant_for
    from workers import records

    ds = upload(api, ALPACA_ROWS[:2])
    # records only (no RQ job): listing does not depend on workers
    owner = tenant_for(redis_conn, api.headers["Authorization"].split()[1])
    made = [
        records.create(redis_conn, tenant=owner, type=t, spec={"dataset": ds}, queue="train")["id"]
        for t in ("prune", "distill", "prune", "evaluate", "prune")
    ]
    records.transition(redis_conn, made[0], ("queued",), "running")
    page1 = api.get("/v1/jobs?limit=2").json()
    page2 = api.get(f"/v1/jobs?limit=2&after={page1['next_cursor']}").json()
    page3 = api.get(f"/v1/jobs?limit=2&after={page2['next_cursor']}").json()
    ids = [j["id"] for p in (page1, page2, page3) for j in p["data"]]
    assert ids == made[::-1] and page1["has_more"] and not page3["has_more"]
    prunes = api.get("/v1/jobs?type=prune&limit=2").json()
    assert [j["id"] for j in prunes["data"]] == [made[4], made[2]] and prunes["has_more"]
    running = api.get("/v1/jobs?status=running").json()["data"]
    assert [j["id"] for j in running] == [made[0]]
    assert api.get("/v1/jobs?status=bogus").status_code == 422


def test_readiness(api, workers, redis_server):
    from fastapi.testclient import TestClient

    from api.app import create_app

    r = api.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["queues"]["teacher"]["workers"] >= 1
    # the same API on a Redis database where no worker listens: not ready
    empty = redis_server.url.rsplit("/", 1)[0] + "/3"
    with TestClient(create_app(empty)) as client:
        r = client.get("/readyz")
        assert r.status_code == 503
        assert r.json() == {
            "ready": False,
            "redis": True,
            "queues": {
                "teacher": {"workers": 0, "queued": 0},
                "train": {"workers": 0, "queued": 0},
            },
        }
        assert client.get("/healthz").status_code == 200
    # and with Redis gone
    with TestClient(create_app("redis://127.0.0.1:1/0")) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["redis"] is False


def test_sse_stream_survives_quiet_periods(api, redis_conn):
    """No event for longer than the blocking read (5 s) and redis-py's default socket
    timeout: the stream sends a keep-alive and goes on. The job moves only once the
    keep-alive has arrived (a condition, not a fixed wait)."""
    from api.keys import tenant_for
    from workers import records

    owner = tenant_for(redis_conn, api.headers["Authorization"].split()[1])
    job = records.create(redis_conn, tenant=owner, type="prune", spec={}, queue="train")
    lines = []
    with api.stream(
        "GET", f"/v1/jobs/{job['id']}/events", headers={"Accept": "text/event-stream"}
    ) as r:
        for line in r.iter_lines():
            lines.append(line)
            if line == ": keep-alive" and lines.count(line) == 1:
                records.transition(redis_conn, job["id"], ("queued",), "running")
                records.transition(redis_conn, job["id"], ("running",), "succeeded")
    assert ": keep-alive" in lines
    messages = [json.loads(x[6:])["message"] for x in lines if x.startswith("data: ")]
    assert messages == ["queued", "running", "succeeded"]
