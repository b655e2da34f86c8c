"""The whole method in one call: prune ∥ distill → finetune → evaluate.

    distillery run --model builtin:smollm2-135m-instruct --dataset rows.jsonl --blocks 6 --out runs/demo

Each step writes its output under ``out`` and is skipped when that output is already
complete, so rerunning the same command after an interruption resumes (distillation and
fine-tuning also resume inside their step). ``out/summary.json`` holds the table that
``print_table`` prints: accuracy of the baseline, pruned and recovered models and the
retention (model acc / baseline acc) per task.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from service.adapters import check_targets, model_shape
from service.errors import SpecError
from service.evaluate import retention
from service.progress import Reporter
from service.specs import PipelineSpec
from service.steps import EVALUATED, Step, evaluate_step, pipeline_steps, run_folder_ref


def run_pipeline(
    spec: PipelineSpec, out: Path, reporter: Reporter | None = None, data_dir: Path | None = None
) -> dict:
    """Run the steps of ``service.steps`` in order, each skipped when its result is in
    ``out`` already; return the summary."""
    from service.distill import run_distill
    from service.evaluate import run_evaluate
    from service.finetune import run_finetune
    from service.prune import run_prune

    reporter = reporter or Reporter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec_file = out / "pipeline_spec.json"
    if spec_file.is_file() and json.loads(spec_file.read_text()) != spec.model_dump(mode="json"):
        raise SpecError(f"{out} holds a run of another spec; use a new --out")
    spec_file.write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
    # Adapter targets the model lacks fail now, not after the prune and distill steps.
    shape = model_shape(spec.model)
    if shape is not None:
        check_targets(spec.lora_targets, shape, spec.model)

    def run(step: Step) -> dict:
        product = out / step.output
        if step.type == "prune":
            return run_prune(step.spec, product, reporter)
        if step.type == "distill":
            return _save(out / step.done, run_distill(step.spec, product, reporter))
        if step.type == "finetune":
            return run_finetune(step.spec, product, reporter, resume=True)
        return run_evaluate(step.spec, product, reporter, data_dir=data_dir)

    results: dict[str, dict] = {}
    times: dict[str, float] = {}
    for step in pipeline_steps(spec, run_folder_ref(out)):
        if step.type == "report":
            continue
        t0 = time.monotonic()
        reporter.event(f"step {step.name}")
        done = out / step.done
        results[step.name] = json.loads(done.read_text()) if done.is_file() else run(step)
        times[step.name] = round(time.monotonic() - t0, 1)
    summary = build_summary(spec.model_dump(mode="json"), results, times)
    _save(out / "summary.json", summary)
    from service.report import run_report

    summary["report"] = run_report(out)["html"]
    return summary


def build_summary(spec: dict, results: dict[str, dict], seconds: dict) -> dict:
    """The run's summary from its steps' results, by step name (the CLI pipeline and the
    service's pipeline job both build it here, so ``print_table`` reads either)."""
    prune, distill, finetune = (results[k] for k in ("prune", "distill", "finetune"))
    evals = {m: results[evaluate_step(m)] for m in EVALUATED}
    summary = {
        "spec": spec,
        "removed_layers": prune["removed_layers"],
        "layers": [prune["num_layers_before"], prune["num_layers_after"]],
        "distill": {k: distill.get(k) for k in ("rows", "distilled_fraction", "tokens_per_s")},
        "finetune": {
            k: finetune.get(k)
            for k in ("first_loss", "final_loss", "steps", "tokens_per_s", "rows")
        },
        "eval": {
            name: {
                "tasks": {t: r["acc"] for t, r in e["tasks"].items()},
                "stderr": {t: r.get("acc_stderr") for t, r in e["tasks"].items()},
                "average": e.get("average"),
                "retention": retention(e["tasks"], evals["baseline"]["tasks"])["mean"],
            }
            for name, e in evals.items()
        },
        "seconds": seconds,
    }
    for name in ("pruned", "recovered"):
        agree, spec_dec = evals[name].get("agreement"), evals[name].get("speculative")
        if agree:
            summary["eval"][name]["agreement"] = {
                "kl": agree.get("kl_mean"),
                "top1": agree.get("top1"),
                "embedding_cosine": agree.get("embedding_cosine"),
                "acceptance_rate": (spec_dec or {}).get("acceptance_rate"),
            }
    return summary


def _save(path: Path, obj: dict) -> dict:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)
    return obj


def format_table(summary: dict) -> str:
    """Markdown table: accuracy per task (± stderr), average and retention per model."""
    evals = summary["eval"]
    tasks = list(next(iter(evals.values()))["tasks"])
    head = "| model | " + " | ".join(tasks) + " | average | retention |"
    lines = [head, "|" + "---|" * (len(tasks) + 3)]
    for name, e in evals.items():
        cells = []
        for t in tasks:
            se = e["stderr"].get(t)
            cells.append(f"{e['tasks'][t]:.3f}" + (f" ± {se:.3f}" if se else ""))
        ret = e["retention"]
        avg = e["average"]
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {avg:.3f} | "
            + (f"{100 * ret:.1f}%" if ret is not None else "-")
            + " |"
        )
    return "\n".join(lines)


def print_table(summary: dict) -> None:
    before, after = summary["layers"]
    print(f"\nremoved layers {summary['removed_layers']} ({before} -> {after} blocks)")
    d = summary["distill"]
    if d.get("distilled_fraction") is not None:
        print(f"distilled {d['rows']} rows, {100 * d['distilled_fraction']:.0f}% rewritten")
    f = summary.get("finetune") or {}
    if f.get("steps") and f.get("first_loss") is not None:
        print(
            f"fine-tuned the pruned model for {f['steps']} steps on {f['rows']} rows: "
            f"training loss {f['first_loss']:.3f} at the first step, {f['final_loss']:.3f} "
            "at the last"
        )
    print(format_table(summary))
    for name, e in summary["eval"].items():
        a = e.get("agreement")
        if a:
            print(
                f"{name}: KL to teacher {a['kl']:.3f}, top-1 {a['top1']:.3f}, "
                f"embedding cosine {a['embedding_cosine']:.3f}, "
                f"draft acceptance {a['acceptance_rate']:.3f}"
            )
    print("step seconds: " + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()))
