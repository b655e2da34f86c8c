"""The teacher loop's admission (``service/teacher/loop.py``) and the units of work in
Redis (``workers/units.py``), without worker processes.

    .venv/bin/python -m pytest -q tests/test_teacher_loop.py

The loop runs on the real hf engine of the tiny test model (its default stepping: one
``generate`` per step), so what is admitted when is read off the loop itself; the units
run against the session's real Redis.
"""

from __future__ import annotations

import time

import pytest

from service.specs import DistillSpec
from service.teacher.base import GenParams, Request
from service.teacher.loop import EngineLoop, Item
from tests.redis_fixture import wait_for
from workers import units

pytest_plugins = ["tests.redis_fixture"]


@pytest.fixture(scope="module")
def hf(tiny_llama):
    from service.teacher.hf_engine import HFEngine

    return HFEngine(str(tiny_llama), device="cpu", batch_size=16)


def items(job: str, tenant: str, n: int, interactive: bool = False) -> list[Item]:
    req = Request((("user", f"Say something, {job}."),))
    return [
        Item(f"{job}/{i}", job, tenant, i, req, GenParams(max_new_tokens=4), None, interactive)
        for i in range(n)
    ]


def running(loop: EngineLoop) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, it in loop.running.values():
        out[it.job] = out.get(it.job, 0) + 1
    return out


def test_bulk_room_goes_round_robin_by_tenant_then_job(hf):
    loop = EngineLoop(hf, capacity=6)
    loop.add(items("a", "t1", 10) + items("b", "t1", 10) + items("c", "t2", 10))
    loop.admit()
    got = running(loop)
    assert got["c"] == 3 and got["a"] + got["b"] == 3  # the tenants halve the room
    assert abs(got["a"] - got["b"]) <= 1  # and t1's jobs share its half
    done = loop.step()  # hf: every started row finishes in its step
    assert len(done) == 6 and all(gen.tokens > 0 for _, gen in done)
    assert sum(1 for it, _ in done if it.tenant == "t2") == 3


def test_no_job_holds_more_than_its_cap(hf):
    loop = EngineLoop(hf, capacity=8, job_cap=3)
    loop.add(items("a", "t1", 10))
    loop.admit()
    assert running(loop) == {"a": 3}
    loop.add(items("b", "t2", 10))
    loop.admit()
    assert running(loop) == {"a": 3, "b": 3}


def test_interactive_rows_go_first_and_shrink_the_bulk_share(hf):
    loop = EngineLoop(hf, capacity=4, bulk_while_interactive=1)
    loop.add(items("bulk", "t1", 8))
    loop.admit()
    assert running(loop) == {"bulk": 4}
    first_four = sorted(it.index for _, it in loop.running.values())
    loop.add(items("now", "t2", 2, interactive=True))
    loop.admit()
    # The interactive rows are in; the bulk rows admitted last were aborted, the oldest kept,
    # and the aborted ones are next in line for their job.
    assert running(loop) == {"now": 2, "bulk": 1}
    assert loop.preempted == 3
    assert [it.index for _, it in loop.running.values() if it.job == "bulk"] == [first_four[0]]
    assert [it.index for it in list(loop.pending["bulk"])[:3]] == first_four[1:]
    loop.step()  # the interactive rows finish: the bulk share grows back
    loop.admit()
    assert running(loop) == {"bulk": 4}


def test_cancel_aborts_a_jobs_rows_and_keeps_the_others(hf):
    loop = EngineLoop(hf, capacity=4)
    loop.add(items("a", "t1", 6) + items("b", "t2", 6))
    loop.admit()
    dropped = loop.cancel_job("a")
    assert len(dropped) == 6 and "a" not in running(loop)
    done = loop.step()
    assert {it.job for it, _ in done} == {"b"}
    while not loop.idle:
        done += loop.step()
    assert sorted(it.index for it, _ in done) == list(range(6))


# -- units in Redis --------------------------------------------------------------------


@pytest.fixture
def conn(redis_server):
    """A database of its own: the session's teacher worker (tests.redis_fixture.workers)
    would claim units registered where it listens."""
    from tests.redis_fixture import own_db

    _, db = own_db(redis_server, 11)
    yield db
    db.flushdb()


def register(conn, job: str, tenant: str, rows: int, interactive=False, unit_rows=4):
    pipe = conn.pipeline()
    units.register(pipe, job, tenant, rows, unit_rows, interactive, "vllm|m|auto")
    pipe.execute()


def test_units_are_claimed_interactive_first_then_round_robin(conn):
    register(conn, "job_a", "t1", 16)
    register(conn, "job_b", "t1", 16)
    register(conn, "job_c", "t2", 16)
    register(conn, "job_i", "t3", 2, interactive=True)
    order = []
    while got := units.claim(conn, "w", ["vllm|m|auto"], True, 30):
        order.append(got)
    assert order[0] == ("job_i", 0, 2)
    jobs = [j for j, _, _ in order[1:]]
    assert len(jobs) == 12  # 3 jobs x 4 units of 4 rows, each once
    # Tenants alternate while both have work (t2's one job, t1's two), then t1 goes on
    # alone; t1's two jobs alternate within its share.
    first = jobs[:8]
    assert first[1::2] == ["job_c"] * 4 or first[0::2] == ["job_c"] * 4
    assert "job_c" not in jobs[8:]
    t1 = [j for j in jobs if j != "job_c"]
    assert t1 == ["job_a", "job_b"] * 4 or t1 == ["job_b", "job_a"] * 4
    assert sorted((lo, hi) for j, lo, hi in order if j == "job_a") == [
        (0, 4), (4, 8), (8, 12), (12, 16)
    ]  # fmt: skip
    # A worker holding another teacher is offered none of them.
    register(conn, "job_d", "t1", 4)
    assert units.claim(conn, "w", ["vllm|other|auto"], True, 30) is None
    assert units.claim(conn, "w", ["vllm|m|auto"], False, 30) is None  # no bulk room
    assert units.claim(conn, "w", [], True, 30)[0] == "job_d"  # an idle worker: any


def test_a_lapsed_lease_is_requeued_and_counted(conn):
    register(conn, "job_a", "t1", 8)
    job, lo, hi = units.claim(conn, "w1", [], True, lease=2)
    member = units.lease_member(job, lo, hi, "w1")
    units.renew(conn, [member], 2)
    assert units.reap(conn) == {}  # renewed: not lapsed
    units.renew(conn, [member], 0.1)
    assert wait_for(lambda: units.reap(conn), timeout=10, every=0.02) == {"job_a": 1}
    assert units.reap(conn) == {}  # requeued once
    assert units.claim(conn, "w2", [], True, 30) == ("job_a", 0, 4)  # retries first
    # A unit handed back by a stopping worker is requeued at once, not counted.
    units.release(conn, [units.lease_member("job_a", 0, 4, "w2")], requeue=True)
    assert units.claim(conn, "w3", [], True, 0.1) == ("job_a", 0, 4)
    assert wait_for(lambda: units.reap(conn), timeout=10, every=0.02) == {"job_a": 2}


def test_rows_are_written_once_and_the_cache_is_bounded(conn):
    register(conn, "job_a", "t1", 3)
    done = units.write_rows(conn, {"job_a": [(0, "first", {"engine_rows": 1})]})
    assert done == {"job_a": 1}
    done = units.write_rows(conn, {"job_a": [(0, "again", {}), (2, "x", {"engine_rows": 1})]})
    assert done == {"job_a": 2}
    assert units.read_rows(conn, "job_a") == {0: "first", 2: "x"}
    assert units.written(conn, "job_a", [0, 1, 2]) == {0, 2}
    assert units.usage(conn, "job_a")["engine_rows"] == 2

    for k in range(5):
        units.cache_put(conn, "t1", {f"k{k}": {"text": str(k)}}, max_rows=3)
    assert units.cache_get(conn, "t1", ["k0", "k1", "k2", "k3", "k4"]) == [
        None, None, {"text": "2"}, {"text": "3"}, {"text": "4"}
    ]  # fmt: skip
    assert units.cache_get(conn, "t2", ["k4"]) == [None]  # another tenant's cache


def test_old_specs_are_accepted_with_deprecated_fields():
    spec = DistillSpec(dataset="x", engine="fast", batch_size=8, shards=4, shard_rows=100)
    assert spec.engine == "fast" and spec.dtype == "auto" and spec.priority == "bulk"
    from service.teacher.factory import pick_engine

    assert pick_engine(spec.engine) == "vllm"


def test_a_late_job_takes_the_freed_room_until_the_shares_are_equal(hf):
    loop = EngineLoop(hf, capacity=4)
    loop.add(items("early", "t1", 12))
    loop.admit()
    assert running(loop) == {"early": 4}
    loop.add(items("late", "t2", 12))
    assert len(loop.step()) == 4  # hf: the 4 early rows finish
    loop.admit()  # the freed room goes to the late job until the shares are equal
    assert running(loop) == {"late": 2, "early": 2}


def test_a_unit_requeued_past_its_retries_fails_its_job(conn):
    """Every worker reaps lapsed leases; a unit whose workers kept dying is requeued
    RETRIES times, then its job ends failed (worker_lost), never running forever."""
    from workers import records
    from workers.teacher import TeacherWorker

    rec = records.create(conn, tenant="t1", type="distill", spec={}, queue="teacher")
    records.transition(conn, rec["id"], ("queued",), "running", started_at=time.time())
    register(conn, rec["id"], "t1", 4)
    worker = TeacherWorker(conn, name="reaper")
    for attempt in range(units.RETRIES + 1):
        assert units.claim(conn, f"dead-{attempt}", [], True, lease=0.05)
        # its worker "died": wait until the lease has lapsed
        wait_for(lambda: conn.zrangebyscore(units.LEASES, "-inf", repr(time.time())), 10, 0.02)
        worker._last_beat = 0.0
        worker.beat()
        status = records.get(conn, rec["id"])["status"]
        assert status == ("failed" if attempt == units.RETRIES else "running"), attempt
    failed = records.get(conn, rec["id"])
    assert failed["error"]["code"] == "worker_lost"
    assert not units.open_jobs(conn)  # its unit state is gone


def test_a_cancelled_queued_job_is_never_claimed(conn, session_home, tiny_llama):
    from api.datasets import save_dataset
    from service.store import ArtifactStore
    from workers import records
    from workers.lifecycle import Conflict, cancel, submit
    from workers.teacher import TeacherWorker

    store = ArtifactStore(session_home)
    ds = save_dataset(store, "t1", b'{"instruction": "x", "output": "y"}\n', "r.jsonl")["id"]
    job = submit(conn, store, "t1", "distill", DistillSpec(teacher=str(tiny_llama), dataset=ds))
    assert units.open_jobs(conn) == [job["id"]]
    assert cancel(conn, job)["status"] == "cancelled"
    with pytest.raises(Conflict):
        cancel(conn, records.get(conn, job["id"]))
    assert units.claim(conn, "w", [], True, 30) is None  # never handed to a worker
    TeacherWorker(conn, name="sweeper").beat()  # its unit state is cleaned up
    assert not units.open_jobs(conn)
    assert records.get(conn, job["id"])["started_at"] is None
