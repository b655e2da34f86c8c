"""GET /metrics with a real Redis, the live API and real workers, parsed with
prometheus-client's own parser: job counts by type and status, queue depth, live
workers, generated rows and tokens, tokens/s of running jobs, duration histograms.

    .venv/bin/python -m pytest -q tests/test_metrics.py
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ALPACA_ROWS
from workers import records

pytest_plugins = ["tests.redis_fixture"]
pytestmark = pytest.mark.integration


def run_distill_job(api, tenant: str, tiny_llama, rows) -> dict:
    """Put the tiny model into ``tenant``'s space (models go by id over the API), upload
    ``rows``, distil them through the API, return the finished job."""
    import shutil

    from service.store import ArtifactStore, new_id
    from tests.redis_fixture import wait_for  # loaded by pytest_plugins, not here

    teacher = new_id("model")
    store = ArtifactStore.from_settings()
    with store.create("model", teacher, tenant=tenant, parents=[]) as tmp:
        shutil.copytree(tiny_llama, tmp / "model")
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    r = api.post("/v1/datasets", content=body, headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 201, r.text
    spec = {"type": "distill", "teacher": teacher, "dataset": r.json()["id"],
            "max_new_tokens": 8, "batch_size": 4}  # fmt: skip
    r = api.post("/v1/jobs", json=spec)
    assert r.status_code == 202, r.text
    url = f"/v1/jobs/{r.json()['id']}"
    return wait_for(
        lambda: (job := api.get(url).json())["status"] in records.TERMINAL and job,
        180,
        0.2,
        "the distill job to finish",
    )


def scrape(api_url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label pairs): value}; /metrics needs no API key."""
    r = httpx.get(f"{api_url}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
    }


def value(samples, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_metrics_follow_job_records(redis_conn, api_url):
    """Counts move with each status change; a finished job lands in its duration bucket;
    tokens/s is the running jobs' current rate."""
    a = records.create(redis_conn, tenant="t", type="distill", spec={}, queue="teacher")["id"]
    b = records.create(redis_conn, tenant="t", type="finetune", spec={}, queue="train")["id"]
    m = scrape(api_url)
    assert value(m, "distillery_jobs", type="distill", status="queued") == 1
    assert value(m, "distillery_jobs", type="finetune", status="queued") == 1
    assert value(m, "distillery_tokens_per_second", type="distill") == 0

    t0 = time.time()
    assert records.transition(redis_conn, a, ("queued",), "running", started_at=t0)
    records.update(redis_conn, a, progress={"rows_done": 2, "tokens_per_s": 12.5})
    assert records.transition(redis_conn, b, ("queued",), "cancelled", finished_at=t0)
    m = scrape(api_url)
    assert value(m, "distillery_jobs", type="distill", status="queued") == 0
    assert value(m, "distillery_jobs", type="distill", status="running") == 1
    assert value(m, "distillery_jobs", type="finetune", status="cancelled") == 1
    assert value(m, "distillery_tokens_per_second", type="distill") == 12.5
    # b never started: no duration to observe.
    assert (
        value(m, "distillery_job_duration_seconds_count", type="finetune", status="cancelled")
        is None
    )

    result = {"rows": 3, "generated_tokens": 20, "prompt_tokens": 50, "cached_rows": 1}
    assert records.transition(
        redis_conn, a, ("running",), "succeeded", finished_at=t0 + 42, metrics=result
    )
    assert not records.transition(redis_conn, a, ("running",), "failed")  # did not move
    m = scrape(api_url)
    assert value(m, "distillery_jobs", type="distill", status="running") == 0
    assert value(m, "distillery_jobs", type="distill", status="succeeded") == 1
    assert value(m, "distillery_jobs", type="distill", status="failed") is None
    assert value(m, "distillery_tokens_per_second", type="distill") == 0
    assert value(m, "distillery_generated_rows_total") == 3
    assert value(m, "distillery_generated_tokens_total") == 20
    assert value(m, "distillery_prompt_tokens_total") == 50
    assert value(m, "distillery_cached_rows_total") == 1
    hist = "distillery_job_duration_seconds"
    labels = {"type": "distill", "status": "succeeded"}
    assert value(m, f"{hist}_bucket", le="30.0", **labels) == 0
    assert value(m, f"{hist}_bucket", le="60.0", **labels) == 1
    assert value(m, f"{hist}_bucket", le="+Inf", **labels) == 1
    assert value(m, f"{hist}_count", **labels) == 1
    assert value(m, f"{hist}_sum", **labels) == pytest.approx(42, abs=0.01)


def test_metrics_after_a_real_distill_job(api, api_url, tenant_key, workers, tiny_llama):
    m = scrape(api_url)
    assert value(m, "distillery_workers", queue="teacher") >= 1
    assert value(m, "distillery_workers", queue="train") >= 1

    done = run_distill_job(api, tenant_key[0], tiny_llama, ALPACA_ROWS[:4])
    assert done["status"] == "succeeded", done["error"]
    m = scrape(api_url)
    assert value(m, "distillery_jobs", type="distill", status="succeeded") == 1
    assert value(m, "distillery_jobs", type="distill", status="queued") == 0
    assert value(m, "distillery_jobs", type="distill", status="running") == 0
    assert value(m, "distillery_queue_depth", queue="teacher") == 0
    assert value(m, "distillery_generated_rows_total") == 4
    tokens = done["metrics"]["generated_tokens"]
    assert tokens > 0 and value(m, "distillery_generated_tokens_total") == tokens
    prompt = done["metrics"]["prompt_tokens"]
    assert prompt > 0 and value(m, "distillery_prompt_tokens_total") == prompt
    assert value(m, "distillery_cached_rows_total") == done["metrics"]["cached_rows"] == 0
    labels = {"type": "distill", "status": "succeeded"}
    assert value(m, "distillery_job_duration_seconds_count", **labels) == 1
    took = done["finished_at"] - done["started_at"]
    assert value(m, "distillery_job_duration_seconds_sum", **labels) == pytest.approx(
        took, abs=0.01
    )
