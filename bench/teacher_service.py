"""The teacher tier under many callers, through the HTTP API of a fresh `distillery up`.

    DISTILLERY_THREADS=1 .venv/bin/python -m bench.teacher_service --out runs/teacher-service

Starts `distillery up` in ``OUT/home`` (an empty home: the builtin teacher on its default
engine and dtype, one teacher worker at DISTILLERY_THREADS threads), then measures, each
scenario on Alpaca rows no earlier scenario used (so the rewrite cache has not seen them):

1. ``one64``: one ``POST /v1/distill?wait=`` of 64 rows;
2. ``many4``: the same shape as 16 concurrent ``POST /v1/distill?wait=`` of 4 rows;
3. ``idle2``: a 2-row request on the idle service (3 of them, one after another);
4. ``big_alone``: a 2,000-row bulk job alone (the service's bulk tokens/s);
5. ``big_with_2``: another 2,000-row bulk job, with a 2-row request every ``--every`` s
   while it runs (at most ``--requests`` of them) (their latencies; the big job's tokens/s against ``big_alone``);
6. ``fair``: two tenants' equal bulk jobs submitted one after the other;
7. ``cached``: ``one64``'s rows again (served by the cache: engine rows, seconds);
8. ``direct``: ``LLM.generate`` called directly (service stopped, same threads, dtype, KV
   cache and prompts) on ``big_alone``'s rows.

Results go to ``OUT/results.json`` after each scenario; a rerun skips the ones there.
``--render`` prints the table for docs/performance.md from that file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "builtin:smollm2-135m-instruct"


def alpaca(data_dir: Path) -> list[dict]:
    rows = json.loads((data_dir / "alpaca" / "alpaca_5000.json").read_text())
    return [{k: r[k] for k in ("instruction", "input", "output")} for r in rows]


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.home = (self.out / "home").resolve()
        self.results_path = self.out / "results.json"
        self.results = (
            json.loads(self.results_path.read_text()) if self.results_path.is_file() else {}
        )
        self.rows = alpaca(Path(args.data_dir))
        self.url = f"http://127.0.0.1:{args.port}"
        self.proc: subprocess.Popen | None = None
        self.key = ""

    # -- the service --------------------------------------------------------------------

    def up(self) -> None:
        env = dict(os.environ, DISTILLERY_HOME=str(self.home))
        self.home.mkdir(parents=True, exist_ok=True)
        log = (self.out / "up.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "up", "--port", str(self.args.port)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise SystemExit("the service did not become ready")
        self.key = (self.home / "api_key").read_text().strip()

    def down(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(120)
        self.proc = None

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {key or self.key}"},
            timeout=3600,
        )

    def tenant_key(self, tenant: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "api.cli", "keys", "create", "--tenant", tenant],
            cwd=ROOT, env=dict(os.environ, DISTILLERY_HOME=str(self.home)),
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return out.stdout.strip().split()[-1]

    # -- requests ---------------------------------------------------------------------

    def spec(self) -> dict:
        return {"teacher": TEACHER, "max_new_tokens": self.args.max_new_tokens}

    def distill(self, rows: list[dict], key: str | None = None) -> dict:
        t0 = time.monotonic()
        with self.client(key) as c:
            r = c.post("/v1/distill?wait=600", json={"rows": rows, **self.spec()})
        r.raise_for_status()
        job = r.json()["job"]
        assert job["status"] == "succeeded", job
        return {"seconds": time.monotonic() - t0, "job": job}

    def bulk(self, rows: list[dict], key: str | None = None) -> str:
        with self.client(key) as c:
            data = "".join(json.dumps(r) + "\n" for r in rows)
            ds = c.post("/v1/datasets", content=data,
                        headers={"Content-Type": "application/x-ndjson"}).json()["id"]  # fmt: skip
            return c.post(
                "/v1/jobs", json={"type": "distill", "dataset": ds, **self.spec()}
            ).json()["id"]

    def wait(self, job_id: str, key: str | None = None) -> dict:
        with self.client(key) as c:
            while True:
                job = c.get(f"/v1/jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    assert job["status"] == "succeeded", job
                    return job
                time.sleep(0.5)

    def take(self, n: int) -> list[dict]:
        start = self.results.get("_next_row", 0)
        self.results["_next_row"] = start + n
        return self.rows[start : start + n]

    def save(self, name: str, doc: dict) -> None:
        self.results[name] = doc
        self.results_path.write_text(json.dumps(self.results, indent=2))
        print(name, json.dumps(doc)[:400], flush=True)

    # -- scenarios --------------------------------------------------------------------

    def run(self) -> None:
        if self.args.only:  # the others count as done
            for name in SCENARIOS:
                if name not in self.args.only.split(","):
                    self.results.setdefault(name, None)
        self.up()
        try:
            self.distill(self.take(2))  # warm: the engine loads on the first job
            if "one64" not in self.results:
                got = self.distill(self.take(64))
                self.save("one64", usage(got["job"], got["seconds"]))
            if "many4" not in self.results:
                rows = self.take(64)
                t0 = time.monotonic()
                out: list = [None] * 16
                threads = [threading.Thread(target=lambda k=k: out.__setitem__(
                    k, self.distill(rows[4 * k : 4 * k + 4]))) for k in range(16)]  # fmt: skip
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.monotonic() - t0
                tokens = sum(o["job"]["metrics"]["completion_tokens"] for o in out)
                self.save("many4", {
                    "seconds": round(wall, 2), "completion_tokens": tokens,
                    "tokens_per_s": round(tokens / wall, 1),
                    "latencies": sorted(round(o["seconds"], 2) for o in out),
                })  # fmt: skip
            if "idle2" not in self.results:
                lat = [self.distill(self.take(2))["seconds"] for _ in range(3)]
                self.save("idle2", {"latencies": [round(x, 2) for x in lat],
                                    "median": round(sorted(lat)[1], 2)})  # fmt: skip
            if "big_alone" not in self.results:
                rows = self.take(self.args.big)
                self.results["_big_alone_rows"] = [self.results["_next_row"] - len(rows), len(rows)]
                job = self.wait(self.bulk(rows))
                self.save("big_alone", usage(job))
            if "big_with_2" not in self.results:
                job_id = self.bulk(self.take(self.args.big))
                lat = []
                time.sleep(self.args.every)
                while True:
                    with self.client() as c:
                        status = c.get(f"/v1/jobs/{job_id}").json()
                    if (
                        status["status"] != "running"
                        or status["progress"].get("rows_done", 0) > 0.9 * self.args.big
                        or (self.args.requests and len(lat) >= self.args.requests)
                    ):
                        break
                    lat.append(round(self.distill(self.take(2))["seconds"], 2))
                    time.sleep(self.args.every)
                job = self.wait(job_id)
                self.save("big_with_2", {**usage(job), "interactive_latencies": lat})
            if "fair" not in self.results:
                keys = [self.tenant_key("bench-a"), self.tenant_key("bench-b")]
                ids = [self.bulk(self.take(self.args.fair), key=k) for k in keys]
                jobs = [self.wait(j, key=k) for j, k in zip(ids, keys, strict=True)]
                self.save("fair", {"jobs": [usage(j) for j in jobs]})
            if "cached" not in self.results:
                first = self.results["_next_row"]  # one64's rows: measure that first
                self.results["_next_row"] = 2  # one64's rows, after the warm-up pair
                got = self.distill(self.take(64))
                self.results["_next_row"] = first
                self.save("cached", usage(got["job"], got["seconds"]))
        finally:
            self.down()
        if "direct" not in self.results:
            self.save("direct", direct(self.args, self.rows, *self.results["_big_alone_rows"]))


SCENARIOS = ("one64", "many4", "idle2", "big_alone", "big_with_2", "fair", "cached", "direct")


def usage(job: dict, seconds: float | None = None) -> dict:
    m = job["metrics"]
    doc = {k: m.get(k) for k in ("rows", "completion_tokens", "prompt_tokens", "cached_rows",
                                 "engine_rows", "tokens_per_s", "time_queued",
                                 "time_to_first_row", "dtype", "engine")}  # fmt: skip
    doc["started_at"], doc["finished_at"] = job["started_at"], job["finished_at"]
    if seconds is not None:
        doc["seconds"] = round(seconds, 2)
    return doc


def direct(args: argparse.Namespace, rows: list[dict], start: int, n: int) -> dict:
    """LLM.generate on the big job's rows: the same prompts, params, dtype and threads."""
    code = f"""
import json, sys, time
sys.path.insert(0, {str(ROOT)!r})
from service.datasets import read_dataset
from service.templates import build_request
from service.teacher.base import GenParams, render_prompt
from service.teacher.factory import make_engine
engine = make_engine("vllm", {TEACHER!r}, dtype="auto")
from vllm import TokensPrompt
reqs = [build_request(r, "auto") for r in read_dataset(sys.argv[1])]
prompts = [TokensPrompt(prompt_token_ids=render_prompt(engine.tokenizer, r)) for r in reqs]
sampling = engine.sampling_params(GenParams(max_new_tokens={args.max_new_tokens}), None)
t0 = time.monotonic()
outs = engine.llm.generate(prompts, sampling, use_tqdm=False)
s = time.monotonic() - t0
tok = sum(len(o.outputs[0].token_ids) for o in outs)
print(json.dumps({{"rows": len(outs), "completion_tokens": tok, "seconds": round(s, 2),
                  "tokens_per_s": round(tok / s, 1), "dtype": engine.dtype}}))
"""
    path = Path(args.out) / "direct_rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[start : start + n]))
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT,
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def render(results: dict) -> str:
    r = results
    one, many, idle = r["one64"], r["many4"], r["idle2"]
    alone, mixed, direct_ = r["big_alone"], r["big_with_2"], r["direct"]
    fair = r["fair"]["jobs"]
    ends = [j["finished_at"] - min(x["started_at"] for x in fair) for j in fair]
    lat = mixed["interactive_latencies"]
    lines = [
        "| measure | figure |",
        "|---|---|",
        f"| one 64-row `POST /v1/distill` | {one['seconds']} s, "
        f"{round(one['completion_tokens'] / one['seconds'], 1)} tokens/s |",
        f"| 16 concurrent 4-row requests | {many['seconds']} s, {many['tokens_per_s']} tokens/s "
        f"(**{round(many['seconds'] / one['seconds'], 2)}x** the wall time of one; latencies "
        f"{many['latencies'][0]}-{many['latencies'][-1]} s) |",
        f"| 2-row request, idle service | median {idle['median']} s ({idle['latencies']}) |",
        f"| 2-row requests during a {alone['rows']}-row job | "
        f"{min(lat) if lat else '-'}-{max(lat) if lat else '-'} s over {len(lat)} requests "
        f"(worst **{round(max(lat) / idle['median'], 2) if lat else '-'}x** idle) |",
        f"| the {alone['rows']}-row job alone / with them | {alone['tokens_per_s']} / "
        f"{mixed['tokens_per_s']} tokens/s (**{round(mixed['tokens_per_s'] / alone['tokens_per_s'], 3)}**) |",
        f"| two tenants' {fair[0]['rows']}-row jobs, one after the other | finished "
        f"{ends[0]:.1f} s and {ends[1]:.1f} s after the first started "
        f"(**{abs(ends[0] - ends[1]) / max(ends) * 100:.1f}%** apart) |",
        f"| one64's rows again | {r['cached']['cached_rows']} rows from the cache, "
        f"{r['cached']['engine_rows']} engine rows, {r['cached']['seconds']} s |",
        f"| `LLM.generate` directly on the {direct_['rows']} rows | {direct_['tokens_per_s']} "
        f"tokens/s; the service's bulk job: **{round(alone['tokens_per_s'] / direct_['tokens_per_s'], 3)}** of it |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/teacher-service")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--big", type=int, default=2000, help="rows of the big bulk job")
    ap.add_argument("--fair", type=int, default=256, help="rows of each tenant's job")
    ap.add_argument("--every", type=float, default=20.0, help="seconds between 2-row requests")
    ap.add_argument(
        "--requests",
        type=int,
        default=0,
        help="at most this many 2-row requests during big_with_2 (0: no limit)",
    )
    ap.add_argument("--only", default="", help="comma-separated scenarios to run (default all)")
    ap.add_argument("--render", action="store_true", help="print the table and exit")
    args = ap.parse_args(argv)
    if args.render:
        print(render(json.loads((Path(args.out) / "results.json").read_text())))
        return 0
    Bench(args).run()
    results = json.loads((Path(args.out) / "results.json").read_text())
    if all(results.get(name) for name in SCENARIOS):
        print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
