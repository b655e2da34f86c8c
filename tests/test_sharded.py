"""The scale test: one distill job sharded across 3 real teacher worker processes (a real
Redis, ``python -m workers.worker``), on a tiny random Llama. The sharded job writes the
same rows, in the same order, as the job run whole by one worker; each worker ran one
shard; and when a worker is SIGKILLed mid-shard, its shard is requeued, resumes from its
own partial file on another worker, and the output is still the same row for row.

The teacher has its weights re-drawn wider (as in test_distill.py) so greedy choices are
not near-ties that a different batch composition could flip; rows are all different
(an ``#i`` suffix), so a row out of place would show."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.conftest import ALPACA_ROWS

pytest_plugins = ["tests.redis_fixture"]
pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
WORKERS = ("teacher-a", "teacher-b", "teacher-c")
N_ROWS = 360


def wait_for(*args, **kwargs):
    from tests.redis_fixture import wait_for as wait  # loaded by pytest_plugins, not here

    return wait(*args, **kwargs)


@dataclass
class Farm:
    conn: redis.Redis
    procs: dict[str, subprocess.Popen]
    logs: Path


def start_teacher(name: str, url: str, home: Path, log: Path) -> subprocess.Popen:
    from tests.redis_fixture import start_worker

    # No DISTILLERY_THREADS: the three workers divide this machine's cores between them.
    return start_worker("teacher", url, home, log, name=name, fast_recovery=True,
                        DISTILLERY_THREADS=None)  # fmt: skip


@pytest.fixture(scope="module")
def farm(redis_server, session_home, tmp_path_factory):
    """Three teacher workers on a Redis database of their own (no other workers)."""
    from rq import Queue, Worker

    from tests.redis_fixture import own_db, stop_process

    url, conn = own_db(redis_server, 7)
    logs = tmp_path_factory.mktemp("farm-logs")
    procs = {name: start_teacher(name, url, session_home, logs / f"{name}.log") for name in WORKERS}
    try:
        wait_for(
            lambda: len(Worker.all(queue=Queue("teacher", connection=conn))) == len(WORKERS)
            or any(p.poll() is not None for p in procs.values()),
            180, 0.2, "three teacher workers to register",
        )  # fmt: skip
        for name, p in procs.items():
            assert p.poll() is None, (logs / f"{name}.log").read_text()
        yield Farm(conn, procs, logs)
    finally:
        for p in procs.values():
            stop_process(p)
        conn.flushdb()


@pytest.fixture(scope="module")
def dataset(farm, session_home) -> str:
    from api.datasets import save_dataset
    from service.store import ArtifactStore

    rows = [
        dict(r, instruction=f"{r['instruction']} (#{i})")
        for i, r in enumerate(ALPACA_ROWS * (N_ROWS // len(ALPACA_ROWS)))
    ]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return save_dataset(ArtifactStore(session_home), "t", data, "rows.jsonl")["id"]


def run_job(farm: Farm, spec, timeout: float = 600) -> dict:
    from service.store import get_store
    from workers import records
    from workers.submit import submit

    job = submit(farm.conn, get_store(), "t", "distill", spec)
    return wait_for(
        lambda: (r := records.get(farm.conn, job["id"]))["status"] in records.TERMINAL and r,
        timeout, 0.2, f"job {job['id']} to finish",
    )  # fmt: skip


def output_rows(job: dict) -> list[dict]:
    from service.store import get_store

    path = get_store().path("dataset", job["artifacts"]["dataset"]) / "rows.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def spec_for(teacher: Path, dataset: str, **kw):
    from service.specs import DistillSpec

    base = {"teacher": str(teacher), "dataset": dataset, "max_new_tokens": 12, "batch_size": 4}
    return DistillSpec(**(base | kw))


@pytest.fixture(scope="module")
def one_worker_rows(farm, wide_teacher, dataset) -> list[dict]:
    """The job run whole (shards=1: the single-worker path) by one of the workers."""
    job = run_job(farm, spec_for(wide_teacher, dataset, shards=1))
    assert job["status"] == "succeeded", job["error"]
    assert job["children"] == [] and "shards" not in job["metrics"]
    rows = output_rows(job)
    assert len(rows) == N_ROWS
    return rows


def shard_records(farm: Farm, job_id: str) -> list[dict]:
    from workers import records

    return [records.get(farm.conn, sid) for sid in records.get(farm.conn, job_id)["children"]]


def test_sharded_job_equals_one_worker_and_every_worker_took_part(
    farm, wide_teacher, dataset, one_worker_rows
):
    from workers import records

    job = run_job(farm, spec_for(wide_teacher, dataset, shards=3))
    assert job["status"] == "succeeded", job["error"]
    assert output_rows(job) == one_worker_rows

    shards = shard_records(farm, job["id"])
    assert [s["step"] for s in shards] == ["shard 1/3", "shard 2/3", "shard 3/3"]
    assert all(s["status"] == "succeeded" and s["type"] == "distill_shard" for s in shards)
    assert [s["metrics"]["row_range"] for s in shards] == [[0, 120], [120, 240], [240, 360]]
    ran_on = [s["worker"] for s in job["metrics"]["shards"]]
    assert sorted(ran_on) == sorted(WORKERS), ran_on  # each worker did a third
    from service.models import available_cores

    threads = max(1, available_cores() // len(WORKERS))
    assert [s["threads"] for s in job["metrics"]["shards"]] == [threads] * 3
    assert job["metrics"]["rows"] == N_ROWS and job["artifacts"]["dataset"]
    assert job["progress"]["rows_done"] == job["progress"]["rows_total"] == N_ROWS
    assert job["started_at"] in [s["started_at"] for s in shards]  # it began with a shard

    messages = [e["message"] for e in records.events(farm.conn, job["id"], limit=1000)[0]]
    assert [m for m in messages if m in records.STATUSES] == ["queued", "running", "succeeded"]
    for s in shards:
        assert f"{s['step']} running on {s['metrics']['worker']} (attempt 1)" in messages
    # the shards' work folders are gone once their rows are in the job's dataset
    from service.settings import get_settings

    assert not any((get_settings().home_dir() / "jobs" / s["id"]).exists() for s in shards)


def test_shard_progress_sums_into_the_job(redis_conn):
    from workers import records, shards

    pipe = redis_conn.pipeline()
    job = records.create(pipe, tenant="t", type="distill", spec={}, queue="teacher", pipe=pipe)
    planned = shards.create_shards(pipe, "t", job["id"], {"dataset": "x"}, 3, rows=10)
    pipe.execute()
    ids = [sid for sid, _ in planned]
    assert records.get(redis_conn, job["id"])["children"] == ids
    assert [d["shard"] for _, d in planned] == [0, 1, 2] and planned[0][1]["shards"] == 3
    start = shards.sum_progress(redis_conn, job["id"], ids)
    assert (start["rows_done"], start["rows_total"], start["shards_done"]) == (0, 10, 0)
    for sid, done, total, status in zip(ids, (3, 1, 0), (3, 3, 4), ("succeeded", "running", "queued"),
                                        strict=True):  # fmt: skip
        records.update(redis_conn, sid, status=status,
                       progress={"rows_done": done, "rows_total": total, "tokens_per_s": 5.0})  # fmt: skip
    got = shards.sum_progress(redis_conn, job["id"], ids)
    assert records.get(redis_conn, job["id"])["progress"] == got
    assert (got["rows_done"], got["rows_total"], got["shards"], got["shards_done"]) == (4, 10, 3, 1)
    assert got["tokens_per_s"] == 5.0  # only the running shard is generating


def test_a_gather_step_starts_running_or_requeued_never_settled(redis_conn):
    from workers import records, shards
    from workers.execute import start

    pipe = redis_conn.pipeline()
    job = records.create(pipe, tenant="t", type="distill", spec={}, queue="teacher", pipe=pipe)
    shards.create_shards(pipe, "t", job["id"], {"dataset": "x"}, 2, rows=4)
    pipe.execute()
    records.transition(redis_conn, job["id"], ("queued",), "running", started_at=123.0)
    assert start(redis_conn, records.get(redis_conn, job["id"]))  # all shards done: gather
    rec = records.get(redis_conn, job["id"])
    assert (rec["status"], rec["started_at"], rec["attempts"]) == ("running", 123.0, 1)
    # its worker died: RQ requeued it (workers.jobs.on_rq_failure), and it runs again
    records.transition(redis_conn, job["id"], ("running",), "queued")
    assert start(redis_conn, records.get(redis_conn, job["id"]))
    rec = records.get(redis_conn, job["id"])
    assert (rec["status"], rec["started_at"], rec["attempts"]) == ("running", 123.0, 2)
    records.transition(redis_conn, job["id"], ("running",), "cancelled")
    assert not start(redis_conn, records.get(redis_conn, job["id"]))


def test_cancelling_a_sharded_job_cancels_every_shard(farm, wide_teacher, dataset):
    from service.store import get_store
    from workers import records
    from workers.submit import cancel, submit

    # 6 shards on 3 workers: three run, three wait in the queue.
    spec = spec_for(wide_teacher, dataset, shards=6, batch_size=1, max_new_tokens=32)
    job = submit(farm.conn, get_store(), "t", "distill", spec)
    wait_for(
        lambda: sum(s["progress"].get("rows_done", 0) >= 1
                    for s in shard_records(farm, job["id"])) == 3,
        180, 0.05, "three shards to make progress",
    )  # fmt: skip
    assert cancel(farm.conn, records.get(farm.conn, job["id"]))["status"] == "cancelled"

    def stopped():
        shards = shard_records(farm, job["id"])
        return all(s["status"] in records.TERMINAL for s in shards) and shards

    shards = wait_for(stopped, 120, 0.2, "every shard to stop")
    assert [s["status"] for s in shards] == ["cancelled"] * 6
    ran = [s for s in shards if s["started_at"]]
    assert len(ran) == 3 and all(
        s["progress"]["rows_done"] < s["progress"]["rows_total"] for s in ran
    )
    rec = records.get(farm.conn, job["id"])
    assert rec["status"] == "cancelled" and rec["artifacts"] == {}
    # the workers are free again, and the cancelled job's gather step never runs
    again = run_job(farm, spec_for(wide_teacher, dataset, limit=6, shards=3))
    assert again["status"] == "succeeded", again["error"]
    assert records.get(farm.conn, job["id"])["attempts"] == 0


def test_a_failing_shard_fails_the_job(farm, dataset, tmp_path):
    from workers import records

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # a model folder that does not load
    job = run_job(farm, spec_for(broken, dataset, shards=3))
    assert job["status"] == "failed"
    assert job["error"]["where"] in job["children"] and "distill_shard" in job["error"]["message"]
    statuses = [s["status"] for s in shard_records(farm, job["id"])]
    assert "failed" in statuses and set(statuses) <= {"failed", "cancelled"}
    assert records.get(farm.conn, job["id"])["attempts"] == 0  # no gather


def test_a_shard_whose_worker_is_killed_resumes_elsewhere(
    farm, wide_teacher, dataset, one_worker_rows
):
    from service.store import get_store
    from workers import records
    from workers.submit import submit

    spec = spec_for(wide_teacher, dataset, shards=3, batch_size=1)
    job = submit(farm.conn, get_store(), "t", "distill", spec)

    def victim():
        for s in shard_records(farm, job["id"]):
            done = s["progress"].get("rows_done", 0)
            if s["status"] == "running" and s.get("worker") and 2 <= done:
                return s
        return None

    shard = wait_for(victim, 180, 0.02, "a shard to write some rows")
    killed = shard["worker"]
    os.kill(farm.procs[killed].pid, signal.SIGKILL)
    farm.procs[killed].wait()
    at_kill = records.get(farm.conn, shard["id"])["progress"]
    assert at_kill["rows_done"] < at_kill["rows_total"]  # the kill landed mid-shard

    rec = wait_for(
        lambda: (r := records.get(farm.conn, job["id"]))["status"] in records.TERMINAL and r,
        400, 0.5, "the job to finish on the remaining workers",
    )  # fmt: skip
    assert rec["status"] == "succeeded", rec["error"]
    assert output_rows(rec) == one_worker_rows

    redone = records.get(farm.conn, shard["id"])
    assert redone["attempts"] == 2 and redone["metrics"]["worker"] != killed
    resumed = [e["message"] for e in records.events(farm.conn, shard["id"], limit=1000)[0]
               if e["message"].startswith("resuming:")]  # fmt: skip
    assert resumed and int(resumed[0].split()[1]) >= 2  # rows written are not generated again
    assert redone["metrics"]["resumed_rows"] >= 2
    assert rec["metrics"]["resumed_rows"] == redone["metrics"]["resumed_rows"]
