"""Job records, events, keys and the reporter against a real Redis; Redis restarts keep
jobs (AOF); a job whose worker is killed is requeued by RQ and resumes where it was."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from service.errors import CancelledError
from tests.conftest import ALPACA_ROWS
from tests.redis_fixture import wait_for

pytest_plugins = ["tests.redis_fixture"]
ROOT = Path(__file__).resolve().parents[1]


def test_status_moves_only_along_the_lifecycle(redis_conn):
    from workers import records

    job = records.create(redis_conn, tenant="t", type="prune", spec={"blocks": 2}, queue="train")
    assert job["status"] == "queued" and job["spec"] == {"blocks": 2}
    assert not records.transition(redis_conn, job["id"], ("running",), "succeeded")
    assert records.transition(redis_conn, job["id"], ("queued",), "running", attempts=1)
    assert records.transition(
        redis_conn, job["id"], ("running",), "failed",
        error={"code": "x", "message": "boom", "where": "here"},
    )  # fmt: skip
    assert not records.transition(redis_conn, job["id"], ("queued", "running"), "cancelled")
    rec = records.get(redis_conn, job["id"])
    assert rec["status"] == "failed" and rec["attempts"] == 1 and rec["error"]["message"] == "boom"
    assert records.get(redis_conn, "job_missing") is None
    assert records.transition(redis_conn, "job_missing", ("queued",), "running") is False

    events, more = records.events(redis_conn, job["id"])
    assert [e["message"] for e in events] == ["queued", "running", "failed"] and not more
    page, more = records.events(redis_conn, job["id"], after=events[0]["id"], limit=1)
    assert [e["message"] for e in page] == ["running"] and more


def test_reporter_throttles_progress_and_sees_cancel(redis_conn):
    from workers import records
    from workers.lifecycle import JobTimeout, RecordReporter

    job = records.create(redis_conn, tenant="t", type="distill", spec={}, queue="teacher")
    rep = RecordReporter(redis_conn, job["id"], every=0.5, event_every=1.0)
    for i in range(1, 201):
        rep.progress(rows_done=i, rows_total=200)
    assert records.get(redis_conn, job["id"])["progress"]["rows_done"] == 1  # throttled
    rep.flush()
    assert records.get(redis_conn, job["id"])["progress"]["rows_done"] == 200
    kinds = [e["type"] for e in records.events(redis_conn, job["id"])[0]]
    assert kinds.count("progress") == 2  # the first write and the flush, not 200
    rep.event("careful", level="warning", row=3)
    last = records.events(redis_conn, job["id"])[0][-1]
    assert (last["level"], last["message"], last["data"]) == ("warning", "careful", {"row": 3})

    rep.check()
    records.request_cancel(redis_conn, job["id"])

    def stops() -> bool:  # the flag is re-read at most every 0.2 s
        try:
            rep.check()
        except CancelledError:
            return True
        return False

    wait_for(stops, timeout=5, every=0.05, what="check() to see the cancel")
    late = RecordReporter(redis_conn, job["id"], deadline=time.monotonic() - 1)
    with pytest.raises(JobTimeout):
        late.check()


def test_api_keys_are_stored_hashed(redis_conn):
    from api.keys import create_key, revoke_key, tenant_for

    key = create_key(redis_conn, "acme")
    assert tenant_for(redis_conn, key) == "acme" and tenant_for(redis_conn, key + "x") is None
    dump = b"".join(v for k in redis_conn.scan_iter() if redis_conn.type(k) == b"hash"
                    for v in redis_conn.hgetall(k).keys())  # fmt: skip
    assert key.encode() not in dump
    assert revoke_key(redis_conn, key) and tenant_for(redis_conn, key) is None
    with pytest.raises(ValueError):
        create_key(redis_conn, "bad tenant!")


def test_a_redis_restart_loses_no_job(tmp_path):
    from api.redis_server import start_redis
    from workers import records

    server = start_redis(tmp_path / "redis")
    conn = redis.Redis.from_url(server.url)
    assert conn.config_get("appendonly") == {"appendonly": "yes"}
    job = records.create(conn, tenant="t", type="prune", spec={"blocks": 1}, queue="train")
    records.add_event(conn, job["id"], "hello")
    server.stop()
    assert (tmp_path / "redis" / "url").exists() is False
    server = start_redis(tmp_path / "redis")
    try:
        conn = redis.Redis.from_url(server.url)
        assert records.get(conn, job["id"])["spec"] == {"blocks": 1}
        assert [e["message"] for e in records.events(conn, job["id"])[0]] == ["queued", "hello"]
    finally:
        server.stop()


def start_teacher(url: str, home: Path, log: Path) -> subprocess.Popen:
    from tests.redis_fixture import start_worker

    # A dead teacher's units are requeued once their 3 s leases lapse.
    return start_worker("teacher", url, home, log, DISTILLERY_UNIT_LEASE="3")


@pytest.mark.integration
@pytest.mark.slow
def test_a_job_whose_worker_dies_resumes(redis_server, session_home, tiny_llama, tmp_path):
    """SIGKILL the teacher worker mid-job: its units' leases lapse, they are requeued, and
    a new worker finishes the job, every row written before the kill kept as it was."""
    from api.datasets import save_dataset
    from service.distill import Finished
    from service.specs import DistillSpec
    from service.store import ArtifactStore
    from tests.redis_fixture import own_db, stop_process
    from workers import records, units
    from workers.lifecycle import submit

    url, conn = own_db(redis_server, 6)
    store = ArtifactStore(session_home)
    # Enough rows, each its own (none served by the cache), for several full batches of
    # the engine: the kill lands after the first batch's rows are written, whatever the
    # machine (the tiny model writes a whole batch in well under a second).
    rows = [{**r, "instruction": f"{r['instruction']} ({i})"}
            for i, r in enumerate(ALPACA_ROWS * 100)]  # fmt: skip
    n_rows = len(rows)
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    ds = save_dataset(store, "t", data, "rows.jsonl")["id"]
    spec = DistillSpec(teacher=str(tiny_llama), dataset=ds, batch_size=1, max_new_tokens=64)
    job = submit(conn, store, "t", "distill", spec)

    first = start_teacher(url, session_home, tmp_path / "first.log")
    second = None
    try:
        wait_for(lambda: conn.hlen(units.rows_key(job["id"])), 180, 0.005, "rows to be written")
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        assert records.status(conn, job["id"]) == "running"  # killed mid-job
        before = units.read_rows(conn, job["id"])
        assert 0 < len(before) < n_rows
        second = start_teacher(url, session_home, tmp_path / "second.log")
        rec = wait_for(
            lambda: (r := records.get(conn, job["id"]))["status"] in records.TERMINAL and r,
            1200, 0.5, "the job to finish on the second worker",
        )  # fmt: skip
    finally:
        for p in (first, second):
            if p is not None:
                stop_process(p)
    assert rec["status"] == "succeeded", rec["error"]
    messages = [e["message"] for e in records.events(conn, job["id"], limit=1000)[0]]
    statuses = [m for m in messages if m in ("queued", "running", "succeeded")]
    assert statuses == ["queued", "running", "succeeded"], messages
    assert any("requeued to resume" in m for m in messages), messages
    rows = (store.path("dataset", rec["artifacts"]["dataset"]) / "rows.jsonl").read_text()
    rows = [json.loads(line) for line in rows.splitlines()]
    assert len(rows) == n_rows
    for index, line in before.items():  # written before the kill: not generated again
        assert rows[index] == Finished.from_json(line).row
    m = rec["metrics"]  # the rows repeat: the cache serves the repeats
    assert sum(m["rows_by_worker"].values()) == m["engine_rows"] == n_rows - m["cached_rows"]
    conn.flushdb()
