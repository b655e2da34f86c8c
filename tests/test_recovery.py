"""Crash recovery with real processes killed by signals: a trainer worker SIGKILLed
mid-finetune (the job resumes from its checkpoint and ends with the weights and loss log
of an uninterrupted run), Redis restarted mid-job, the API SIGKILLed and restarted, and a
job whose worker dies with no retries left (it ends `failed`, never hangs `running`), and
jobs whose model is broken (they end `failed` with the error after one attempt)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis
import torch

from tests.conftest import ALPACA_ROWS

pytest_plugins = ["tests.redis_fixture"]
pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def wait_for(*args, **kwargs):
    from tests.redis_fixture import wait_for as wait

    return wait(*args, **kwargs)


def start_worker(queue: str, url: str, home: Path, log: Path) -> subprocess.Popen:
    from tests.redis_fixture import start_worker as start

    return start(queue, url, home, log, fast_recovery=True, HF_HUB_OFFLINE="1")


def own_db(redis_server, db: int) -> tuple[str, redis.Redis]:
    from tests.redis_fixture import own_db as own

    return own(redis_server, db)


def children_of(job_id: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"workers.child {job_id}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def finished(conn, job_id):
    from workers import records

    rec = records.get(conn, job_id)
    return rec if rec["status"] in records.TERMINAL else None


def messages(conn, job_id) -> list[str]:
    from workers import records

    return [e["message"] for e in records.events(conn, job_id, limit=1000)[0]]


def test_a_killed_trainer_worker_resumes_from_its_checkpoint(
    redis_server, session_home, tiny_llama, tmp_path
):
    """SIGKILL the trainer worker mid-finetune; its child process exits with it; RQ finds
    the job abandoned and requeues it; a new worker resumes from the last checkpoint. The
    model and loss log equal those of an uninterrupted run."""
    from api.datasets import save_dataset
    from service.finetune import run_finetune
    from service.specs import FinetuneSpec
    from service.store import ArtifactStore
    from tests.redis_fixture import stop_process
    from workers import records
    from workers.lifecycle import submit

    url, conn = own_db(redis_server, 7)
    store = ArtifactStore(session_home)
    ds = save_dataset(store, "t", "".join(json.dumps(r) + "\n" for r in ALPACA_ROWS).encode(),
                      "rows.jsonl")["id"]  # fmt: skip
    spec = FinetuneSpec(model=str(tiny_llama), dataset=ds, epochs=30, batch_size=1,
                        micro_batch_size=1, max_length=64, checkpoint_every=4)  # fmt: skip
    steps_total = 30 * len(ALPACA_ROWS)
    job = submit(conn, store, "t", "finetune", spec)
    ckpt = session_home / "jobs" / job["id"] / "model.ckpt"

    first = start_worker("train", url, session_home, tmp_path / "first.log")
    second = None
    try:
        wait_for(
            lambda: ckpt.exists()
            and records.get(conn, job["id"])["progress"].get("step", 0) >= 6,
            300, 0.02, "a checkpoint and a few steps",
        )  # fmt: skip
        child = children_of(job["id"])
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        killed_at = records.get(conn, job["id"])["progress"]["step"]
        assert killed_at < steps_total
        # the child notices its parent is gone and exits: no two runs of one job at once
        wait_for(lambda: not children_of(job["id"]), 30, 0.2, "the orphaned child to exit")
        assert child, "the job ran in a child process"
        # The child may take a few more steps before it notices (progress also lags): the
        # run resumes from the last checkpoint it wrote, whatever that step is.
        last_ckpt = torch.load(ckpt, weights_only=True)["step"]
        assert killed_at // 4 * 4 <= last_ckpt < steps_total
        assert records.get(conn, job["id"])["status"] == "running"  # until RQ notices
        second = start_worker("train", url, session_home, tmp_path / "second.log")
        rec = wait_for(lambda: finished(conn, job["id"]), 600, 0.5, "the job to finish")
    finally:
        for p in (first, second):
            if p is not None:
                stop_process(p)
    assert rec["status"] == "succeeded", rec["error"]
    assert rec["attempts"] == 2
    said = messages(conn, job["id"])
    statuses = [m for m in said if m in ("queued", "running", "succeeded")]
    assert statuses == ["queued", "running", "queued", "running", "succeeded"], said
    resumed = [m for m in said if m.startswith("resumed from")]
    assert resumed, said
    resumed_at = int(resumed[0].rsplit(" ", 1)[1])
    assert resumed_at == last_ckpt and resumed_at % 4 == 0  # a checkpoint step
    assert rec["metrics"]["resumed_from"] == resumed_at

    got = store.path("model", rec["artifacts"]["model"]) / "model"
    ref = tmp_path / "uninterrupted"
    run_finetune(spec, ref)
    ref_log = json.loads((ref / "train_log.json").read_text())["steps"]
    assert json.loads((got / "train_log.json").read_text())["steps"] == ref_log
    assert len(ref_log) == steps_total
    from safetensors.torch import load_file

    want, have = load_file(ref / "model.safetensors"), load_file(got / "model.safetensors")
    assert have.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(have[k], want[k], rtol=0, atol=1e-6)
    conn.flushdb()


def test_a_job_whose_worker_dies_with_no_retry_left_ends_failed(
    redis_server, session_home, tiny_llama, tmp_path
):
    """Heartbeats stop, RQ's abandoned-job handling fails the job for good: `failed`
    with the reason, never `running` forever."""
    from api.datasets import save_dataset
    from service.specs import FinetuneSpec
    from service.store import ArtifactStore
    from tests.redis_fixture import stop_process
    from workers import records
    from workers.lifecycle import submit

    url, conn = own_db(redis_server, 8)
    store = ArtifactStore(session_home)
    ds = save_dataset(store, "t", "".join(json.dumps(r) + "\n" for r in ALPACA_ROWS).encode(),
                      "rows.jsonl")["id"]  # fmt: skip
    spec = FinetuneSpec(model=str(tiny_llama), dataset=ds, epochs=50, batch_size=1,
                        micro_batch_size=1, max_length=64)  # fmt: skip
    job = submit(conn, store, "t", "finetune", spec)
    conn.hset(f"rq:job:{job['id']}", "retries_left", 0)  # its retries are used up

    first = start_worker("train", url, session_home, tmp_path / "first.log")
    second = None
    try:
        wait_for(lambda: children_of(job["id"]), 120, 0.1, "the job's child process")
        wait_for(lambda: records.get(conn, job["id"])["status"] == "running", 60, 0.1)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        second = start_worker("train", url, session_home, tmp_path / "second.log")
        rec = wait_for(lambda: finished(conn, job["id"]), 120, 0.5, "the job to be failed")
    finally:
        for p in (first, second):
            if p is not None:
                stop_process(p)
    assert rec["status"] == "failed" and rec["finished_at"]
    assert rec["error"]["code"] == "worker_lost" and "retries ran out" in rec["error"]["message"]
    assert messages(conn, job["id"])[-1] == "failed"
    assert not children_of(job["id"])
    conn.flushdb()


def test_a_redis_restart_mid_job_loses_no_record_or_event(session_home, tiny_llama, tmp_path):
    """Redis is stopped and started again (same port, same append-only file) while a
    distill job runs: every record and event written before is there after, and the job
    still finishes with every row once its worker (restarted if it died) goes on."""
    from api.datasets import save_dataset
    from api.keys import create_key, tenant_for
    from api.redis_server import start_redis
    from service.specs import DistillSpec
    from service.store import ArtifactStore
    from tests.redis_fixture import stop_process
    from workers import records
    from workers.lifecycle import submit

    server = start_redis(tmp_path / "redis")
    url = server.url
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    conn = redis.Redis.from_url(url)
    store = ArtifactStore(session_home)
    n_rows = len(ALPACA_ROWS) * 40
    ds = save_dataset(store, "t", "".join(json.dumps(r) + "\n" for r in ALPACA_ROWS * 40).encode(),
                      "rows.jsonl")["id"]  # fmt: skip
    key = create_key(conn, "t")
    done_job = records.create(conn, tenant="t", type="prune", spec={"blocks": 1}, queue=None)
    records.transition(conn, done_job["id"], ("queued",), "succeeded")
    spec = DistillSpec(teacher=str(tiny_llama), dataset=ds, batch_size=1, max_new_tokens=16)
    job = submit(conn, store, "t", "distill", spec)
    worker = start_worker("teacher", url, session_home, tmp_path / "worker.log")
    restarted = None
    try:
        wait_for(lambda: records.get(conn, job["id"])["progress"].get("rows_done", 0) >= 2,
                 180, 0.05, "some rows")  # fmt: skip
        before_events = records.events(conn, job["id"], limit=10_000)[0]
        before_done = records.get(conn, done_job["id"])
        server.stop()
        server = start_redis(tmp_path / "redis", port=port)
        conn = redis.Redis.from_url(url)
        # nothing written before the restart is lost
        assert tenant_for(conn, key) == "t"
        assert records.get(conn, done_job["id"]) == before_done
        after = records.events(conn, job["id"], limit=10_000)[0]
        assert after[: len(before_events)] == before_events
        if worker.poll() is not None:  # it lost Redis: a supervisor starts it again
            restarted = start_worker("teacher", url, session_home, tmp_path / "again.log")
        rec = wait_for(lambda: finished(conn, job["id"]), 600, 0.5, "the job to finish")
    finally:
        for p in (worker, restarted):
            if p is not None:
                stop_process(p)
        server.stop()
    assert rec["status"] == "succeeded", rec["error"]
    rows = (store.path("dataset", rec["artifacts"]["dataset"]) / "rows.jsonl").read_text()
    assert len(rows.splitlines()) == n_rows


def start_api(url: str, home: Path, port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, REDIS_URL=url, DISTILLERY_HOME=str(home), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "api.cli", "api", "--port", str(port)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def test_the_api_killed_and_restarted_loses_nothing(
    redis_server, redis_conn, session_home, workers, tiny_llama, tenant_key, tmp_path
):
    from api.redis_server import free_port
    from service.models import import_model
    from service.store import ArtifactStore
    from tests.redis_fixture import stop_process

    model = import_model(ArtifactStore(session_home), tenant_key[0], tiny_llama)["id"]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {tenant_key[1]}"}

    def up() -> subprocess.Popen:
        proc = start_api(redis_server.url, session_home, port, tmp_path / "api.log")

        def ready():
            assert proc.poll() is None, (tmp_path / "api.log").read_text()
            try:
                return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 60, 0.2, "the API")
        return proc

    api = up()
    try:
        with httpx.Client(base_url=base, headers=auth, timeout=30) as c:
            body = "".join(json.dumps(r) + "\n" for r in ALPACA_ROWS)
            ds = c.post(
                "/v1/datasets", content=body, headers={"Content-Type": "application/x-ndjson"}
            )
            assert ds.status_code == 201, ds.text
            spec = {"type": "distill", "teacher": model, "dataset": ds.json()["id"],
                    "max_new_tokens": 8, "batch_size": 1}  # fmt: skip
            job = c.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "once"}).json()
            before = {
                "dataset": c.get(f"/v1/datasets/{ds.json()['id']}").json(),
                "events": c.get(f"/v1/jobs/{job['id']}/events").json()["data"],
            }
        api.send_signal(signal.SIGKILL)
        api.wait()
        api = up()
        with httpx.Client(base_url=base, headers=auth, timeout=30) as c:
            assert c.get(f"/v1/datasets/{ds.json()['id']}").json() == before["dataset"]
            events = c.get(f"/v1/jobs/{job['id']}/events?limit=1000").json()["data"]
            assert events[: len(before["events"])] == before["events"]
            again = c.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "once"})
            assert again.status_code == 202 and again.json()["id"] == job["id"]
            done = wait_for(
                lambda: (j := c.get(f"/v1/jobs/{job['id']}").json())["status"]
                in ("succeeded", "failed", "cancelled") and j,
                300, 0.3, "the job",
            )  # fmt: skip
            assert done["status"] == "succeeded", done["error"]
            rows = c.get(f"/v1/jobs/{job['id']}/result").text.splitlines()
            assert len(rows) == len(ALPACA_ROWS)
            assert [j["id"] for j in c.get("/v1/jobs").json()["data"]] == [job["id"]]
    finally:
        stop_process(api)


def test_jobs_that_fail_for_good_end_failed_with_the_error(
    api, workers, session_home, tiny_llama, tenant_key, tmp_path
):
    """A model directory whose weights are not a model gets past import (it has a config
    and a weights file) and fails in the worker: the job ends `failed` with the loader's
    error after one attempt, and the worker takes the next job."""
    import shutil

    from service.models import import_model
    from service.store import ArtifactStore

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    (broken / "model.safetensors").write_bytes(b"\x00not safetensors" * 64)
    model = import_model(ArtifactStore(session_home), tenant_key[0], broken)["id"]
    body = "".join(json.dumps(r) + "\n" for r in ALPACA_ROWS[:2])
    ds = api.post("/v1/datasets", content=body, headers={"Content-Type": "application/x-ndjson"})
    ds = ds.json()["id"]

    def run(spec: dict) -> dict:
        job = api.post("/v1/jobs", json=spec)
        assert job.status_code == 202, job.text
        return wait_for(
            lambda: (j := api.get(f"/v1/jobs/{job.json()['id']}").json())["status"]
            in ("succeeded", "failed", "cancelled") and j,
            240, 0.3, "the job",
        )  # fmt: skip

    for spec in (
        {"type": "distill", "teacher": model, "dataset": ds, "max_new_tokens": 4},
        {"type": "finetune", "model": model, "dataset": ds, "epochs": 1},
    ):
        done = run(spec)
        assert done["status"] == "failed" and done["attempts"] == 1, done
        assert done["error"]["code"] == "invalid_model", done["error"]
        assert "cannot load model" in done["error"]["message"]
    good = import_model(ArtifactStore(session_home), tenant_key[0], tiny_llama)["id"]
    done = run({"type": "distill", "teacher": good, "dataset": ds, "max_new_tokens": 4})
    assert done["status"] == "succeeded", done["error"]
