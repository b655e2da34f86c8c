"""What an interactive request costs the bulk work it preempts, by vLLM's KV block size.

    DISTILLERY_THREADS=1 .venv/bin/python -m bench.preempt_cost --block-size 128
    DISTILLERY_THREADS=1 .venv/bin/python -m bench.preempt_cost --block-size 32

One engine (the builtin teacher on vLLM, the service's dtype rule), the teacher loop of
the service (``service/teacher/loop.py``), ``--rows`` Alpaca rows of bulk work, run twice
with the prefix cache emptied between: alone, then with one 2-row interactive request
arriving after ``--after`` steps. While the interactive rows run, the loop cuts the bulk
rows to 16 and later resumes the others from the tokens they had (a re-prefill of prompt
plus tokens). vLLM-CPU's default block of 128 tokens leaves most of a resumed row's
prompt outside the prefix cache (only whole blocks are cached); a smaller block keeps it.
Prints seconds of each run, the difference (what the request cost the bulk work), the
interactive request's latency and the prompt tokens vLLM computed versus took from its
cache.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--block-size", type=int, default=0, help="0: vLLM's default")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--after", type=int, default=20, help="steps before the request")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if args.block_size:  # before anything reads the settings
        os.environ["DISTILLERY_VLLM_BLOCK_SIZE"] = str(args.block_size)

    from bench.teacher_service import alpaca
    from service.datasets import normalise
    from service.distill import make_items
    from service.models import DEFAULT_MODEL, apply_threads
    from service.specs import DistillSpec
    from service.teacher.factory import make_engine, pick_dtype
    from service.teacher.loop import EngineLoop

    apply_threads()
    raw = alpaca(Path(args.data_dir))[: args.rows + 2]
    rows = [normalise(r, i + 1)[0] for i, r in enumerate(raw)]
    spec = DistillSpec(dataset="x", max_new_tokens=args.max_new_tokens)
    engine = make_engine("vllm", DEFAULT_MODEL, dtype=pick_dtype("auto"))
    scheduler = engine.llm.llm_engine.vllm_config.cache_config
    bulk_pairs = list(enumerate(rows[: args.rows]))
    ask_pairs = list(enumerate(rows[args.rows : args.rows + 2]))

    def run(with_request: bool) -> dict:
        engine.llm.reset_prefix_cache()
        engine.prompt_computed = engine.prompt_cached = 0
        loop = EngineLoop(engine, capacity=args.rows)
        loop.add(make_items("bulk", "t1", bulk_pairs, spec, interactive=False))
        t0 = time.monotonic()
        steps, asked, answered, tokens = 0, None, None, 0
        while not loop.idle:
            if with_request and steps == args.after:
                loop.add(make_items("ask", "t2", ask_pairs, spec, interactive=True))
                asked = time.monotonic()
            for item, gen in loop.step():
                if item.job == "ask":
                    if not any(k.startswith("ask/") for k in loop.running):
                        answered = time.monotonic()
                else:
                    tokens += gen.tokens
            steps += 1
        out = {"seconds": round(time.monotonic() - t0, 2), "steps": steps, "tokens": tokens,
               "preempted": loop.preempted, "resumed": loop.resumed,
               "prompt_computed": engine.prompt_computed,
               "prompt_cached": engine.prompt_cached}  # fmt: skip
        if asked is not None and answered is not None:
            out["request_seconds"] = round(answered - asked, 2)
        return out

    run(False)  # warm-up: compiled kernels, allocator
    alone = run(False)
    shared = run(True)
    result = {
        "block_size": scheduler.block_size,
        "prefix_caching": scheduler.enable_prefix_caching,
        "dtype": engine.dtype,
        "rows": args.rows,
        "alone": alone,
        "with_request": shared,
        "cost_seconds": round(shared["seconds"] - alone["seconds"], 2),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
