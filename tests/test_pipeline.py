"""The whole pipeline on a tiny model: prune ∥ distill → finetune → evaluate, resume."""

from __future__ import annotations

import json

import pytest

from service.errors import SpecError
from service.evaluate import retention
from service.pipeline import format_table, run_pipeline
from service.specs import PipelineSpec
from service.synthetic import write_synthetic


@pytest.fixture
def synthetic(tmp_path):
    data = tmp_path / "data"
    rows = write_synthetic(data, rows=12, mc_docs=20)
    return data, rows


def test_pipeline_end_to_end_and_resume(tmp_path, tiny_llama, synthetic, session_home):
    data, rows = synthetic
    spec = PipelineSpec(
        model=str(tiny_llama),
        dataset=str(rows),
        blocks=2,
        samples=8,
        limit=8,
        max_new_tokens=8,
        epochs=1,
        tasks=["arith"],
        eval_limit=10,
        agreement_prompts=2,
        agreement_max_new_tokens=4,
    )
    out = tmp_path / "run"
    summary = run_pipeline(spec, out, data_dir=data)
    assert summary["layers"] == [6, 4] and len(summary["removed_layers"]) == 2
    assert set(summary["eval"]) == {"baseline", "pruned", "recovered"}
    assert summary["eval"]["baseline"]["retention"] == pytest.approx(1.0)
    for e in summary["eval"].values():
        assert 0.0 <= e["tasks"]["arith"] <= 1.0
    distilled = [json.loads(line) for line in (out / "distilled.jsonl").read_text().splitlines()]
    assert len(distilled) == 8 and all("distilled" in r for r in distilled)
    assert (out / "recovered" / "config.json").is_file()
    for name in ("pruned", "recovered"):
        agree = summary["eval"][name]["agreement"]
        assert agree["kl"] >= 0.0 and 0.0 <= agree["acceptance_rate"] <= 1.0
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    table = format_table(summary)
    assert "| recovered |" in table and "arith" in table

    # Rerunning resumes: every step's output is reused, nothing is recomputed.
    stamp = (out / "eval_recovered.json").stat().st_mtime_ns
    again = run_pipeline(spec, out, data_dir=data)
    assert again["eval"] == summary["eval"]
    assert (out / "eval_recovered.json").stat().st_mtime_ns == stamp

    with pytest.raises(SpecError):
        run_pipeline(spec.model_copy(update={"blocks": 3}), out, data_dir=data)


def test_retention_arithmetic():
    model = {"tasks": {"a": {"acc": 0.3}, "b": {"acc": 0.5}}}
    base = {"tasks": {"a": {"acc": 0.6}, "b": {"acc": 0.5}}}
    r = retention(model["tasks"], base["tasks"])
    assert r["tasks"] == {"a": pytest.approx(0.5), "b": pytest.approx(1.0)}
    assert r["mean"] == pytest.approx(0.75)


def step_specs(spec: PipelineSpec, out) -> dict:
    from service.steps import pipeline_steps, run_folder_ref

    return {s.name: s.spec for s in pipeline_steps(spec, run_folder_ref(out))}


def test_the_step_graph_runs_each_step_after_what_it_needs_and_names_products_by_ref():
    """One graph for running, queueing and reporting: the same names, the products of
    earlier steps named by whatever ``ref`` gives (a path, a job id)."""
    from service.steps import NAMES, pipeline_steps

    steps = pipeline_steps(PipelineSpec(model="m", dataset="d"), ref=lambda n: f"<{n}>")
    assert tuple(s.name for s in steps) == NAMES
    seen: set[str] = set()
    for step in steps:
        assert set(step.needs) <= seen, f"{step.name} runs before what it needs"
        seen.add(step.name)
    by = {s.name: s for s in steps}
    assert (by["finetune"].spec.model, by["finetune"].spec.dataset) == ("<prune>", "<distill>")
    assert by["evaluate recovered"].spec.model == "<finetune>"
    assert by["evaluate baseline"].spec.model == "m" and by["evaluate baseline"].needs == ()
    assert by["report"].spec is None and len(by["report"].needs) == 3


def test_kd_weight_makes_the_unpruned_model_the_fine_tune_teacher(tmp_path):
    plain = step_specs(PipelineSpec(model="m", dataset="d"), tmp_path)["finetune"]
    assert plain.teacher is None
    kd = step_specs(PipelineSpec(model="m", dataset="d", kd_weight=0.5), tmp_path)["finetune"]
    assert kd.teacher == "m" and kd.kd_weight == 0.5


def test_the_pipeline_adapts_every_linear_layer_at_rank_16(tmp_path):
    """The measured default (docs/results.md): rank 16 (FinetuneSpec keeps SDFT's 8) on
    every linear layer of the blocks (peft's all-linear, found on the model)."""
    from service.specs import FinetuneSpec

    ft = step_specs(PipelineSpec(model="m", dataset="d"), tmp_path)["finetune"]
    assert (ft.lora_rank, ft.lora_alpha) == (16, 32)
    assert ft.target_modules == ["all-linear"]
    assert FinetuneSpec(model="m", dataset="d").target_modules == ["all-linear"]
    mine = PipelineSpec(model="m", dataset="d", lora_rank=8, lora_targets=["q_proj", "v_proj"])
    assert step_specs(mine, tmp_path)["finetune"].target_modules == ["q_proj", "v_proj"]
    for bad in ([], ["../x"], ["q"] * 1000, ["all-linear", "q_proj"], ["q_proj."]):
        with pytest.raises(ValueError):
            PipelineSpec(model="m", dataset="d", lora_targets=bad)
