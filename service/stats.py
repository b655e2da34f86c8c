"""Paired comparisons of two models on the same documents.

Two models evaluated on the same documents are compared document by document: the
difference in accuracy is the mean of per-document differences, and its uncertainty is
much smaller than that of two independent accuracies, because most documents are
answered the same way by both. The interval is a percentile bootstrap over documents
(resampled within each task, the same resample for both models), as in Koehn (2004)
for MT and in lm-evaluation-harness's own bootstrap of stderrs; numpy does the work.

The inputs are the ``scores`` strings of evaluation reports (``service/evaluate.py``):
one '0'/'1' per document, in document order.
"""

from __future__ import annotations

import numpy as np


def _arrays(scores: dict[str, str]) -> dict[str, np.ndarray]:
    return {t: np.frombuffer(s.encode(), dtype=np.uint8) - ord("0") for t, s in scores.items()}


def paired_difference(
    a: dict[str, str],
    b: dict[str, str],
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Accuracy of A minus accuracy of B, per task and averaged over tasks (each task
    weighted equally, as the reports' "average"), with bootstrap confidence intervals.

    ``a`` and ``b`` map task -> per-document scores over the same documents."""
    if set(a) != set(b) or not a:
        raise ValueError(f"different tasks: {sorted(a)} vs {sorted(b)}")
    xa, xb = _arrays(a), _arrays(b)
    rng = np.random.default_rng(seed)
    lo_q, hi_q = (1 - confidence) / 2, 1 - (1 - confidence) / 2
    tasks: dict[str, dict] = {}
    boot_sum = np.zeros(resamples)
    for task in sorted(a):
        if len(xa[task]) != len(xb[task]):
            raise ValueError(
                f"{task}: {len(xa[task])} vs {len(xb[task])} documents: not the same documents"
            )
        d = xa[task].astype(np.int8) - xb[task].astype(np.int8)
        n = len(d)
        boot = d[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
        boot_sum += boot
        tasks[task] = {
            "n": n,
            "a": float(xa[task].mean()),
            "b": float(xb[task].mean()),
            "diff": float(d.mean()),
            "ci": [float(np.quantile(boot, lo_q)), float(np.quantile(boot, hi_q))],
            "a_only": int((d > 0).sum()),  # documents only A gets right
            "b_only": int((d < 0).sum()),
        }
    boot_avg = boot_sum / len(tasks)
    diff = float(np.mean([t["diff"] for t in tasks.values()]))
    return {
        "diff": diff,
        "ci": [float(np.quantile(boot_avg, lo_q)), float(np.quantile(boot_avg, hi_q))],
        "confidence": confidence,
        "resamples": resamples,
        "tasks": tasks,
    }


def task_scores(report: dict, tasks: list[str] | None = None) -> dict[str, str]:
    """task -> per-document scores of an evaluation report (those of ``tasks`` only)."""
    out = {}
    for task, rec in report["tasks"].items():
        if tasks is not None and task not in tasks:
            continue
        if "scores" not in rec:
            raise ValueError(f"the report has no per-document scores for {task}")
        out[task] = rec["scores"]
    return out
