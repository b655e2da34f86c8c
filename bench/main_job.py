"""The main job, in-process: prune the embedded default model by 6 of its 30 blocks,
self-distill a small Alpaca sample with the unpruned teacher, LoRA-recover, evaluate
baseline / pruned / recovered, print the table.

    .venv/bin/python -m bench.main_job --data-dir ../shared/data --out runs/main

Sizes are chosen to finish well under 30 minutes on 2 CPU cores (see docs/performance.md
for the measured wall times). Rerunning the same command resumes. Where the data folder
is absent (a user's machine), the job generates its own arithmetic data set and an
arithmetic multiple-choice task (``service/synthetic.py``) and says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.models import DEFAULT_MODEL
from service.pipeline import print_table, run_pipeline
from service.progress import ConsoleReporter
from service.specs import PipelineSpec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--out", default="runs/main")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--rows", type=int, default=64, help="Alpaca rows to distill and train on")
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--eval-limit", type=int, default=100)
    ap.add_argument("--tasks", default="arc_easy,piqa")
    ap.add_argument("--engine", default="auto", help="teacher engine for the distill step")
    args = ap.parse_args(argv)

    data_dir = Path(args.data_dir)
    out = Path(args.out)
    alpaca = data_dir / "alpaca" / "alpaca_5000.json"
    tasks = args.tasks.split(",")
    if alpaca.is_file():
        dataset = str(alpaca)
    else:
        from service.synthetic import write_synthetic

        data_dir = out / "generated-data"
        dataset = str(write_synthetic(data_dir, rows=args.rows))
        tasks = ["arith"]
        print(
            f"note: {alpaca} not found; using generated arithmetic data in {data_dir} "
            "(rows and an arithmetic multiple-choice task) instead",
            file=sys.stderr,
        )
    spec = PipelineSpec(
        model=args.model,
        dataset=dataset,
        blocks=args.blocks,
        samples=128,
        limit=args.rows,
        max_new_tokens=args.max_new_tokens,
        epochs=args.epochs,
        tasks=tasks,
        eval_limit=args.eval_limit,
        engine=args.engine,
    )
    summary = run_pipeline(spec, out, ConsoleReporter("main"), data_dir=data_dir)
    print_table(summary)
    print(f"\nrun folder: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
