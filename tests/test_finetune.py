"""LoRA recovery fine-tuning on the tiny Llama (real SmolLM2 tokenizer and template).

.venv/bin/python -m pytest -q tests/test_finetune.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from service.cli import main
from service.datasets import parse_rows
from service.errors import CancelledError, SpecError
from service.finetune import checkpoint_path, run_finetune
from service.progress import Reporter
from service.specs import LLAMA_PROJECTIONS, FinetuneSpec
from service.train_data import IGNORE, collate, plan_epoch, tokenise_row, tokenise_rows

END = "<|im_end|>"  # SmolLM2's end-of-turn token


class StopAt(Reporter):
    """Raises ``exc`` at the step boundary after ``k`` completed steps; records losses."""

    def __init__(self, k: int | None = None, exc: type[BaseException] = CancelledError):
        self.k, self.exc, self.steps = k, exc, []

    def progress(self, **fields):
        self.steps.append(fields)

    def check(self):
        if self.k is not None and len(self.steps) >= self.k:
            raise self.exc("stop")


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def train_log(out: Path) -> dict:
    return json.loads((out / "train_log.json").read_text())


def test_distilled_row_trains_on_kept_response():
    def distilled(row: dict) -> dict:
        return {
            **row,
            "response": "kept",
            "original_response": "orig",
            "distilled": True,
            "reason": "ok",
        }

    data = [
        distilled({"instruction": "Do X", "input": "ctx", "output": "orig"}),
        distilled({"question": "1+1?", "answer": "orig"}),
        distilled({"prompt": "p"}),
        distilled(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "orig"},
                ]
            }
        ),
    ]
    rows = parse_rows("\n".join(json.dumps(r) for r in data).encode())
    assert [r.response for r in rows] == ["kept"] * 4
    assert rows[0].prompt == "Do X\n\nctx" and rows[1].kind == "math"
    assert rows[2].prompt == "p" and rows[3].prompt == "hi"
    assert rows[0].source == data[0]


def test_labels_mask_exactly_the_prompt(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    (row,) = parse_rows(
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi there"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Capital of Italy?"},
                    {"role": "assistant", "content": "Rome, of course."},
                ]
            }
        ).encode()
    )
    ex = tokenise_row(tok, row, max_length=512)
    prompt = tok.decode(ex.ids[: ex.prompt_len])
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nCapital of Italy?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    labels = ex.labels
    assert all(t == IGNORE for t in labels[: ex.prompt_len])
    assert all(t != IGNORE for t in labels[ex.prompt_len :])
    # The loss covers the response and its end-of-turn token, nothing else.
    assert tok.decode(labels[ex.prompt_len :]) == f"Rome, of course.{END}\n"
    assert tok.convert_tokens_to_ids(END) in labels[ex.prompt_len :]

    # Truncation keeps the head of the response; a response cut away entirely is skipped.
    cut = tokenise_row(tok, row, max_length=ex.prompt_len + 2)
    assert len(cut.ids) == ex.prompt_len + 2 and cut.ids == ex.ids[: ex.prompt_len + 2]
    exs, skipped = tokenise_rows(tok, [row, row], max_length=ex.prompt_len)
    assert exs == [] and skipped == [1, 2]

    # Padding carries no loss and no attention.
    short = tokenise_row(tok, parse_rows(b'{"prompt": "a", "response": "b"}')[0], 512)
    batch = collate([ex, short], pad_id=tok.pad_token_id)
    n = len(short.ids)
    assert batch["attention_mask"][1, n:].sum() == 0
    assert (batch["labels"][1, n:] == IGNORE).all()
    assert batch["labels"][0].tolist() == labels


def test_plan_groups_lengths_and_uses_every_row_once():
    lengths = [5, 100, 7, 98, 6, 99, 8, 97, 50]
    plan = plan_epoch(lengths, batch_size=2, seed=0, epoch=0)
    assert sorted(i for b in plan for i in b) == list(range(9))
    assert plan == plan_epoch(lengths, batch_size=2, seed=0, epoch=0)
    assert plan != plan_epoch(lengths, batch_size=2, seed=0, epoch=1)
    # Within a pool, batches are cut from the length-sorted rows.
    assert all(abs(lengths[b[0]] - lengths[b[-1]]) <= 50 for b in plan)


def test_loss_falls_and_output_is_a_plain_merged_model(tiny_llama, alpaca_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "recovered"
    spec = FinetuneSpec(
        model=str(tiny_llama),
        dataset=str(alpaca_file),
        lr=3e-2,
        warmup_ratio=0.0,
        epochs=8,
        batch_size=4,
        micro_batch_size=4,
        lora_dropout=0.0,
    )
    rep = StopAt()
    result = run_finetune(spec, out, rep)
    log = train_log(out)
    losses = [s["loss"] for s in log["steps"]]
    assert len(losses) == result["steps"] == 16
    assert [s["loss"] for s in rep.steps] == losses
    # Each epoch is two steps over all 8 rows. The tiny model's logits are bounded by its
    # frozen tied embedding (std 0.02), so the fall is small but well above the noise.
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses
    assert log["final_loss"] == losses[-1] and result["tokens_per_s"] > 0
    assert log["rows"] == 8 and log["skipped_rows"] == 0
    assert log["spec"]["lr"] == 3e-2
    assert not checkpoint_path(out).exists()

    # A plain model: no peft files or adapter keys; only the targeted weights moved.
    assert not (out / "adapter_config.json").exists()
    before, after = weights(tiny_llama), weights(out)
    assert before.keys() == after.keys()
    assert not any("lora" in k or "base_layer" in k for k in after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # The default adapter (all-linear): every projection of every block, and the metrics
    # say so.
    paths = [f"{'self_attn' if m[0] in 'qkvo' else 'mlp'}.{m}" for m in LLAMA_PROJECTIONS]
    assert changed == {f"model.layers.{i}.{p}.weight" for i in range(6) for p in paths}
    assert result["adapted_modules"] == {
        "modules": sorted(paths), "parameters": [], "not_adapted": [],
    }  # fmt: skip
    assert log["adapted_modules"] == result["adapted_modules"]
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(ids).logits).all()


def _spec(tiny_llama, data, **kw) -> FinetuneSpec:
    base = dict(
        model=str(tiny_llama),
        dataset=str(data),
        lr=1e-3,
        epochs=1.5,  # 6 steps of 2 rows: crosses an epoch boundary
        batch_size=2,
        micro_batch_size=1,
        checkpoint_every=2,
        seed=3,
    )
    return FinetuneSpec(**(base | kw))


def test_resume_gives_the_same_weights_and_losses(tiny_llama, alpaca_file, tmp_path):
    ref = tmp_path / "ref"
    run_finetune(_spec(tiny_llama, alpaca_file), ref)
    ref_log, ref_w = train_log(ref)["steps"], weights(ref)
    assert len(ref_log) == 6

    # Cancelled after step 3: the checkpoint is written at the step boundary.
    out = tmp_path / "cancelled"
    with pytest.raises(CancelledError):
        run_finetune(_spec(tiny_llama, alpaca_file), out, StopAt(3))
    assert checkpoint_path(out).exists() and not out.exists()
    with pytest.raises(SpecError, match="--resume"):
        run_finetune(_spec(tiny_llama, alpaca_file), out)
    result = run_finetune(_spec(tiny_llama, alpaca_file), out, resume=True)
    assert result["resumed_from"] == 3

    # Crashed after step 3: resumes from the periodic checkpoint of step 2.
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError):
        run_finetune(_spec(tiny_llama, alpaca_file), crashed, StopAt(3, RuntimeError))
    with pytest.raises(SpecError, match="lr"):
        run_finetune(_spec(tiny_llama, alpaca_file, lr=2e-3), crashed, resume=True)
    result = run_finetune(_spec(tiny_llama, alpaca_file), crashed, resume=True)
    assert result["resumed_from"] == 2

    for run in (out, crashed):
        assert train_log(run)["steps"] == ref_log
        got = weights(run)
        assert got.keys() == ref_w.keys()
        for k in ref_w:
            torch.testing.assert_close(got[k], ref_w[k], rtol=0, atol=1e-6)
        assert not checkpoint_path(run).exists()


def test_micro_batching_only_splits_the_work(tiny_llama, alpaca_file, tmp_path):
    # The step loss is the token mean over the whole step however it is split (without
    # dropout, whose masks depend on the micro-batch shapes).
    logs = []
    for size in (1, 2):
        out = tmp_path / f"micro{size}"
        run_finetune(_spec(tiny_llama, alpaca_file, micro_batch_size=size, lora_dropout=0.0), out)
        logs.append(train_log(out)["steps"])
    for a, b in zip(*logs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["tokens"] == b["tokens"]


def test_cli_end_to_end_with_resume_and_skipped_rows(tiny_llama, alpaca_file, tmp_path, capsys):
    rows = [json.loads(line) for line in alpaca_file.read_text().splitlines()]
    rows.append({"instruction": "word " * 200, "input": "", "output": "too late"})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["finetune", "--model", str(tiny_llama), "--dataset", str(data), "--max-length", "96"]
    args += ["--batch-size", "4", "--micro-batch-size", "2", "--epochs", "2"]
    args += ["--target-modules", "q_proj,v_proj,o_proj", "--lora-rank", "4"]

    out = tmp_path / "cli"
    assert main([*args, "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 4 and result["rows"] == 9
    assert result["skipped_rows"] == 1 and result["skipped_row_numbers"] == [9]
    assert train_log(out)["spec"]["target_modules"] == ["q_proj", "v_proj", "o_proj"]

    # Interrupted run, then the CLI: without --resume it refuses, with it it finishes.
    out2 = tmp_path / "cli2"
    spec = FinetuneSpec(
        model=str(tiny_llama),
        dataset=str(data),
        max_length=96,
        batch_size=4,
        micro_batch_size=2,
        epochs=2,
        target_modules=["q_proj", "v_proj", "o_proj"],
        lora_rank=4,
    )
    with pytest.raises(CancelledError):
        run_finetune(spec, out2, StopAt(1))
    capsys.readouterr()
    assert main([*args, "--out", str(out2)]) == 1
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--out", str(out2), "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from"] == 1
    assert train_log(out2)["steps"] == train_log(out)["steps"]
    assert not checkpoint_path(out2).exists()


@pytest.mark.slow
def test_builtin_model_one_step(session_home, alpaca_file, tmp_path):
    from transformers import AutoModelForCausalLM

    spec = FinetuneSpec(
        model="builtin:smollm2-135m-instruct", dataset=str(alpaca_file), max_length=128
    )
    out = tmp_path / "ft"
    result = run_finetune(spec, out)
    assert result["steps"] == 1 and result["rows"] == 8
    assert 0 < result["final_loss"] < 10
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 30
    assert not any("lora" in k for k in model.state_dict())


def batch_loss(model_dir: Path, data: Path) -> float:
    """Token-mean cross-entropy of ``model_dir`` on the response tokens of every row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = parse_rows(data.read_bytes(), name=data.name)
    examples, _ = tokenise_rows(tok, rows, 512)
    batch = collate(examples, tok.pad_token_id if tok.pad_token_id is not None else 0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    return float(torch.nn.functional.cross_entropy(logits[:, :-1][keep], labels[keep]))


def test_one_step_trains_from_its_first_step(tiny_llama, alpaca_file, tmp_path):
    """Default warm-up: ceil(0.03 * 1) = 1 step, and HF's cosine-with-warm-up schedule
    gave that first (here: only) step learning rate 0, so a one-step run trained
    nothing. Now no step runs at 0: the weights move and the batch's loss falls."""
    out = tmp_path / "one-step"
    spec = FinetuneSpec(
        model=str(tiny_llama), dataset=str(alpaca_file), batch_size=8, epochs=1, lr=1e-2,
        lora_dropout=0.0,
    )  # fmt: skip
    assert spec.warmup_ratio > 0  # the default warms up
    result = run_finetune(spec, out)
    log = train_log(out)
    assert result["steps"] == 1 and log["rows"] == 8
    assert log["steps"][0]["lr"] > 0
    before, after = weights(tiny_llama), weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert batch_loss(out, alpaca_file) < batch_loss(tiny_llama, alpaca_file) - 1e-3


def test_no_step_runs_at_learning_rate_zero():
    from service.finetune import lr_factor

    for total in (1, 2, 3, 10, 33, 100, 1000):
        warmup = -(-3 * total // 100)  # ceil(0.03 * total)
        factors = [lr_factor(s, warmup, total) for s in range(total)]
        assert all(0 < f <= 1 for f in factors), (total, factors)
        assert max(factors) == 1 or total <= warmup  # reaches the peak after warm-up
    # Warm-up rises, then the cosine falls.
    f = [lr_factor(s, 3, 100) for s in range(100)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[50] > f[90] > f[99] > 0
