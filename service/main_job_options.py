"""The main job's options and data, shared by ``bench/main_job.py`` (in-process) and
``api/demo.py`` (through the service): prune 6 of the 30 blocks of the embedded model,
self-distill and recover on an Alpaca sample, evaluate on arc_easy and piqa."""

from __future__ import annotations

import argparse
from pathlib import Path

from service.models import DEFAULT_MODEL


def add_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--rows", type=int, default=64, help="Alpaca rows to distill and train on")
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--eval-limit", type=int, default=100)
    ap.add_argument("--tasks", default="arc_easy,piqa")


def dataset_and_tasks(args: argparse.Namespace, generated: Path) -> tuple[Path, list[str], bool]:
    """(fine-tuning set, tasks, generated?): the Alpaca sample of the data folder, else a
    generated arithmetic set and task written under ``generated`` (a user's machine
    without ../shared/data)."""
    alpaca = Path(args.data_dir) / "alpaca" / "alpaca_5000.json"
    if alpaca.is_file():
        return alpaca, args.tasks.split(","), False
    from service.synthetic import write_synthetic

    return write_synthetic(generated, rows=args.rows), ["arith"], True


def pipeline_fields(args: argparse.Namespace, dataset: str, tasks: list[str]) -> dict:
    """PipelineSpec fields of the main job."""
    return {
        "model": args.model,
        "dataset": dataset,
        "blocks": args.blocks,
        "samples": 128,
        "limit": args.rows,
        "max_new_tokens": args.max_new_tokens,
        "epochs": args.epochs,
        "tasks": tasks,
        "eval_limit": args.eval_limit,
    }


def generated_note(args: argparse.Namespace, dataset: Path) -> str:
    """What a run on generated data trains and evaluates on, and how to get the real table
    (printed before the run and again under its table)."""
    return (
        f"note: no public data sets at {args.data_dir} (it has no alpaca/alpaca_5000.json).\n"
        f"  This run fine-tunes on generated arithmetic word problems ({dataset.name}) and\n"
        f"  evaluates on 'arith', a generated arithmetic multiple-choice task (in\n"
        f"  {dataset.parent}), not on arc_easy/piqa: its accuracies are not the published ones.\n"
        f"  For the real table, put the public sets in {args.data_dir} (alpaca/alpaca_5000.json,\n"
        f"  arc_easy/arc_easy.jsonl, piqa/piqa.jsonl; llm-foundry's query/choices/gold files),\n"
        f"  or point at them: make run DATA=/path/to/data (or --data-dir /path/to/data)."
    )
