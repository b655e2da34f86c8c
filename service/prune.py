"""Layer pruning: score decoder blocks on calibration rows, drop the most redundant ones,
save a plain Hugging Face model.

    DISTILLERY_HOME=/tmp/dhome distillery prune --model builtin:smollm2-135m-instruct \\
        --calibration ../shared/data/alpaca/alpaca_5000.json --blocks 6 --out /tmp/pruned6

The output directory holds the pruned model and tokenizer (``AutoModelForCausalLM.
from_pretrained(out)`` loads it) and ``prune_report.json``: the metric, depth before and
after, the removed blocks as 0-based indices of the *original* model, and the scores
(``distances[str(n)][l]``: angular distance from the input of block ``l`` to the output of
block ``l+n-1``; for ``bi``, ``distances["1"]`` is the Block Influence per block),
``presentation`` and ``read`` (how rows were shown and which tokens were read: the last
content token of each, ``service/calibration.py``), and for ``angular`` the
``candidates`` checked (removed blocks, distance, ``kl`` to the unpruned model) with the
``check`` that chose among them (``service/prune_check.py``). Scoring and cutting live in
``service/blocks.py``.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

from service.blocks import BlockScores, choose_blocks, drop_blocks, score_blocks
from service.calibration import Doc, calibration_batches, load_calibration, split_docs
from service.errors import SpecError
from service.models import load_model, resolve_model
from service.progress import Reporter
from service.prune_check import CHECK_BATCH, candidate_runs, check_candidates
from service.specs import PruneSpec

REPORT_NAME = "prune_report.json"


def _num_layers(model_ref: str) -> int | None:
    """Depth from config.json, read before the weights are loaded (fail fast)."""
    cfg = json.loads((resolve_model(model_ref) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    return cfg.get("num_hidden_layers")


def _check_blocks(blocks: int, num_layers: int) -> None:
    if blocks >= num_layers:
        raise SpecError(
            f"cannot remove {blocks} blocks from a model of {num_layers}: at least one "
            f"block must remain (choose --blocks between 1 and {num_layers - 1})",
            {"blocks": blocks, "num_hidden_layers": num_layers},
        )


def _save_atomically(model, tokenizer, report: dict, out: Path) -> None:
    """Write into a sibling temporary directory, then rename: never a half model at out."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
        if out.exists():
            old = out.with_name(f".old-{out.name}-{uuid.uuid4().hex[:8]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def calibration_docs(spec: PruneSpec) -> tuple[list[Doc], list[Doc]]:
    """(documents to score, held-out documents for the check) of ``spec``."""
    return split_docs(
        load_calibration(spec.calibration), spec.samples, spec.check_samples, spec.seed
    )


def score_calibration(
    spec: PruneSpec, model, tokenizer, reporter: Reporter | None = None, docs=None
) -> BlockScores:
    """Run the calibration documents of ``spec`` (``docs``, when already read) through
    ``model`` and collect per-block scores (every metric and block count is chosen from
    these, so one pass serves many prunes)."""
    reporter = reporter or Reporter()
    docs = docs if docs is not None else calibration_docs(spec)[0]
    depth = model.config.get_text_config().num_hidden_layers
    batches, read = calibration_batches(
        docs, tokenizer, spec.max_length, spec.batch_size, spec.presentation
    )
    total = sum(len(b["input_ids"]) for b in batches)
    reporter.event(
        f"scoring {depth} blocks of {spec.model} on {total} rows ({spec.presentation}); "
        f"tokens read: {read['distinct_tokens']} distinct, most common {read['most_common'][:3]}",
        rows=total,
    )
    done = 0

    def on_batch(n: int) -> None:
        nonlocal done
        done += n
        reporter.progress(rows_done=done, rows_total=total)
        reporter.check()

    reporter.check()
    scores = score_blocks(model, batches, on_batch=on_batch)
    scores.read = read
    return scores


def check_choice(
    spec: PruneSpec, model, tokenizer, scores: BlockScores, docs, held, reporter: Reporter
) -> tuple[list[int], list[dict], dict | None]:
    """(removed blocks, candidates with their distance and check score, check summary).
    One candidate (``candidates=1``, no BI) is the plain argmin, unchecked."""
    cands = candidate_runs(scores, spec.blocks, spec.candidates, spec.check_bi)
    if len(cands) == 1:
        return cands[0]["removed"], cands, None
    check_docs = held or docs[: spec.check_samples]
    batches, _ = calibration_batches(
        check_docs, tokenizer, spec.max_length, CHECK_BATCH, spec.presentation
    )
    reporter.event(f"checking {len(cands)} candidate runs on {len(check_docs)} rows")
    kls, tokens = check_candidates(
        model, batches, [c["removed"] for c in cands], on_batch=lambda n: reporter.check()
    )
    for c, kl in zip(cands, kls, strict=True):
        c["kl"] = kl
    best = min(range(len(cands)), key=lambda i: (kls[i], i))
    summary = {
        "measure": "mean per-token KL(unpruned || pruned) of next-token distributions",
        "rows": sum(len(b["input_ids"]) for b in batches),
        "tokens": tokens,
        "held_out": bool(held),
        "chosen": best,
    }
    return cands[best]["removed"], cands, summary


def run_prune(
    spec: PruneSpec,
    out: Path,
    reporter: Reporter | None = None,
    scores: BlockScores | None = None,
) -> dict:
    """Score, choose (and check the choice), drop, save. Returns (and writes) the report.

    ``scores``: from an earlier ``score_calibration`` of the same model and calibration
    spec (bench/recovery.py prunes several ways from one pass); None scores here."""
    reporter = reporter or Reporter()
    t0 = time.monotonic()
    depth = _num_layers(spec.model)
    if depth is not None:
        _check_blocks(spec.blocks, depth)
    # Read before the model loads, so a bad calibration set fails fast.
    docs, held = calibration_docs(spec)
    model, tokenizer = load_model(spec.model)
    depth = model.config.get_text_config().num_hidden_layers
    _check_blocks(spec.blocks, depth)
    if scores is None:
        scores = score_calibration(spec, model, tokenizer, reporter, docs)
    bi = scores.block_influence()
    candidates: list[dict] = []
    check = None
    if spec.metric == "angular":
        removed, candidates, check = check_choice(
            spec, model, tokenizer, scores, docs, held, reporter
        )
        distances = scores.distances([*range(1, depth // 2 + 1), spec.blocks])
        run = removed == list(range(removed[0], removed[0] + spec.blocks))
        chosen = distances[str(spec.blocks)][removed[0]] if run else None
    else:
        removed = choose_blocks(scores, spec.blocks, "bi")
        distances = {"1": bi}
        chosen = sum(bi[i] for i in removed) / len(removed)
    drop_blocks(model, removed)
    report = {
        "metric": spec.metric,
        "num_layers_before": depth,
        "num_layers_after": depth - len(removed),
        "removed_layers": removed,
        "removed_score": chosen,
        "presentation": spec.presentation,
        "read": scores.read,
        "candidates": candidates,
        "check": check,
        "distances": distances,
        "block_influence": bi,
        "samples": scores.samples,
        "tokens": scores.tokens,
        "model": spec.model,
        "calibration": spec.calibration,
        "seconds": 0.0,
    }
    report["seconds"] = round(time.monotonic() - t0, 2)
    reporter.check()
    _save_atomically(model, tokenizer, report, out)
    reporter.event(f"removed blocks {removed}; saved {depth - len(removed)} blocks to {out}")
    return report
