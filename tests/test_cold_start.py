"""First use on a cold machine: an empty ``DISTILLERY_HOME``, nothing converted yet.

    .venv/bin/python -m pytest -q tests/test_cold_start.py

The first ``make run`` on a fresh machine failed where every warm-home test passed: the
pipeline's ``prune`` and ``distill`` steps start at the same moment on the two workers,
both found the builtin model unconverted, both converted it, and one deleted the folder
the other was loading. Here two processes convert into one empty home at the same moment,
and the main job's pipeline, shrunk to tiny sizes, runs through ``distillery up`` (real
Redis, API and workers) from an empty home.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from service.specs import LLAMA_PROJECTIONS
from tests.redis_fixture import wait_for
from tests.test_service_up import start_up, stop, wait_ready

pytestmark = [pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
CONVERTING = "converting builtin smollm2-135m-instruct"

# Each process imports everything first, then waits for the go file, so both reach the
# conversion within milliseconds of each other.
RESOLVE = """
import logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from service.models import load_model, resolve_model
go = Path(sys.argv[1])
Path(sys.argv[2]).touch()
while not go.exists():
    time.sleep(0.01)
path = resolve_model("builtin:smollm2-135m-instruct")
model, tok = load_model("builtin:smollm2-135m-instruct")
print(path, model.config.num_hidden_layers, flush=True)
"""


def test_two_processes_convert_the_builtin_once(tmp_path):
    home = tmp_path / "home"
    env = dict(os.environ, DISTILLERY_HOME=str(home))
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RESOLVE, str(go), str(tmp_path / f"ready{i}")],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    # Both have imported torch and transformers and are polling for the go file: each
    # says so by creating its ready file.
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline, "the two processes did not get ready"
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.1)
    go.touch()
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert [o.split() for o, _ in outs] == [[str(home / "builtin/smollm2-135m-instruct"), "30"]] * 2
    conversions = sum(err.count(CONVERTING) for _, err in outs)
    assert conversions == 1, [err[-2000:] for _, err in outs]
    # Published whole, nothing left half-made beside it.
    leftovers = [p.name for p in (home / "builtin").iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_pipeline_from_an_empty_home(tmp_path, monkeypatch):
    """The main job's pipeline (builtin model, prune ∥ distill → finetune → evaluate →
    report) at tiny sizes, through `distillery up` on an empty home: both workers resolve
    the unconverted builtin at once; one converts; every step succeeds; the one-step
    fine-tune moves the weights."""
    from service.synthetic import write_synthetic

    home = tmp_path / "home"
    home.mkdir()
    data = write_synthetic(tmp_path / "data", rows=8, mc_docs=8)
    port = free_port()
    monkeypatch.setenv("DISTILLERY_EVAL_DATA", str(data.parent))  # up passes it on
    proc = start_up(home, port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, home)
        key = (home / "api_key").read_text().strip()
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as api:
            r = api.post(
                "/v1/datasets",
                content=data.read_bytes(),
                headers={"Content-Type": "application/x-ndjson"},
            )
            assert r.status_code == 201, r.text
            body = {
                "type": "pipeline", "model": "builtin:smollm2-135m-instruct",
                "dataset": r.json()["id"], "blocks": 2, "samples": 4, "limit": 4,
                "max_new_tokens": 4, "epochs": 1, "lr": 1e-3, "tasks": ["arith"],
                "eval_limit": 8, "agreement_prompts": 1, "agreement_max_new_tokens": 2,
            }  # fmt: skip
            r = api.post("/v1/jobs", json=body)
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]

            def finished():
                job = api.get(f"/v1/jobs/{job_id}").json()
                return job if job["status"] in ("succeeded", "failed", "cancelled") else None

            job = wait_for(finished, timeout=1500, every=2, what="the pipeline")
            assert job["status"] == "succeeded", (job["error"], job["children"])
            report = api.get(f"/v1/jobs/{job_id}/report")
            assert report.status_code == 200
            assert f"Distillery report: {job_id}" in report.text and ".tmp" not in report.text
            arts = job["artifacts"]
    finally:
        assert stop(proc) == 0
    logs = "".join(p.read_text(errors="replace") for p in (home / "logs").glob("*.log"))
    assert logs.count(CONVERTING) == 1, logs[-4000:]
    # Training happened: the recovered model is not the pruned one.
    models = home / "artifacts" / "model"
    pruned = load_file(next((models / arts["pruned"] / "model").glob("*.safetensors")))
    recovered = load_file(next((models / arts["recovered"] / "model").glob("*.safetensors")))
    moved = [k for k in pruned if not torch.equal(pruned[k], recovered[k])]
    # Only the adapted projections moved (merged LoRA), never embeddings or norms.
    assert moved and all(any(t in k for t in LLAMA_PROJECTIONS) for k in moved)
    assert {t for t in LLAMA_PROJECTIONS if any(t in k for k in moved)} == set(LLAMA_PROJECTIONS)


def test_a_relative_home_is_made_absolute(tmp_path, monkeypatch):
    """`DISTILLERY_HOME=runs/x distillery up` once failed ("redis-server did not start"):
    the pieces start in other folders, so the home is resolved where it is read."""
    from service.settings import Settings

    monkeypatch.chdir(tmp_path)
    home = Settings(home=Path("runs/x")).home_dir()
    assert home.is_absolute() and home == tmp_path / "runs" / "x" and home.is_dir()
