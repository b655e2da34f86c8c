"""Data-parallel fine-tuning under torchrun with 2 gloo processes on CPU, on the tiny
Llama: the run finishes and its loss log and weights match a single-process run of the
same effective batch. 7 rows in batches of 3 give steps of 3, 3 and 1 examples, so the
ranks' shares are uneven and in the last step rank 1 has none.

    .venv/bin/python -m pytest -q tests/test_finetune_ddp.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from service.finetune import run_finetune
from service.specs import FinetuneSpec
from tests.conftest import ALPACA_ROWS

pytest_plugins = ["tests.redis_fixture"]
ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {"batch_size": 3, "micro_batch_size": 1, "epochs": 1, "lr": 1e-3, "lora_dropout": 0.0}


def weights(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.slow
@pytest.mark.parametrize("kd", [False, True], ids=["ce", "logit-distillation"])
def test_two_gloo_ranks_match_one_process(tmp_path, tiny_llama, wide_teacher, kd):
    # With a teacher, the CE and KL parts are summed across ranks too, also in the last
    # step where rank 1 has no example (it must still join every collective).
    options = OPTIONS | ({"teacher": str(wide_teacher), "kd_weight": 0.5} if kd else {})
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ALPACA_ROWS[:7]))
    spec = FinetuneSpec(model=str(tiny_llama), dataset=str(data), **options)
    single = run_finetune(spec, tmp_path / "single")

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", "2", "-m", "service.cli", "finetune",
           "--model", str(tiny_llama), "--dataset", str(data),
           "--out", str(tmp_path / "ddp"), *flags]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", DISTILLERY_THREADS="1", DISTILLERY_DEVICE="cpu")
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    log = json.loads((tmp_path / "ddp" / "train_log.json").read_text())
    assert log["world_size"] == 2 and single["world_size"] == 1
    ref = json.loads((tmp_path / "single" / "train_log.json").read_text())
    assert [s["step"] for s in log["steps"]] == [1, 2, 3]
    # The logged loss is the sum over ranks of each one's share: equal to the single
    # process's only if both ranks' shares were counted.
    for a, b in zip(log["steps"], ref["steps"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["tokens"] == b["tokens"] and a["lr"] == b["lr"]
        for part in ("ce", "kl") if kd else ():
            assert a[part] == pytest.approx(b[part], rel=1e-4)

    base, one, two = weights(tiny_llama), weights(tmp_path / "single"), weights(tmp_path / "ddp")
    assert one.keys() == two.keys()
    moved = max((one[k] - base[k]).abs().max().item() for k in one if k in base)
    assert moved > 1e-4  # training changed the weights, so the comparison means something
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    assert not (tmp_path / "ddp.ckpt").exists()  # rank 0 cleaned up its checkpoint


@pytest.mark.slow
@pytest.mark.integration
def test_a_trainer_worker_runs_a_finetune_job_under_torchrun(
    redis_server, session_home, tiny_llama, tmp_path
):
    """DISTILLERY_TRAIN_PROCS=2: the trainer worker starts the job's child under torchrun;
    rank 0 runs the job (record, progress, output), rank 1 trains its share."""

    from api.datasets import save_dataset
    from service.store import ArtifactStore
    from tests.redis_fixture import own_db, stop_process, wait_for
    from workers import records
    from workers.lifecycle import submit

    url, conn = own_db(redis_server, 9)
    store = ArtifactStore(session_home)
    data = "".join(json.dumps(r) + "\n" for r in ALPACA_ROWS[:7]).encode()
    ds = save_dataset(store, "t", data, "rows.jsonl")["id"]
    job = submit(conn, store, "t", "finetune", FinetuneSpec(model=str(tiny_llama), dataset=ds,
                                                            **OPTIONS))  # fmt: skip
    env = dict(os.environ, REDIS_URL=url, DISTILLERY_HOME=str(session_home), OMP_NUM_THREADS="1",
               DISTILLERY_THREADS="1", DISTILLERY_DEVICE="cpu", DISTILLERY_TRAIN_PROCS="2")  # fmt: skip
    worker = subprocess.Popen(
        [sys.executable, "-m", "workers.worker", "--queues", "train", "--burst"],
        cwd=ROOT, env=env, stdout=(tmp_path / "worker.log").open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        rec = wait_for(
            lambda: (r := records.get(conn, job["id"]))["status"] in records.TERMINAL and r,
            600, 0.5, "the finetune job to finish",
        )  # fmt: skip
    finally:
        stop_process(worker)
    assert rec["status"] == "succeeded", (
        rec["error"],
        (tmp_path / "worker.log").read_text()[-3000:],
    )
    got = store.path("model", rec["artifacts"]["model"]) / "model"
    log = json.loads((got / "train_log.json").read_text())
    assert log["world_size"] == 2

    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(data)
    single = tmp_path / "single"
    run_finetune(FinetuneSpec(model=str(tiny_llama), dataset=str(rows), **OPTIONS), single)
    ref = json.loads((single / "train_log.json").read_text())
    assert [s["loss"] for s in log["steps"]] == pytest.approx(
        [s["loss"] for s in ref["steps"]], rel=1e-4
    )
    one, two = weights(single), weights(got)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    conn.flushdb()


@pytest.mark.slow
@pytest.mark.integration
def test_torchrun_ranks_exit_when_their_trainer_worker_dies(
    redis_server, session_home, tiny_llama, tmp_path
):
    """SIGKILL the trainer worker mid-job: torchrun's agent outlives it, but every rank
    watches the worker's pid and exits, so a retried job never runs twice at once."""
    import signal

    from api.datasets import save_dataset
    from service.store import ArtifactStore
    from tests.redis_fixture import own_db, stop_process, wait_for
    from workers import records
    from workers.lifecycle import submit

    url, conn = own_db(redis_server, 10)
    store = ArtifactStore(session_home)
    # Long enough (~8000 steps) that the ranks cannot simply finish while the test waits.
    data = "".join(json.dumps(r) + "\n" for r in ALPACA_ROWS * 20).encode()
    ds = save_dataset(store, "t", data, "rows.jsonl")["id"]
    spec = FinetuneSpec(model=str(tiny_llama), dataset=ds, epochs=100, batch_size=2,
                        micro_batch_size=1, max_length=64)  # fmt: skip
    job = submit(conn, store, "t", "finetune", spec)
    env = dict(os.environ, REDIS_URL=url, DISTILLERY_HOME=str(session_home), OMP_NUM_THREADS="1",
               DISTILLERY_THREADS="1", DISTILLERY_DEVICE="cpu", DISTILLERY_TRAIN_PROCS="2")  # fmt: skip
    worker = subprocess.Popen(
        [sys.executable, "-m", "workers.worker", "--queues", "train"],
        cwd=ROOT, env=env, stdout=(tmp_path / "worker.log").open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip

    def ranks() -> list[int]:
        out = subprocess.run(["pgrep", "-f", f"workers.child {job['id']}"],
                             capture_output=True, text=True)  # fmt: skip
        return [int(p) for p in out.stdout.split()]

    try:
        wait_for(
            lambda: records.get(conn, job["id"])["progress"].get("step", 0) >= 2,
            300, 0.1, "training to start on both ranks",
        )  # fmt: skip
        assert len(ranks()) >= 2  # torchrun's agent and its two ranks share the command line
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        wait_for(lambda: not ranks(), 30, 0.2, "every rank and the agent to exit")
        assert records.get(conn, job["id"])["status"] == "running"  # it did not just finish
    finally:
        stop_process(worker)
        subprocess.run(["pkill", "-9", "-f", f"workers.child {job['id']}"])
    conn.flushdb()
