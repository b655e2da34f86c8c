"""Layer pruning: score decoder blocks on calibration rows, drop the most redundant ones,
save a plain Hugging Face model.

    DISTILLERY_HOME=/tmp/dhome distillery prune --model builtin:smollm2-135m-instruct \\
        --calibration ../shared/data/alpaca/alpaca_5000.json --blocks 6 --out /tmp/pruned6

The output directory holds the pruned model and tokenizer (``AutoModelForCausalLM.
from_pretrained(out)`` loads it) and ``prune_report.json``: the metric, depth before and
after, the removed blocks as 0-based indices of the *original* model, and the scores
(``distances[str(n)][l]``: angular distance from the input of block ``l`` to the output of
block ``l+n-1``; for ``bi``, ``distances["1"]`` is the Block Influence per block). Scoring
and cutting live in ``service/blocks.py``.
"""

from __future__ import annotations

import json
import random
import shutil
import time
import uuid
from pathlib import Path

import torch

from service.blocks import BlockScores, choose_blocks, drop_blocks, score_blocks
from service.datasets import Row, load_rows
from service.errors import SpecError
from service.models import load_model, resolve_model
from service.progress import Reporter
from service.specs import PruneSpec
from service.train_data import conversation

REPORT_NAME = "prune_report.json"


def pick_rows(rows: list[Row], samples: int, seed: int) -> list[Row]:
    """``samples`` rows chosen with ``seed`` (in file order), or all of them if fewer."""
    if len(rows) <= samples:
        return list(rows)
    idx = sorted(random.Random(seed).sample(range(len(rows)), samples))
    return [rows[i] for i in idx]


def render_row(row: Row, tokenizer) -> str:
    """A row as the model sees it in chat: user prompt and assistant response."""
    # The messages are the fine-tuning ones; the text differs only for a model without a
    # chat template (plain turns here, Alpaca-style prompt + EOS in train_data.render).
    messages = [*conversation(row), {"role": "assistant", "content": row.response}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n\n".join(m["content"] for m in messages)


def calibration_batches(
    rows: list[Row], tokenizer, max_length: int, batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """Tokenised, right-padded batches (the last one may be partial; none is dropped).

    Rows are sorted by length so a batch pads little; padding never counts in the scores
    (the attention mask excludes it and right padding keeps real positions unchanged).
    """
    # The chat template already holds the special tokens.
    seqs = [
        tokenizer(render_row(r, tokenizer), add_special_tokens=False)["input_ids"][:max_length]
        for r in rows
    ]
    seqs = sorted((s for s in seqs if s), key=len, reverse=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


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


def calibration_rows(spec: PruneSpec) -> list[Row]:
    return pick_rows(load_rows(spec.calibration), spec.samples, spec.seed)


def score_calibration(
    spec: PruneSpec, model, tokenizer, reporter: Reporter | None = None, rows=None
) -> BlockScores:
    """Run the calibration rows of ``spec`` (``rows``, when already read) through ``model``
    and collect per-block scores (every metric and block count is chosen from these, so
    one pass serves many prunes)."""
    reporter = reporter or Reporter()
    rows = rows if rows is not None else calibration_rows(spec)
    depth = model.config.get_text_config().num_hidden_layers
    batches = calibration_batches(rows, tokenizer, spec.max_length, spec.batch_size)
    total = sum(len(b["input_ids"]) for b in batches)
    reporter.event(f"scoring {depth} blocks of {spec.model} on {total} rows", rows=total)
    done = 0

    def on_batch(n: int) -> None:
        nonlocal done
        done += n
        reporter.progress(rows_done=done, rows_total=total)
        reporter.check()

    reporter.check()
    return score_blocks(model, batches, on_batch=on_batch)


def run_prune(
    spec: PruneSpec,
    out: Path,
    reporter: Reporter | None = None,
    scores: BlockScores | None = None,
) -> dict:
    """Score, choose, drop, save. Returns (and writes) the prune report.

    ``scores``: from an earlier ``score_calibration`` of the same model and calibration
    spec (bench/recovery.py prunes several ways from one pass); None scores here."""
    reporter = reporter or Reporter()
    t0 = time.monotonic()
    depth = _num_layers(spec.model)
    if depth is not None:
        _check_blocks(spec.blocks, depth)
    # Read before the model loads, so a bad calibration set fails fast.
    rows = calibration_rows(spec) if scores is None else None
    model, tokenizer = load_model(spec.model)
    depth = model.config.get_text_config().num_hidden_layers
    _check_blocks(spec.blocks, depth)
    if scores is None:
        scores = score_calibration(spec, model, tokenizer, reporter, rows)
    removed = choose_blocks(scores, spec.blocks, spec.metric)
    bi = scores.block_influence()
    if spec.metric == "angular":
        distances = scores.distances([*range(1, depth // 2 + 1), spec.blocks])
        chosen = distances[str(spec.blocks)][removed[0]]
    else:
        distances = {"1": bi}
        chosen = sum(bi[i] for i in removed) / len(removed)
    drop_blocks(model, removed)
    report = {
        "metric": spec.metric,
        "num_layers_before": depth,
        "num_layers_after": depth - len(removed),
        "removed_layers": removed,
        "removed_score": chosen,
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
