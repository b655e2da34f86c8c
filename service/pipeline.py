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
from service.specs import DistillSpec, EvaluateSpec, FinetuneSpec, PipelineSpec, PruneSpec


def step_specs(spec: PipelineSpec, out: Path) -> dict:
    """The child specs of a pipeline; the service builds its RQ jobs from the same."""
    pruned, distilled, recovered = out / "pruned", out / "distilled.jsonl", out / "recovered"
    return {
        "prune": PruneSpec(
            model=spec.model,
            calibration=spec.calibration or spec.dataset,
            blocks=spec.blocks,
            metric=spec.metric,
            samples=spec.samples,
            seed=spec.seed,
        ),
        "distill": DistillSpec(
            teacher=spec.model,
            dataset=spec.dataset,
            template=spec.template,
            limit=spec.limit,
            max_new_tokens=spec.max_new_tokens,
            engine=spec.engine,
            dtype=spec.dtype,
            seed=spec.seed,
        ),
        "finetune": FinetuneSpec(
            model=str(pruned),
            dataset=str(distilled),
            lora_rank=spec.lora_rank,
            lora_alpha=spec.lora_alpha,
            target_modules=spec.lora_targets,
            lr=spec.lr,
            epochs=spec.epochs,
            seed=spec.seed,
            # Logit distillation from the unpruned model, when asked (bench/recovery.py).
            **({"teacher": spec.model, "kd_weight": spec.kd_weight} if spec.kd_weight else {}),
        ),
        "evaluate": {
            name: EvaluateSpec(
                model=ref,
                tasks=spec.tasks,
                limit=spec.eval_limit,
                # Agreement with the unpruned teacher, for the pruned and recovered models.
                teacher=spec.model if name != "baseline" and spec.agreement_prompts else None,
                agreement_prompts=max(spec.agreement_prompts, 1),
                agreement_max_new_tokens=spec.agreement_max_new_tokens,
                speedup_prompts=0,
            )
            for name, ref in (
                ("baseline", spec.model),
                ("pruned", str(pruned)),
                ("recovered", str(recovered)),
            )
        },
    }


def _load_or(path: Path, make) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return make()


def run_pipeline(
    spec: PipelineSpec, out: Path, reporter: Reporter | None = None, data_dir: Path | None = None
) -> dict:
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
    steps = step_specs(spec, out)
    times: dict[str, float] = {}

    def timed(name: str, fn):
        t0 = time.monotonic()
        reporter.event(f"step {name}")
        result = fn()
        times[name] = round(time.monotonic() - t0, 1)
        return result

    prune = timed(
        "prune",
        lambda: _load_or(
            out / "pruned" / "prune_report.json",
            lambda: run_prune(steps["prune"], out / "pruned", reporter),
        ),
    )
    distill = timed(
        "distill",
        lambda: _load_or(
            out / "distill_summary.json",
            lambda: _save(
                out / "distill_summary.json",
                run_distill(steps["distill"], out / "distilled.jsonl", reporter),
            ),
        ),
    )
    finetune = timed(
        "finetune",
        lambda: _load_or(
            out / "recovered" / "train_log.json",
            lambda: run_finetune(steps["finetune"], out / "recovered", reporter, resume=True),
        ),
    )
    evals = {}
    for name, espec in steps["evaluate"].items():
        path = out / f"eval_{name}.json"
        evals[name] = timed(
            f"evaluate {name}",
            lambda espec=espec, path=path: _load_or(
                path, lambda: run_evaluate(espec, path, reporter, data_dir=data_dir)
            ),
        )
    summary = build_summary(spec.model_dump(mode="json"), prune, distill, finetune, evals, times)
    _save(out / "summary.json", summary)
    from service.report import run_report

    summary["report"] = run_report(out)["html"]
    return summary


def build_summary(
    spec: dict, prune: dict, distill: dict, finetune: dict, evals: dict, seconds: dict
) -> dict:
    """The run's summary from its steps' results (the CLI pipeline and the service's
    pipeline job both build it here, so ``print_table`` reads either)."""
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


def write_run_dir(
    out: Path, spec: dict, prune: dict, distill: dict, evals: dict, summary: dict
) -> None:
    """Lay out a run folder the way ``run_pipeline`` does (what ``run_report`` reads), from
    step results held elsewhere (the service keeps them in job records)."""
    (out / "pruned").mkdir(parents=True, exist_ok=True)
    _save(out / "pruned" / "prune_report.json", prune)
    _save(out / "pipeline_spec.json", spec)
    _save(out / "distill_summary.json", distill)
    for name, e in evals.items():
        _save(out / f"eval_{name}.json", e)
    _save(out / "summary.json", summary)


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
