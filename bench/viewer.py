"""The console's dataset viewer on a 512-row and a 1,000,000-row distilled dataset: the
first page, a filtered page (one reason), a deep filtered page, the per-reason counts
and a text search, timed through HTTP against a live API.

    .venv/bin/python -m bench.viewer --data-dir ../shared/data --rows 512 1000000

Rows: Alpaca rows (``alpaca/alpaca_5000.json`` under ``--data-dir``, cycled for the big
set, each instruction numbered) turned into distilled rows: the rewrite is the original
with a few words changed, and each row's ``reason`` is drawn (seeded) with the shares
the builtin teacher gave (mostly ok; truncated, echoed_template, leaked_template, empty
after it). The datasets are written into a temporary store with ``store.create`` and
``service.row_index.write_index``, as a distill job's output is (the index build is
timed too). A Redis from ``api.redis_server.start_redis`` and uvicorn serving
``api.app.create_app`` in a thread; the client signs in to /ui once, then each request
is timed with httpx: cold (the first after the server started, which reads the index
from the store) and warm (the median of ``--repeats``). A search that matches nothing
reads one budget of rows.jsonl (``SEARCH_BUDGET_BYTES``) and answers where to go on.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REASONS = [("ok", 70), ("truncated", 12), ("echoed_template", 9), ("leaked_template", 5),
           ("empty", 4)]  # fmt: skip


def source_rows(data_dir: Path | None) -> list[dict]:
    path = data_dir / "alpaca" / "alpaca_5000.json" if data_dir else None
    if path and path.is_file():
        return json.loads(path.read_text())
    # Without the data: short made-up rows (say so in the figures).
    return [{"instruction": f"Explain topic {i}.", "input": "", "output": f"Topic {i} is " +
             " ".join(f"word{j}" for j in range(40))} for i in range(500)]  # fmt: skip


def write_rows(path: Path, base: list[dict], n: int, seed: int = 0) -> None:
    rnd = random.Random(seed)
    names = [r for r, _ in REASONS]
    weights = [w for _, w in REASONS]
    with path.open("w") as fh:
        for i in range(n):
            src = base[i % len(base)]
            words = src["output"].split()
            if words:
                k = rnd.randrange(len(words))
                words[k] = words[k].upper()
            rewrite = " ".join(words)
            reason = rnd.choices(names, weights)[0]
            row = {**src, "instruction": f"{src['instruction']} [{i}]", "response":
                   rewrite if reason == "ok" else src["output"], "original_response":
                   src["output"], "distilled": reason == "ok", "reason": reason}  # fmt: skip
            if reason != "ok":
                row["rejected_rewrite"] = rewrite
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def make_dataset(store, tenant: str, base: list[dict], n: int) -> tuple[str, float, int]:
    """(dataset id, seconds to build the index, bytes of rows.jsonl)."""
    from service.row_index import write_index

    with store.create("dataset", tenant=tenant, name=f"bench {n} rows", rows=n,
                      source="distill") as tmp:  # fmt: skip
        write_rows(tmp / "rows.jsonl", base, n)
        t0 = time.perf_counter()
        write_index(tmp)
        index_s = time.perf_counter() - t0
        size = (tmp / "rows.jsonl").stat().st_size
    return store.list("dataset", tenant=tenant)[-1]["id"], index_s, size


def timed(c: httpx.Client, url: str, headers: dict | None = None) -> tuple[float, httpx.Response]:
    t0 = time.perf_counter()
    r = c.get(url, headers=headers)
    seconds = time.perf_counter() - t0
    r.raise_for_status()
    return seconds, r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    ap.add_argument("--rows", type=int, nargs="+", default=[512, 1_000_000])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-viewer-"))
    os.environ["DISTILLERY_HOME"] = str(work / "home")
    import redis
    import uvicorn

    from api.app import create_app
    from api.keys import create_key
    from api.redis_server import free_port, start_redis
    from service.store import ArtifactStore

    server = start_redis(work / "redis")
    key = create_key(redis.Redis.from_url(server.url), "bench")
    store = ArtifactStore(work / "home")
    base = source_rows(args.data_dir)
    datasets = []
    for n in args.rows:
        ds, index_s, size = make_dataset(store, "bench", base, n)
        datasets.append((n, ds, index_s, size))
        print(f"{n:>9,} rows: {size / 2**20:,.0f} MiB, index built in {index_s:.2f} s",
              file=sys.stderr)  # fmt: skip

    port = free_port()
    config = uvicorn.Config(create_app(server.url), host="127.0.0.1", port=port,
                            log_level="warning")  # fmt: skip
    uv = uvicorn.Server(config)
    threading.Thread(target=uv.run, daemon=True).start()
    while not uv.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    c = httpx.Client(base_url=url, timeout=120)
    c.post("/ui/login", data={"api_key": key})
    bearer = {"Authorization": f"Bearer {key}"}

    print("| rows | request | cold s | warm s (median) | rows shown |")
    print("|---:|---|---:|---:|---:|")
    for n, ds, _, _ in datasets:
        deep = max(int(n * 0.12 * 0.9), 0)  # well inside the truncated rows
        cases = [
            ("viewer: first page + counts", f"/ui/datasets/{ds}"),
            ("viewer: reason=truncated", f"/ui/datasets/{ds}?reason=truncated"),
            (f"viewer: reason=truncated, offset {deep:,}",
             f"/ui/datasets/{ds}?reason=truncated&offset={deep}"),
            ("viewer: last page", f"/ui/datasets/{ds}?offset={max(n - 20, 0)}"),
            ("API: per-reason counts", f"/v1/datasets/{ds}/stats"),
            ("API: rows, reason=empty", f"/v1/datasets/{ds}/rows?reason=empty"),
            ("viewer: search 'photosynthesis'", f"/ui/datasets/{ds}?q=photosynthesis"),
            ("viewer: search, no match (one budget)", f"/ui/datasets/{ds}?q=zqxjkv"),
        ]  # fmt: skip
        for label, path in cases:
            hdrs = bearer if path.startswith("/v1") else None
            cold, r = timed(c, path, hdrs)
            warm = statistics.median(timed(c, path, hdrs)[0] for _ in range(args.repeats))
            shown = r.text.count('<tr data-row="') if not hdrs else len(r.json().get("data", []))
            if label == "API: per-reason counts":
                shown = sum(r.json()["reasons"].values())
            print(f"| {n:,} | {label} | {cold:.3f} | {warm:.3f} | {shown:,} |")
    uv.should_exit = True
    server.stop()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
