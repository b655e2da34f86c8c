"""The teacher tier as a server: real teacher worker processes on real vLLM (tiny model),
many jobs at once.

    .venv/bin/python -m pytest -q tests/test_teacher_service.py

- one worker serves concurrent jobs in one batch; an interactive request goes ahead of
  two big bulk jobs, which progress side by side; a cancel stops a job inside the loop;
  a resubmitted job comes from the rewrite cache (that tenant's only; ``cache: false``
  bypasses it);
- two hosts (separate homes, one Redis, one S3 store on moto) serve two jobs together; one
  is SIGKILLed with rows of both in its engine; the other finishes both, keeping every row
  written before the kill as it was, none lost, none twice.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import time

import pytest

from tests.conftest import ALPACA_ROWS
from tests.test_store import s3_server, s3_url  # noqa: F401 - fixtures

pytest_plugins = ["tests.redis_fixture"]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed"),
]


def worker_env(**more: str) -> dict[str, str]:
    return {
        "DISTILLERY_VLLM_ENFORCE_EAGER": "1",
        "DISTILLERY_VLLM_KV_CACHE_GIB": "1",
        "DISTILLERY_THREADS": "1",
        "DISTILLERY_UNIT_ROWS": "4",
        "DISTILLERY_UNIT_LEASE": "3",
        **more,
    }


def rows_data(n: int, tag: str = "") -> bytes:
    rows = [
        {**r, "instruction": f"{r['instruction']} ({tag}{k})"}
        for k, r in enumerate((ALPACA_ROWS * (n // len(ALPACA_ROWS) + 1))[:n])
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


class Service:
    """Submit and follow jobs on one Redis db and one store, as the API does."""

    def __init__(self, conn, store, teacher: str):
        self.conn, self.store, self.teacher = conn, store, teacher

    def dataset(self, tenant: str, n: int, tag: str = "") -> str:
        from api.datasets import save_dataset

        return save_dataset(self.store, tenant, rows_data(n, tag), "rows.jsonl")["id"]

    def submit(self, tenant: str, ds: str, **spec) -> str:
        from service.specs import DistillSpec
        from workers.lifecycle import submit

        spec = DistillSpec(teacher=self.teacher, dataset=ds, dtype="float32", **spec)
        return submit(self.conn, self.store, tenant, "distill", spec)["id"]

    def rec(self, job_id: str) -> dict:
        from workers import records

        return records.get(self.conn, job_id)

    def done(self, job_id: str) -> int:
        return self.rec(job_id)["progress"].get("rows_done", 0)

    def wait(self, *job_ids: str, timeout: float = 300) -> list[dict]:
        from tests.redis_fixture import wait_for
        from workers import records

        wait_for(
            lambda: all(self.rec(j)["status"] in records.TERMINAL for j in job_ids),
            timeout,
            0.1,
            "jobs to end",
        )
        return [self.rec(j) for j in job_ids]

    def rows(self, rec: dict) -> list[dict]:
        path = self.store.path("dataset", rec["artifacts"]["dataset"]) / "rows.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_worker_serves_many_jobs_at_once(redis_server, session_home, tiny_llama, tmp_path):
    from service.store import ArtifactStore
    from tests.redis_fixture import own_db, start_worker, stop_process, wait_for
    from workers.lifecycle import cancel

    url, conn = own_db(redis_server, 8)
    svc = Service(conn, ArtifactStore(session_home), str(tiny_llama))
    worker = start_worker("teacher", url, session_home, tmp_path / "w.log", **worker_env())
    try:
        # Warm: the engine loads once, on the first job.
        svc.wait(svc.submit("t1", svc.dataset("t1", 2, "warm"), max_new_tokens=4))

        # Concurrent small jobs share the engine's batch.
        # Uploads first, then the submissions back to back (a fast machine finishes a
        # 4-row job in a fraction of a second).
        tenants = ["t1", "t2"] * 4
        sets = [svc.dataset(t, 4, f"s{k}") for k, t in enumerate(tenants)]
        small = [svc.submit(t, ds, max_new_tokens=16) for t, ds in zip(tenants, sets, strict=True)]
        recs = svc.wait(*small)
        assert all(r["status"] == "succeeded" for r in recs), [r["error"] for r in recs]
        assert max(r["metrics"]["peak_jobs_in_batch"] for r in recs) >= 3

        # Two tenants' big bulk jobs, back to back, then an interactive request.
        big = dict(max_new_tokens=48)
        x = svc.submit("t1", svc.dataset("t1", 192, "x"), **big)
        y = svc.submit("t2", svc.dataset("t2", 192, "y"), **big)
        wait_for(lambda: svc.done(x) >= 8, 120, 0.05, "rows of the first bulk job")
        z = svc.submit("t3", svc.dataset("t3", 2, "z"), max_new_tokens=48, priority="interactive")
        w = svc.submit("t1", svc.dataset("t1", 192, "w"), **big)
        wait_for(lambda: svc.done(w) >= 4, 120, 0.05, "rows of the job to cancel")
        assert svc.rec(x)["status"] == "running"
        cancel(conn, svc.rec(w))
        t_cancel = time.time()
        # Follow the two bulk jobs: when the first ends, the second is well on its way.
        seen = {}
        while True:
            rx, ry = svc.rec(x), svc.rec(y)
            if rx["status"] == "succeeded" or ry["status"] == "succeeded":
                seen = {x: svc.done(x), y: svc.done(y)}
                break
            time.sleep(0.05)
        rx, ry, rz, rw = svc.wait(x, y, z, w)
    finally:
        stop_process(worker)
    assert rw["status"] == "cancelled" and rw["finished_at"] - t_cancel < 30
    assert rw["progress"]["rows_done"] < 192
    assert rz["status"] == rx["status"] == ry["status"] == "succeeded"
    assert rz["finished_at"] < min(rx["finished_at"], ry["finished_at"])  # interactive first
    assert min(seen.values()) >= 0.5 * 192, seen  # side by side, neither starved
    assert rz["metrics"]["rows"] == 2 and rz["metrics"]["engine_rows"] == 2
    for r in (rx, ry):
        m = r["metrics"]
        assert m["rows"] == 192 and m["engine_rows"] == 192 and m["cached_rows"] == 0
        assert m["completion_tokens"] > 0 and m["prompt_tokens"] > 0
        assert m["time_queued"] >= 0 and m["time_to_first_row"] > 0 and m["tokens_per_s"] > 0

    # Resubmitted: every row from the cache, no engine call; the rows are the same.
    worker = start_worker("teacher", url, session_home, tmp_path / "w2.log", **worker_env())
    try:
        again = svc.submit("t1", rx["spec"]["dataset"], **big)
        other = svc.submit("t3", svc.dataset("t3", 192, "x"), **big)  # t1's rows, t3's cache
        bypass = svc.submit("t1", rx["spec"]["dataset"], cache=False, max_new_tokens=48)
        ra, ro, rb = svc.wait(again, other, bypass)
    finally:
        stop_process(worker)
    assert ra["status"] == ro["status"] == rb["status"] == "succeeded"
    assert ra["metrics"]["cached_rows"] == 192 and ra["metrics"]["engine_rows"] == 0
    assert svc.rows(ra) == svc.rows(rx)
    assert ro["metrics"]["cached_rows"] == 0
    assert rb["metrics"]["cached_rows"] == 0 and rb["metrics"]["engine_rows"] == 192


def test_two_hosts_serve_jobs_together_and_one_is_killed(
    redis_server, tiny_llama, tmp_path, request
):
    s3_options = request.getfixturevalue("s3_server")
    bucket_url = request.getfixturevalue("s3_url")
    from service.store import ArtifactStore
    from tests.redis_fixture import own_db, start_worker, stop_process, wait_for
    from workers import records, units

    url, conn = own_db(redis_server, 9)
    options = json.dumps(s3_options)
    # 16 rows in each engine: each host holds a few units of each job at a time.
    env = worker_env(DISTILLERY_STORE_URL=bucket_url, DISTILLERY_STORE_OPTIONS=options,
                     DISTILLERY_TEACHER_MAX_ROWS="16")  # fmt: skip
    homes = [tmp_path / f"host{k}" for k in range(3)]
    svc = Service(conn, ArtifactStore(homes[2], bucket_url, s3_options), str(tiny_llama))
    a = start_worker("teacher", url, homes[0], tmp_path / "a.log", name="host-a", **env)
    b = start_worker("teacher", url, homes[1], tmp_path / "b.log", name="host-b", **env)
    try:
        # Warm both hosts: an idle worker takes any unit, so two small jobs load both engines.
        warm = [svc.submit("t0", svc.dataset("t0", 1, f"w{k}"), max_new_tokens=2) for k in (0, 1)]
        logs = [tmp_path / "a.log", tmp_path / "b.log"]
        wait_for(lambda: all(f.exists() and "loaded teacher" in f.read_text() for f in logs),
                 300, 0.2, "both hosts to load their engines")  # fmt: skip
        svc.wait(*warm)
        jobs = [svc.submit(t, svc.dataset(t, 160, t), max_new_tokens=48) for t in ("t1", "t2")]

        def both_hosts_wrote() -> bool:
            use = [units.usage(conn, j) for j in jobs]
            return all(u.get("rows_by:host-a", 0) >= 4 and u.get("rows_by:host-b", 0) >= 4
                       for u in use)  # fmt: skip

        wait_for(both_hosts_wrote, 180, 0.05, "both hosts to write rows of both jobs")
        before = {j: units.read_rows(conn, j) for j in jobs}
        os.kill(a.pid, signal.SIGKILL)
        a.wait()
        assert all(len(before[j]) < 160 for j in jobs)
        recs = svc.wait(*jobs)
    finally:
        for p in (a, b):
            stop_process(p)
    from service.distill import Finished

    for job_id, rec in zip(jobs, recs, strict=True):
        assert rec["status"] == "succeeded", rec["error"]
        rows = svc.rows(rec)  # read through a third home: the store is S3
        assert len(rows) == 160
        data = [json.loads(line) for line in rows_data(160, rec["tenant"]).splitlines()]
        assert [r["instruction"] for r in rows] == [d["instruction"] for d in data]
        for index, line in before[job_id].items():  # written before the kill: kept as is
            assert rows[index] == Finished.from_json(line).row
        by = rec["metrics"]["rows_by_worker"]
        assert by["host-a"] >= 4 and by["host-b"] >= 4 and sum(by.values()) == 160
        messages = [e["message"] for e in records.events(conn, job_id, limit=1000)[0]]
        assert any("requeued to resume" in m for m in messages)
    assert not units.open_jobs(conn)  # nothing left behind in the unit store
