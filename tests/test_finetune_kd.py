"""Logit distillation in the fine-tune recipe (``--teacher``, ``--kd-weight``,
``--kd-temperature``): loss = (1 - w) CE + w T^2 KL(teacher || student) on response tokens."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from service.errors import CancelledError, SpecError
from service.finetune import FinetuneRecipe, run_finetune
from service.progress import Reporter
from service.specs import FinetuneSpec
from tests.conftest import build_tiny_llama
from tests.test_finetune import StopAt, train_log, weights
from tests.test_finetune import _spec as finetune_spec


def _spec(student, teacher, data, **kw) -> FinetuneSpec:
    """test_finetune's resume-test spec, with ``teacher`` for logit distillation."""
    return finetune_spec(student, data, teacher=str(teacher), **kw)


def test_a_student_equal_to_its_teacher_has_zero_kl(tiny_llama, alpaca_file, tmp_path):
    # LoRA starts with B = 0: at step 1 the student computes the teacher's function, so
    # the KL term is zero up to rounding, and with w = 1 so is the whole loss.
    out = tmp_path / "same"
    run_finetune(_spec(tiny_llama, tiny_llama, alpaca_file, epochs=0.5), out)
    first = train_log(out)["steps"][0]
    assert abs(first["kl"]) < 1e-6, first
    assert first["loss"] == pytest.approx(first["kl"], abs=1e-9)
    assert first["ce"] > 5.0  # a random 49k-token model: CE near ln(49152) = 10.8


def test_the_loss_is_the_weighted_sum_of_its_parts(tiny_llama, peaked_teacher, alpaca_file):
    # The recipe's terms, recomputed from the models' own forward passes.
    spec = _spec(tiny_llama, peaked_teacher, alpaca_file, kd_weight=0.3, kd_temperature=2.0)
    recipe = FinetuneRecipe(spec, alpaca_file.parent / "unused", Reporter())
    recipe.setup(resume=False)
    from service.train_data import collate

    examples = recipe.examples[:2]
    n_targets = sum(len(ex.ids) - ex.prompt_len for ex in examples)
    batch = collate(examples, recipe.tokenizer.pad_token_id)
    with torch.no_grad():
        loss, parts = recipe.response_loss(batch, n_targets)
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        s = recipe.model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
        t = recipe.teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
        s, t = s[:, :-1][keep].float(), t[:, :-1][keep].float()
    ce = F.cross_entropy(s, labels[keep], reduction="mean")
    p_t = F.softmax(t / 2.0, -1)
    kl = (p_t * (F.log_softmax(t / 2.0, -1) - F.log_softmax(s / 2.0, -1))).sum(-1).mean() * 4.0
    assert parts["ce"] == pytest.approx(ce.item(), rel=1e-4)
    assert parts["kl"] == pytest.approx(kl.item(), rel=1e-4)
    assert parts["kl"] > 0.01
    assert loss.item() == pytest.approx(0.7 * ce.item() + 0.3 * kl.item(), rel=1e-4)


def cut_blocks(src: Path, out: Path, drop: set[int]) -> Path:
    """``src`` without the decoder blocks ``drop``: a pruned student of ``src``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    kept = [b for i, b in enumerate(model.model.layers) if i not in drop]
    model.model.layers = torch.nn.ModuleList(kept)
    model.config.num_hidden_layers = len(kept)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def test_kd_pulls_a_pruned_student_towards_its_teacher(wide_teacher, alpaca_file, tmp_path):
    # The method's own case: the teacher is the unpruned model, the student the same
    # model with two blocks cut. Training on the KL alone lowers it.
    student = cut_blocks(wide_teacher, tmp_path / "pruned", {2, 3})
    out = tmp_path / "kd"
    spec = _spec(
        student,
        wide_teacher,
        alpaca_file,
        lr=1e-2,
        warmup_ratio=0.0,
        epochs=8,
        batch_size=4,
        micro_batch_size=4,
        lora_dropout=0.0,
    )
    run_finetune(spec, out)
    kls = [s["kl"] for s in train_log(out)["steps"]]
    assert len(kls) == 16 and all(math.isfinite(k) for k in kls)
    assert sum(kls[-2:]) / 2 < 0.8 * sum(kls[:2]) / 2, kls


def test_kd_resumes_to_the_same_weights_and_losses(
    tiny_llama, peaked_teacher, alpaca_file, tmp_path
):
    ref = tmp_path / "ref"
    run_finetune(_spec(tiny_llama, peaked_teacher, alpaca_file, kd_weight=0.5), ref)
    ref_log, ref_w = train_log(ref)["steps"], weights(ref)
    assert len(ref_log) == 6 and all("kl" in s and "ce" in s for s in ref_log)

    out = tmp_path / "cancelled"
    with pytest.raises(CancelledError):
        run_finetune(_spec(tiny_llama, peaked_teacher, alpaca_file, kd_weight=0.5), out, StopAt(3))
    # The teacher and its weight are part of the run: another is refused on resume.
    with pytest.raises(SpecError, match="kd_weight"):
        run_finetune(
            _spec(tiny_llama, peaked_teacher, alpaca_file, kd_weight=0.4), out, resume=True
        )
    result = run_finetune(
        _spec(tiny_llama, peaked_teacher, alpaca_file, kd_weight=0.5), out, resume=True
    )
    assert result["resumed_from"] == 3
    got_log = train_log(out)["steps"]
    for a, b in zip(got_log, ref_log, strict=True):
        for k in ("loss", "ce", "kl"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9)
    got = weights(out)
    for k in ref_w:
        torch.testing.assert_close(got[k], ref_w[k], rtol=0, atol=1e-6)


def test_a_teacher_of_another_vocabulary_is_refused(tiny_llama, alpaca_file, tmp_path):
    from transformers import AutoTokenizer

    tok_dir = tmp_path / "tok"
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.add_tokens(["<extra_token_for_the_test>"])
    tok.save_pretrained(tok_dir)
    other = build_tiny_llama(tmp_path / "other", tok_dir, layers=2)
    with pytest.raises(SpecError, match="vocabulary"):
        run_finetune(_spec(tiny_llama, other, alpaca_file), tmp_path / "out")
