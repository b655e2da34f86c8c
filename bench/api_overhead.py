"""Overhead of a distill job through the API against the same ``run_distill`` call made
directly, on the same rows, with the teacher already loaded in both cases.

    .venv/bin/python -m bench.api_overhead --url http://127.0.0.1:8000 --rows 16 --max-new-tokens 64

Direct: ``make_engine`` once (not timed), then ``run_distill(spec, out, engine=engine)``.
API: the rows are uploaded (not timed), a one-row warm-up job makes the teacher worker
load the same teacher, then the clock runs from ``POST /v1/jobs`` until
``GET /v1/jobs/{id}/result`` has returned the rows (polling every 0.1 s). Greedy
decoding, so both must return the same rows; the script checks it. The two alternate
``--repeats`` times and their medians are compared; an idle machine still gives the
cleanest figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx


def load_rows(path: Path, n: int) -> list[dict]:
    from service.datasets import read_dataset

    return [r.source for r in read_dataset(path, limit=n)]


class Direct:
    """``run_distill`` on a teacher loaded once (not timed), as the teacher worker holds it."""

    def __init__(self, rows_file: Path, teacher: str, max_new_tokens: int, batch_size: int,
                 engine: dict) -> None:  # fmt: skip
        from service.distill import engine_options
        from service.specs import DistillSpec
        from service.teacher import make_engine
        from service.teacher.factory import pick_engine

        self.rows_file = rows_file
        self.spec = DistillSpec(teacher=teacher, dataset=str(rows_file),
                                max_new_tokens=max_new_tokens, batch_size=batch_size,
                                **engine)  # fmt: skip
        name = pick_engine(self.spec.engine, dtype=self.spec.dtype)  # as run_distill resolves it
        self.engine = make_engine(name, self.spec.teacher, **engine_options(self.spec, name))

    def run(self) -> tuple[float, list]:
        from service.distill import run_distill

        out = self.rows_file.with_name("direct.jsonl")
        t0 = time.perf_counter()
        run_distill(self.spec, out, engine=self.engine)
        seconds = time.perf_counter() - t0
        return seconds, [json.loads(x) for x in out.read_text().splitlines()]


class ThroughAPI:
    """The same rows as a distill job: from ``POST /v1/jobs`` until ``/result`` returned."""

    def __init__(
        self,
        c: httpx.Client,
        rows: list[dict],
        teacher: str,
        max_new_tokens: int,
        batch_size: int,
        engine: dict,
    ):
        self.c = c
        body = "".join(json.dumps(r) + "\n" for r in rows)
        hdr = {"Content-Type": "application/x-ndjson"}
        self.ds = c.post("/v1/datasets", content=body, headers=hdr).json()["id"]
        warm = c.post("/v1/datasets", content=json.dumps(rows[0]) + "\n", headers=hdr).json()
        self.spec = {"type": "distill", "teacher": teacher, "max_new_tokens": max_new_tokens,
                     "batch_size": batch_size, **engine}  # fmt: skip
        self._run(warm["id"])  # the teacher worker loads (or already holds) the engine

    def _run(self, dataset: str) -> tuple[float, list]:
        c = self.c
        t0 = time.perf_counter()
        job = c.post("/v1/jobs", json={**self.spec, "dataset": dataset}).json()
        while (j := c.get(f"/v1/jobs/{job['id']}").json())["status"] not in (
            "succeeded", "failed", "cancelled",
        ):  # fmt: skip
            time.sleep(0.1)
        if j["status"] != "succeeded":
            raise SystemExit(f"job {job['id']} {j['status']}: {j['error']}")
        text = c.get(f"/v1/jobs/{job['id']}/result").text
        return time.perf_counter() - t0, [json.loads(x) for x in text.splitlines()]

    def run(self) -> tuple[float, list]:
        return self._run(self.ds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=os.environ.get("DISTILLERY_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--data", default="../shared/data/alpaca/alpaca_5000.json")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--teacher", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine", default="auto", help="the teacher engine of both paths")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)

    from api.client import local_api_key

    key = args.api_key or os.environ.get("DISTILLERY_API_KEY") or local_api_key()
    rows = load_rows(Path(args.data), args.rows)
    # API and direct runs alternate, so a change in the machine's load hits both alike;
    # the medians are compared.
    api_s, direct_s, same = [], [], True
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.jsonl"
        rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=args.url, headers=headers, timeout=600) as c:
            engine = {"engine": args.engine, "dtype": args.dtype}
            api = ThroughAPI(c, rows, args.teacher, args.max_new_tokens, args.batch_size, engine)
            direct = Direct(rows_file, args.teacher, args.max_new_tokens, args.batch_size, engine)
            try:
                for _ in range(args.repeats):
                    seconds, api_rows = api.run()
                    api_s.append(seconds)
                    seconds, direct_rows = direct.run()
                    direct_s.append(seconds)
                    same &= [r["response"] for r in api_rows] == [
                        r["response"] for r in direct_rows
                    ]
            finally:
                direct.engine.close()
    a, d = statistics.median(api_s), statistics.median(direct_s)
    print(json.dumps({
        "rows": len(rows), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "repeats": args.repeats, "api_s": [round(x, 2) for x in api_s],
        "direct_s": [round(x, 2) for x in direct_s],
        "median_api_s": round(a, 2), "median_direct_s": round(d, 2),
        "overhead_s": round(a - d, 2), "overhead_pct": round(100 * (a - d) / d, 1),
        "same_rows": same, "load_average": os.getloadavg()[0],
    }, indent=2))  # fmt: skip
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
