"""Which blocks each way of choosing removes from the builtin model, and what that costs
without fine-tuning (docs/results.md, "Ablation: how the blocks are chosen"):

    DISTILLERY_THREADS=1 .venv/bin/python -m bench.prune_ablation --data-dir ../shared/data \\
        --out runs/prune-ablation --limit 500

One calibration pass per presentation scores every block (128 Alpaca rows, seed 0, 256
tokens: the defaults of ``distillery prune``); every way below is then cut from those
scores with ``run_prune``. Each distinct set of removed blocks is evaluated once with
lm-eval on the first ``--limit`` documents of arc_easy and piqa (the tasks the 135M model
does clearly better than chance on); its weights are deleted after, its report kept.
Rerunning the same command resumes; the table is printed and written to ``table.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from service.models import DEFAULT_MODEL
from service.progress import ConsoleReporter
from service.specs import CANDIDATES, EvaluateSpec, PruneSpec

TASKS = ["arc_easy", "piqa"]
# (name, metric, presentation, candidates, check_bi), in order of importance.
WAYS = [
    ("angular, checked (default)", "angular", "text", CANDIDATES, False),
    ("angular, argmin", "angular", "text", 1, False),
    ("bi", "bi", "text", 1, False),
    ("angular + bi, checked", "angular", "text", CANDIDATES, True),
    ("angular, argmin, chat (content token)", "angular", "chat", 1, False),
]


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--out", default="runs/prune-ablation")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--blocks", default="6,2,4,10", help="block counts, in this order")
    ap.add_argument("--ways", type=int, default=len(WAYS), help="the first N ways only")
    args = ap.parse_args(argv)
    from service.evaluate import run_evaluate
    from service.models import load_model
    from service.prune import run_prune, score_calibration

    out, data = Path(args.out), Path(args.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = ConsoleReporter("ablation")
    calibration = str(data / "alpaca" / "alpaca_5000.json")

    def evaluate(name: str, model: str) -> dict:
        path = out / f"eval-{name}.json"
        if not path.is_file():
            spec = EvaluateSpec(model=model, tasks=TASKS, limit=args.limit)
            run_evaluate(spec, path, rep, data)
        return json.loads(path.read_text())

    base = evaluate("unpruned", DEFAULT_MODEL)
    scores: dict[str, object] = {}
    rows = []
    for n in [int(x) for x in args.blocks.split(",")]:
        for label, metric, presentation, candidates, check_bi in WAYS[: args.ways]:
            spec = PruneSpec(
                calibration=calibration,
                blocks=n,
                metric=metric,
                presentation=presentation,
                candidates=candidates,
                check_bi=check_bi,
            )
            name = f"{metric}{n}-{presentation}-c{candidates}{'-bi' if check_bi else ''}"
            report = _read(out / f"prune-{name}.json")
            if report is None:
                if presentation not in scores:
                    model, tok = load_model(DEFAULT_MODEL)
                    scores[presentation] = score_calibration(spec, model, tok, rep)
                    del model
                cut = out / "models" / name
                report = run_prune(spec, cut, rep, scores[presentation])  # type: ignore[arg-type]
                (out / f"prune-{name}.json").write_text(json.dumps(report, indent=2))
            removed = report["removed_layers"]
            key = "cut-" + "_".join(map(str, removed))
            if not (out / f"eval-{key}.json").is_file():
                cut = out / "models" / name
                if not cut.is_dir():  # resumed after its weights were deleted: cut again
                    run_prune(spec, cut, rep, scores.get(presentation))  # type: ignore[arg-type]
                evaluate(key, str(cut))
            shutil.rmtree(out / "models" / name, ignore_errors=True)
            ev = json.loads((out / f"eval-{key}.json").read_text())
            accs = [ev["tasks"][t]["acc"] for t in TASKS]
            ret = sum(a / base["tasks"][t]["acc"] for a, t in zip(accs, TASKS, strict=True))
            rows.append(
                f"| {n} | {label} | {removed} | "
                + " | ".join(f"{a:.3f}" for a in accs)
                + f" | {100 * ret / len(TASKS):.1f}% |"
            )
            table = "\n".join(
                [
                    "| blocks | chosen by | removed | " + " | ".join(TASKS) + " | retention |",
                    "|---|---|---|" + "---|" * len(TASKS) + "---|",
                    "| 0 | unpruned | - | "
                    + " | ".join(f"{base['tasks'][t]['acc']:.3f}" for t in TASKS)
                    + " | 100.0% |",
                    *rows,
                ]
            )
            (out / "table.md").write_text(table + "\n")
            print(rows[-1], flush=True)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
