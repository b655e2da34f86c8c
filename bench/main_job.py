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

from service import main_job_options as main_job
from service.pipeline import print_table, run_pipeline
from service.progress import ConsoleReporter
from service.specs import PipelineSpec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    main_job.add_options(ap)
    ap.add_argument("--out", default="runs/main")
    ap.add_argument("--engine", default="auto", help="teacher engine for the distill step")
    args = ap.parse_args(argv)

    out = Path(args.out)
    data_dir = Path(args.data_dir)
    dataset, tasks, generated = main_job.dataset_and_tasks(args, out / "generated-data")
    note = main_job.generated_note(args, dataset) if generated else ""
    if generated:
        data_dir = dataset.parent
        print(note, file=sys.stderr)
    spec = PipelineSpec(**main_job.pipeline_fields(args, str(dataset), tasks), engine=args.engine)
    summary = run_pipeline(spec, out, ConsoleReporter("main"), data_dir=data_dir)
    print_table(summary)
    if note:
        print(f"\n{note}")
    print(f"\nrun folder: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
