"""Status-polling load on a running service: N concurrent pollers GET one job for T s.

    .venv/bin/python -m bench.api_load --url http://127.0.0.1:8000 --pollers 50 --seconds 20

Each poller loops ``GET /v1/jobs/{id}`` (auth, Redis HGETALL, children, JSON) as fast
as the server answers, over a shared keep-alive pool of ``--pollers`` connections.
Prints requests, errors, throughput and latency percentiles (client-side wall time per
request). The job polled is ``--job``, else the newest one, else a one-row distill job
submitted for the purpose. The load generator runs on the same machine as the service
and competes with it for the CPU: the figures are a floor, not a ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

import httpx


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def pick_job(client: httpx.Client) -> str:
    jobs = client.get("/v1/jobs?limit=1").json()["data"]
    if jobs:
        return jobs[0]["id"]
    row = {"instruction": "Name a colour.", "output": "Red."}
    ds = client.post(
        "/v1/datasets", content=json.dumps(row) + "\n",
        headers={"Content-Type": "application/x-ndjson"},
    ).json()["id"]  # fmt: skip
    job = client.post("/v1/jobs", json={"type": "distill", "dataset": ds, "max_new_tokens": 1})
    return job.json()["id"]


async def poller(client: httpx.AsyncClient, path: str, stop: float, lat: list, errors: list):
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        try:
            r = await client.get(path)
            if r.status_code != 200:
                errors.append(r.status_code)
                continue
        except httpx.HTTPError as exc:
            errors.append(type(exc).__name__)
            continue
        lat.append(time.perf_counter() - t0)


async def run(url: str, key: str, job_id: str, pollers: int, seconds: float) -> dict:
    limits = httpx.Limits(max_connections=pollers, max_keepalive_connections=pollers)
    headers = {"Authorization": f"Bearer {key}"}
    lat: list[float] = []
    errors: list = []
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as c:
        await c.get(f"/v1/jobs/{job_id}")  # warm the pool's first connection
        t0 = time.perf_counter()
        stop = t0 + seconds
        await asyncio.gather(
            *(poller(c, f"/v1/jobs/{job_id}", stop, lat, errors) for _ in range(pollers))
        )
        wall = time.perf_counter() - t0
    lat.sort()
    ms = [x * 1000 for x in lat]
    return {
        "pollers": pollers,
        "seconds": round(wall, 2),
        "requests": len(lat),
        "errors": len(errors),
        "req_per_s": round(len(lat) / wall, 1),
        "p50_ms": round(percentile(ms, 50), 2),
        "p90_ms": round(percentile(ms, 90), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(ms[-1], 2) if ms else None,
        "mean_ms": round(statistics.fmean(ms), 2) if ms else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=os.environ.get("DISTILLERY_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--api-key", default=None, help="Default: DISTILLERY_API_KEY or up's key.")
    ap.add_argument("--pollers", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--job", help="Job id to poll (default: the newest job).")
    args = ap.parse_args(argv)
    if not 1 <= args.pollers <= 1000 or not 0 < args.seconds <= 600:
        ap.error("--pollers 1..1000 and --seconds up to 600")

    from api.client import local_api_key

    key = args.api_key or os.environ.get("DISTILLERY_API_KEY") or local_api_key()
    if not key:
        ap.error("no API key: pass --api-key or set DISTILLERY_API_KEY")
    with httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {key}"}) as c:
        job_id = args.job or pick_job(c)
    result = asyncio.run(run(args.url, key, job_id, args.pollers, args.seconds))
    result["job"] = job_id
    print(json.dumps(result, indent=2))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
