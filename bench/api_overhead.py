"""Overhead of a distill job through the API against the same ``run_distill`` call made
directly, on the same rows, with the teacher already loaded in both cases.

    .venv/bin/python -m bench.api_overhead --url http://127.0.0.1:8000 --rows 16 --max-new-tokens 64

Direct: ``make_engine`` once (not timed), then ``run_distill(spec, out, engine=engine)``.
API: the rows are uploaded (not timed), a one-row warm-up job makes the teacher worker
load the same teacher, then the clock runs from ``POST /v1/jobs`` until
``GET /v1/jobs/{id}/result`` has returned the rows (polling every 0.1 s). Greedy
decoding, so both must return the same rows; the script checks it. Run it against an
otherwise idle service: on a shared CPU the two runs compete with anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx


def load_rows(path: Path, n: int) -> list[dict]:
    from service.datasets import read_dataset

    return [r.source for r in read_dataset(path, limit=n)]


def time_direct(
    rows_file: Path, teacher: str, max_new_tokens: int, batch_size: int
) -> tuple[float, list]:
    from service.distill import engine_options, run_distill
    from service.specs import DistillSpec
    from service.teacher import make_engine

    spec = DistillSpec(teacher=teacher, dataset=str(rows_file), max_new_tokens=max_new_tokens,
                       batch_size=batch_size)  # fmt: skip
    engine = make_engine(spec.engine, spec.teacher, **engine_options(spec))
    try:
        out = rows_file.with_name("direct.jsonl")
        t0 = time.perf_counter()
        run_distill(spec, out, engine=engine)
        seconds = time.perf_counter() - t0
    finally:
        engine.close()
    return seconds, [json.loads(x) for x in out.read_text().splitlines()]


def time_api(
    c: httpx.Client, rows: list[dict], teacher: str, max_new_tokens: int, batch_size: int
) -> tuple[float, list]:
    body = "".join(json.dumps(r) + "\n" for r in rows)
    hdr = {"Content-Type": "application/x-ndjson"}
    ds = c.post("/v1/datasets", content=body, headers=hdr).json()["id"]
    warm = c.post("/v1/datasets", content=json.dumps(rows[0]) + "\n", headers=hdr).json()["id"]
    spec = {"type": "distill", "teacher": teacher, "max_new_tokens": max_new_tokens,
            "batch_size": batch_size}  # fmt: skip

    def run(dataset: str) -> tuple[float, list]:
        t0 = time.perf_counter()
        job = c.post("/v1/jobs", json={**spec, "dataset": dataset}).json()
        while (j := c.get(f"/v1/jobs/{job['id']}").json())["status"] not in (
            "succeeded", "failed", "cancelled",
        ):  # fmt: skip
            time.sleep(0.1)
        if j["status"] != "succeeded":
            raise SystemExit(f"job {job['id']} {j['status']}: {j['error']}")
        text = c.get(f"/v1/jobs/{job['id']}/result").text
        return time.perf_counter() - t0, [json.loads(x) for x in text.splitlines()]

    run(warm)  # the teacher worker loads (or already holds) the engine
    return run(ds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=os.environ.get("DISTILLERY_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--data", default="../shared/data/alpaca/alpaca_5000.json")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--teacher", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)

    from api.client import local_api_key

    key = args.api_key or os.environ.get("DISTILLERY_API_KEY") or local_api_key()
    rows = load_rows(Path(args.data), args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.jsonl"
        rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=args.url, headers=headers, timeout=600) as c:
            api_s, api_rows = time_api(c, rows, args.teacher, args.max_new_tokens, args.batch_size)
        direct_s, direct_rows = time_direct(
            rows_file, args.teacher, args.max_new_tokens, args.batch_size
        )
    same = [r["response"] for r in api_rows] == [r["response"] for r in direct_rows]
    print(json.dumps({
        "rows": len(rows), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "direct_s": round(direct_s, 2), "api_s": round(api_s, 2),
        "overhead_s": round(api_s - direct_s, 2),
        "overhead_pct": round(100 * (api_s - direct_s) / direct_s, 1),
        "same_rows": same,
    }, indent=2))  # fmt: skip
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
