"""Accuracy on standard tasks through lm-evaluation-harness, and retention against a baseline.

    distillery evaluate --model recovered/ --baseline builtin:smollm2-135m-instruct \\
        --tasks arc_easy,piqa --limit 100 --data-dir ../shared/data --out eval.json

lm-eval is the engine: the task configs of ``service/tasks/configs.py`` point it at local
files (``--data-dir``, else ``DISTILLERY_EVAL_DATA``, else ``../shared/data`` beside the
project), so nothing is downloaded. ``--limit K`` scores the first K documents of each
task, the same ones for every model. The output::

    {"model": ..., "tasks": {"arc_easy": {"acc", "acc_stderr", "acc_norm", ..., "n"}},
     "average": mean acc,
     "baseline": {same for --baseline}, "retention": {"tasks": {task: acc / baseline acc},
     "mean": ...}}

"acc" is the main metric of every task (gsm8k: exact match of the number after "####");
acc_norm (length-normalised) is recorded beside it. Retention uses acc because it is the
one metric every task has, and the paper's OpenLLM v1 tasks report it.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from service.errors import DistilleryError, ModelError
from service.models import pick_device, pick_dtype, resolve_model
from service.progress import Reporter
from service.settings import get_settings, resolve_data_dir
from service.specs import EvaluateSpec
from service.tasks.configs import MAIN_METRIC, data_files, task_name, write_task_configs


def check_data(tasks: list[str], data_dir: Path) -> None:
    """Fail before loading any model when a task file is missing."""
    missing = [str(p) for t in tasks for p in data_files(t, data_dir).values() if not p.is_file()]
    if missing:
        raise DistilleryError(
            f"missing evaluation file(s): {', '.join(missing)}", {"missing": missing}
        )


def quiet_libraries() -> None:
    """lm-eval, datasets and transformers log and draw bars freely. lm-eval keeps its
    errors only (its warnings here are the --limit caveat and whitespace hints)."""
    import datasets
    import transformers

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_lm(ref: str, batch_size: int):
    """An lm-eval HFLM for a model reference, fp32 on CPU (bf16 on GPU)."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        """HFLM whose per-request progress bars show only on a terminal (in a worker's
        log they are noise; the reporter gets progress between tasks)."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm or not sys.stderr.isatty())

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm or not sys.stderr.isatty())

    path = resolve_model(ref)
    device = pick_device(get_settings().device)
    try:
        return QuietHFLM(
            pretrained=str(path),
            dtype=pick_dtype(device),
            device=str(device),
            batch_size=batch_size,
        )
    except Exception as exc:
        raise ModelError(f"cannot load model {ref!r} from {path}: {exc}") from exc


def _number(value: Any) -> float | None:
    # lm-eval writes "N/A" for a stderr it cannot compute (one document).
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def task_metrics(task: str, results: dict) -> dict:
    """Our record of one task from a simple_evaluate result."""
    name = task_name(task)
    res = results["results"][name]
    metric, filt = MAIN_METRIC[task]
    out = {
        "metric": metric if filt == "none" else f"{metric},{filt}",
        "acc": _number(res.get(f"{metric},{filt}")),
        "acc_stderr": _number(res.get(f"{metric}_stderr,{filt}")),
        "acc_norm": _number(res.get("acc_norm,none")),
        "acc_norm_stderr": _number(res.get("acc_norm_stderr,none")),
        "n": int(results["n-samples"][name]["effective"]),
    }
    if task == "gsm8k":
        out["acc_flexible"] = _number(res.get("exact_match,flexible-extract"))
    samples = (results.get("samples") or {}).get(name)
    if samples:
        out["scores"] = doc_scores(samples, metric, filt)
    return out


def doc_scores(samples: list[dict], metric: str, filt: str) -> str:
    """The main metric of every document, in document order, as one string of 0/1
    characters: what a paired comparison of two models on the same documents needs
    (``service/stats.py``), about 1 byte per document in the report."""
    by_doc = {}
    for sample in samples:
        if sample.get("filter", filt) != filt:
            continue
        value = sample[metric]
        by_doc[int(sample["doc_id"])] = "1" if float(value) >= 0.5 else "0"
    return "".join(by_doc[i] for i in sorted(by_doc))


def mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def retention(model_tasks: dict, baseline_tasks: dict) -> dict:
    """model acc / baseline acc per task and their mean. A task whose baseline scored 0
    (or is missing) has no retention (None) and is left out of the mean."""
    per_task = {}
    for task, rec in model_tasks.items():
        base = baseline_tasks.get(task, {}).get("acc")
        acc = rec.get("acc")
        per_task[task] = acc / base if acc is not None and base else None
    return {"tasks": per_task, "mean": mean(list(per_task.values()))}


def evaluate_model(
    ref: str,
    tasks: list[str],
    task_manager: Any,
    spec: EvaluateSpec,
    reporter: Reporter,
    step: int,
    steps_total: int,
    max_gen_toks: int | None = None,
) -> dict:
    """Run every task on one model (loaded once); one simple_evaluate per task so
    progress and cancellation happen between tasks."""
    import lm_eval

    reporter.event(f"evaluating {ref} on {','.join(tasks)}")
    lm = load_lm(ref, spec.batch_size)
    records = {}
    try:
        for task in tasks:
            reporter.check()
            reporter.progress(model=ref, task=task, step=step, steps_total=steps_total)
            gen = max_gen_toks is not None and task == "gsm8k"
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=[task_name(task)],
                task_manager=task_manager,
                limit=spec.limit,
                log_samples=True,  # per-document scores for paired comparisons
                gen_kwargs={"max_gen_toks": max_gen_toks} if gen else None,
            )
            if results is None:  # only on non-zero ranks of a distributed run
                raise DistilleryError("lm-eval returned no results")
            records[task] = task_metrics(task, results)
            step += 1
    finally:
        del lm
        gc.collect()
    reporter.progress(model=ref, step=step, steps_total=steps_total)
    return {
        "model": ref,
        "tasks": records,
        "average": mean([r["acc"] for r in records.values()]),
    }


def write_json(obj: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, out)


def run_evaluate(
    spec: EvaluateSpec,
    out: Path,
    reporter: Reporter | None = None,
    data_dir: Path | None = None,
    max_gen_toks: int | None = None,
) -> dict:
    """Evaluate spec.model (and spec.baseline) on spec.tasks; write and return the report.

    ``max_gen_toks`` caps gsm8k's generation (tests use a small one; default 256)."""
    reporter = reporter or Reporter()
    tasks = list(dict.fromkeys(spec.tasks))
    data = resolve_data_dir(data_dir)
    check_data(tasks, data)
    quiet_libraries()
    from lm_eval.tasks import TaskManager

    models = [spec.model] + ([spec.baseline] if spec.baseline else [])
    steps_total = len(tasks) * len(models)
    with tempfile.TemporaryDirectory(prefix="distillery-eval-") as tmp:
        # Configs and the datasets cache live in a private folder: nothing stale is
        # reused and nothing is left in ~/.cache.
        folder = Path(tmp) / "tasks"
        write_task_configs(tasks, data, folder, cache_dir=Path(tmp) / "cache")
        manager = TaskManager(include_path=str(folder), include_defaults=False)
        reports = [
            evaluate_model(
                ref, tasks, manager, spec, reporter, i * len(tasks), steps_total, max_gen_toks
            )
            for i, ref in enumerate(models)
        ]
    result: dict[str, Any] = {**reports[0], "limit": spec.limit, "data_dir": str(data)}
    if spec.baseline:
        result["baseline"] = reports[1]
        result["retention"] = retention(reports[0]["tasks"], reports[1]["tasks"])
    if spec.teacher:
        # Teacher agreement and speculative acceptance (service/agreement.py).
        from service.agreement import agreement_for_spec

        result.update(agreement_for_spec(spec, reporter, data))
    write_json(result, out)
    reporter.event(f"wrote {out}")
    return result
