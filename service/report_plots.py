"""The report's figures (matplotlib, Agg backend: no display needed).

Each ``plot_*`` takes the JSON a pipeline step wrote and a PNG path, draws one figure
and returns the path. ``service/report.py`` decides which ones exist.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DPI = 110
# Colours per condition, stable across figures.
COLOURS = {"baseline": "#4c72b0", "pruned": "#dd8452", "recovered": "#55a868"}
EXTRA = ["#8172b3", "#c44e52", "#937860", "#da8bc3", "#8c8c8c"]


def _colour(name: str, i: int) -> str:
    return COLOURS.get(name, EXTRA[i % len(EXTRA)])


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def distance_matrix(distances: dict[str, list[float]], depth: int) -> tuple[np.ndarray, list[int]]:
    """Rows: start layer l (0-based); columns: block size n; NaN where l + n > depth."""
    sizes = sorted(int(n) for n in distances)
    m = np.full((depth, len(sizes)), np.nan)
    for j, n in enumerate(sizes):
        for layer, d in enumerate(distances[str(n)]):
            if d is not None and layer < depth:
                m[layer, j] = d
    return m, sizes


def plot_distances(prune: dict, path: Path) -> Path:
    """Angular distance d(h_l, h_{l+n}) over start layer x block size, as in Gromov et al.
    (2024, Fig. 1): the minimum of each column is dotted, the removed run is boxed.
    For the Block Influence metric (one score per block), bars per block instead."""
    depth = prune["num_layers_before"]
    removed = prune.get("removed_layers") or []
    distances = prune.get("distances") or {}
    if prune.get("metric") == "bi" or set(distances) == {"1"}:
        scores = distances.get("1") or prune.get("block_influence") or []
        fig, ax = plt.subplots(figsize=(8, 3.6))
        colours = ["#c44e52" if i in removed else "#4c72b0" for i in range(len(scores))]
        ax.bar(range(len(scores)), scores, color=colours)
        ax.set_xlabel("block (0-based)")
        ax.set_ylabel("Block Influence 1 - cos")
        ax.set_title("Block Influence per block (red: removed)")
        return _save(fig, path)
    m, sizes = distance_matrix(distances, depth)
    fig, ax = plt.subplots(figsize=(7, 5.5))
    im = ax.imshow(
        m, origin="lower", aspect="auto", cmap="viridis", interpolation="nearest",
        extent=(min(sizes) - 0.5, max(sizes) + 0.5, -0.5, depth - 0.5),
    )  # fmt: skip
    fig.colorbar(im, ax=ax, label="angular distance  arccos(cos) / π")
    for j, n in enumerate(sizes):
        col = m[:, j]
        if np.isfinite(col).any():
            ax.plot(n, int(np.nanargmin(col)), "w.", markersize=6)
    if removed:
        n, start = len(removed), removed[0]
        ax.add_patch(
            plt.Rectangle((n - 0.5, start - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2)
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block size n")
    ax.set_ylabel("start layer l (0-based)")
    ax.set_title(f"Distance from block l's input to block l+n-1's output ({depth} blocks)")
    return _save(fig, path)


def _smooth(ys: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_loss(train_log: dict, path: Path) -> Path:
    """Training loss per optimiser step (and a moving average when there are many)."""
    steps = [s["step"] for s in train_log["steps"]]
    loss = [s["loss"] for s in train_log["steps"]]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.plot(steps, loss, color="#4c72b0", alpha=0.45 if len(loss) > 30 else 1.0, label="loss")
    if len(loss) > 30:
        window = max(5, len(loss) // 20)
        ax.plot(steps, _smooth(loss, window), color="#4c72b0", label=f"mean of {window}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (response tokens)")
    lrs = [s.get("lr") for s in train_log["steps"]]
    if all(lr is not None for lr in lrs):
        ax2 = ax.twinx()
        ax2.plot(steps, lrs, color="#8c8c8c", linestyle=":", label="learning rate")
        ax2.set_ylabel("learning rate", color="#8c8c8c")
        ax2.tick_params(axis="y", colors="#8c8c8c")
    ax.legend(loc="upper right")
    ax.set_title("Recovery fine-tuning")
    return _save(fig, path)


def plot_accuracy(evals: dict[str, dict], path: Path) -> Path:
    """Grouped bars: accuracy per task (and the average) for each model, ± stderr."""
    names = list(evals)
    tasks = list(dict.fromkeys(t for e in evals.values() for t in e["tasks"]))
    groups = tasks + ["average"]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) + 2), 4))
    for i, name in enumerate(names):
        e = evals[name]
        accs = [e["tasks"].get(t, {}).get("acc") for t in tasks] + [e.get("average")]
        errs = [e["tasks"].get(t, {}).get("acc_stderr") for t in tasks] + [None]
        xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
        vals = [a if a is not None else math.nan for a in accs]
        yerr = [s if s is not None else math.nan for s in errs]
        bars = ax.bar(xs, vals, width, yerr=yerr, capsize=3, label=name, color=_colour(name, i))
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("accuracy")
    top = max(
        [1e-3]
        + [(r.get("acc") or 0) + (r.get("acc_stderr") or 0) for e in evals.values() for r in e["tasks"].values()]
    )  # fmt: skip
    ax.set_ylim(0, min(1.1, top * 1.3))  # headroom for the labels and the legend
    ax.legend(loc="upper left", ncols=len(names))
    ax.set_title("Accuracy per task (error bars: standard error)")
    return _save(fig, path)
