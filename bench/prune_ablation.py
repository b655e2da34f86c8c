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
# (name, metric, presentation, candidates, check_bi).
WAYS = {
    "checked": ("angular, checked (default)", "angular", "text", CANDIDATES, False),
    "bi": ("Block Influence", "bi", "text", 1, False),
    "argmin": ("angular, argmin", "angular", "text", 1, False),
    "checked+bi": ("angular + BI, checked", "angular", "text", CANDIDATES, True),
    "chat": ("angular, argmin, chat (content token)", "angular", "chat", 1, False),
    "chat-checked": (
        "angular, checked, chat (content token)",
        "angular",
        "chat",
        CANDIDATES,
        False,
    ),
}
ONLY = {"chat-checked": (6,)}  # sizes a way is limited to (the rest: every size)
# Evaluation order, most important first: the default and BI at every size, then the
# argmin where the check chose otherwise, then the rest.
ORDER = ["checked", "bi", "argmin", "checked+bi", "chat", "chat-checked"]


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--out", default="runs/prune-ablation")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--blocks", default="6,10,4,2", help="block counts, evaluated in this order")
    ap.add_argument(
        "--ways", default=",".join(ORDER), help="ways to include, of " + ",".join(ORDER)
    )
    args = ap.parse_args(argv)
    ways = [w for w in ORDER if w in args.ways.split(",")]
    from service.blocks import drop_blocks
    from service.evaluate import run_evaluate
    from service.models import load_model
    from service.prune import run_prune, score_calibration

    out, data = Path(args.out), Path(args.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = ConsoleReporter("ablation")
    calibration = str(data / "alpaca" / "alpaca_5000.json")
    sizes = [int(x) for x in args.blocks.split(",")]
    scores: dict[str, object] = {}

    def spec_of(way: str, n: int) -> PruneSpec:
        _, metric, presentation, candidates, check_bi = WAYS[way]
        return PruneSpec(
            calibration=calibration,
            blocks=n,
            metric=metric,
            presentation=presentation,
            candidates=candidates,
            check_bi=check_bi,
        )

    def prune(way: str, n: int) -> dict:
        """The prune report, cut from one scoring pass per presentation."""
        path = out / f"prune-{way}-{n}.json"
        if path.is_file():
            return json.loads(path.read_text())
        spec = spec_of(way, n)
        if spec.presentation not in scores:
            model, tok = load_model(spec.model)
            scores[spec.presentation] = score_calibration(spec, model, tok, rep)
            del model
        target = out / "models" / "tmp"
        report = run_prune(spec, target, rep, scores[spec.presentation])  # type: ignore[arg-type]
        shutil.rmtree(target, ignore_errors=True)
        path.write_text(json.dumps(report, indent=2))
        return report

    def cut(removed: list[int], path: Path) -> None:
        """The unpruned model without ``removed``, saved (what run_prune saves)."""
        model, tok = load_model(DEFAULT_MODEL)
        drop_blocks(model, removed)
        model.save_pretrained(path)
        tok.save_pretrained(path)

    def key(report: dict) -> str:
        return "cut-" + "_".join(map(str, report["removed_layers"]))

    def evaluate(name: str, model: str) -> dict:
        path = out / f"eval-{name}.json"
        if not path.is_file():
            spec = EvaluateSpec(model=model, tasks=TASKS, limit=args.limit)
            run_evaluate(spec, path, rep, data)
        return json.loads(path.read_text())

    base = evaluate("unpruned", DEFAULT_MODEL)
    # Every prune first (one scoring pass per presentation and a check each: minutes),
    # so the removed blocks of every way are known before the long evaluations.
    pairs = [(w, n) for n in sizes for w in ways if n in ONLY.get(w, sizes)]
    reports = {(w, n): prune(w, n) for w, n in pairs}
    for (w, n), r in reports.items():
        print(f"{w} {n}: {r['removed_layers']}", flush=True)

    def table() -> str:
        lines = [
            "| blocks | chosen by | removed | " + " | ".join(TASKS) + " | retention |",
            "|---|---|---|" + "---|" * len(TASKS) + "---|",
            "| 0 | unpruned | - | "
            + " | ".join(f"{base['tasks'][t]['acc']:.3f}" for t in TASKS)
            + " | 100.0% |",
        ]
        for n in sorted(sizes):
            for w in [w for w in ORDER if (w, n) in reports]:
                r = reports[(w, n)]
                ev = _read(out / f"eval-{key(r)}.json")
                cells = ["pending"] * (len(TASKS) + 1)
                if ev:
                    accs = [ev["tasks"][t]["acc"] for t in TASKS]
                    ret = [a / base["tasks"][t]["acc"] for a, t in zip(accs, TASKS, strict=True)]
                    cells = [f"{a:.3f}" for a in accs] + [f"{100 * sum(ret) / len(ret):.1f}%"]
                lines.append(
                    f"| {n} | {WAYS[w][0]} | {r['removed_layers']} | {' | '.join(cells)} |"
                )
        return "\n".join(lines) + "\n"

    # Where the check chose otherwise than the argmin, both first: that is the evidence
    # for checking by default.
    differ = [
        (w, n)
        for n in sizes
        if reports[("checked", n)]["removed_layers"] != reports[("argmin", n)]["removed_layers"]
        for w in ("checked", "argmin")
    ]
    order = differ + [(w, n) for n in sizes for w in ORDER[:2]]
    order += [(w, n) for w in ORDER[2:] for n in sizes]
    for w, n in [p for p in order if p in reports]:
        k = key(reports[(w, n)])
        if not (out / f"eval-{k}.json").is_file():
            path = out / "models" / k
            cut(reports[(w, n)]["removed_layers"], path)
            evaluate(k, str(path))
            shutil.rmtree(path, ignore_errors=True)
        (out / "table.md").write_text(table())
        print(f"done {w} {n}", flush=True)
    print(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
