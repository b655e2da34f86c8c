"""Every step on every common decoder architecture: one parametrised test over tiny random
models of twelve families (``tests/tiny_models.py``: hidden 64, 6 blocks, head size 32,
the builtin's tokenizer).

    .venv/bin/python -m pytest -q tests/test_architectures.py   # 3-5.5 min on 2 shared cores
    .venv/bin/python -m pytest -q tests/test_architectures.py -k phi3

Per family: prune 2 of 6 blocks with both metrics → each pruned model loads with
``from_pretrained`` and holds exactly the kept blocks, with a config that describes them
(per-layer ``layer_types``, Qwen3-MoE's ``mlp_only_layers``, tied embeddings) → the
angular-pruned model loads in vLLM and generates what ``generate`` does where the margin
is clear (prompts longer than the 16-token sliding window, so a wrong ``layer_types``
shows) → distillation on that vLLM engine → fine-tuning with the default adapter
(``all-linear``) and with logit distillation from the unpruned model (``--teacher``) →
SLERP merge of the two → evaluation. The vLLM engines run one after another in this
process (each closed before the next starts). No family may drop out: a step that fails
fails the test.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import ALPACA_ROWS
from tests.test_vllm import (
    assert_greedy_matches,
    one_thread,  # noqa: F401  (autouse: one thread on a shared machine)
    vllm_settings,
)
from tests.tiny_models import FAMILIES, build_tiny

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None, reason="vllm is not installed (make install)"
    ),
]

# Prompts longer than the tiny models' 16-token sliding window.
PROMPTS = [
    "Write two sentences about the sea, the wind over the water and the boats that sail "
    "out of the harbour every morning before the sun is up.",
    "List three primary colours and say in one line each where you would see them on a "
    "walk through a city park in spring.",
]
# What peft's all-linear leaves out, per family (service/adapters.py): the dense MLP
# layers of a Qwen3-MoE with mlp_only_layers, which peft's transformers-5 MoE conversion
# maps onto the experts' fused parameters. Reported in the metrics, never silently.
NOT_ADAPTED = {"qwen3_moe": ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]}


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("rows") / "alpaca.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ALPACA_ROWS))
    return p


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory) -> Path:
    from service.synthetic import write_synthetic

    folder = tmp_path_factory.mktemp("eval")
    write_synthetic(folder, rows=8, mc_docs=8)
    return folder


def block_weights(model, index: int) -> dict[str, torch.Tensor]:
    from service.blocks import decoder_layers

    return {k: v.detach().clone() for k, v in decoder_layers(model)[index].state_dict().items()}


def check_pruned(original, out: Path, report: dict) -> None:
    """The pruned model at ``out`` loads with plain from_pretrained and is the original
    without the removed blocks: each kept block's weights and module kinds (dense or
    sparse MLP, sliding or full attention), the per-layer config, the tied head."""
    from transformers import AutoModelForCausalLM

    from service.blocks import decoder_layers

    removed = report["removed_layers"]
    keep = [i for i in range(6) if i not in removed]
    assert len(removed) == 2 and report["num_layers_after"] == 4
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    cfg, old = pruned.config.get_text_config(), original.config.get_text_config()
    assert cfg.num_hidden_layers == 4 and len(decoder_layers(pruned)) == 4
    if getattr(old, "layer_types", None):
        assert cfg.layer_types == [old.layer_types[i] for i in keep]
    for new, i in enumerate(keep):
        mine, theirs = decoder_layers(pruned)[new], decoder_layers(original)[i]
        kinds = [type(m).__name__ for m in mine.modules()]
        assert kinds == [type(m).__name__ for m in theirs.modules()], (new, i)
        got, want = block_weights(pruned, new), block_weights(original, i)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), (new, i)
        if hasattr(theirs, "attention_type"):  # Gemma 2/3, Qwen2/3: per-layer attention
            assert mine.attention_type == theirs.attention_type
    if old.tie_word_embeddings:
        assert pruned.get_output_embeddings().weight is pruned.get_input_embeddings().weight
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.isfinite(pruned(ids).logits).all()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_step_on_every_architecture(
    family, tmp_path, tokenizer_dir, rows_file, eval_data, session_home
):
    from transformers import AutoModelForCausalLM

    from service.distill import run_distill
    from service.evaluate import run_evaluate
    from service.finetune import run_finetune
    from service.merge import run_merge
    from service.prune import run_prune
    from service.specs import DistillSpec, EvaluateSpec, FinetuneSpec, MergeSpec, PruneSpec
    from service.teacher.base import GenParams, Request
    from service.teacher.hf_engine import HFEngine
    from service.teacher.vllm_engine import VLLMEngine

    base = build_tiny(family, tmp_path / "base", tokenizer_dir, initializer_range=0.1)
    original = AutoModelForCausalLM.from_pretrained(base).eval()

    # Prune with both metrics; each result loads and is the original minus its blocks.
    pruned = {}
    for metric in ("angular", "bi"):
        spec = PruneSpec(
            model=str(base), calibration=str(rows_file), blocks=2, metric=metric, samples=8,
            max_length=64, candidates=2, check_samples=2,
        )  # fmt: skip
        pruned[metric] = tmp_path / f"pruned-{metric}"
        check_pruned(original, pruned[metric], run_prune(spec, pruned[metric]))
    if family == "qwen3_moe":  # blocks 1 and 4 were dense: the kept ones still are
        report = json.loads((pruned["bi"] / "prune_report.json").read_text())
        keep = [i for i in range(6) if i not in report["removed_layers"]]
        cfg = json.loads((pruned["bi"] / "config.json").read_text())
        assert cfg["mlp_only_layers"] == [n for n, i in enumerate(keep) if i in (1, 4)]

    # The pruned model in vLLM: generates generate's greedy tokens where the margin is
    # clear; then a distillation on the same engine.
    reqs = [Request((("user", p),)) for p in PROMPTS]
    with vllm_settings():
        engine = VLLMEngine(str(pruned["angular"]), dtype="float32")
        try:
            gens = engine.generate(reqs, GenParams(max_new_tokens=8))
            distilled = tmp_path / "distilled.jsonl"
            summary = run_distill(
                DistillSpec(
                    teacher=str(pruned["angular"]),
                    dataset=str(rows_file),
                    engine="vllm",
                    max_new_tokens=16,
                ),  # fmt: skip
                distilled,
                engine=engine,
            )
        finally:
            engine.close()
    assert all(g.tokens > 0 for g in gens)
    hf = HFEngine(str(pruned["angular"]), device="cpu", batch_size=1)
    assert assert_greedy_matches(hf, reqs, gens, 8) >= 2
    assert summary["rows"] == len(ALPACA_ROWS) and summary["generated_tokens"] > 0
    assert len(distilled.read_text().splitlines()) == len(ALPACA_ROWS)

    # Fine-tune with the default adapter, and with logit distillation from the original.
    common = dict(
        model=str(pruned["angular"]), dataset=str(distilled), max_length=96, batch_size=4,
        micro_batch_size=4, lr=1e-3,
    )  # fmt: skip
    plain = run_finetune(FinetuneSpec(**common), tmp_path / "recovered")
    kd = run_finetune(
        FinetuneSpec(**common, teacher=str(base), kd_weight=0.5), tmp_path / "recovered-kd"
    )
    shape_linear = _linear_paths(original)
    adapted = plain["adapted_modules"]
    assert adapted == kd["adapted_modules"]
    assert adapted["not_adapted"] == NOT_ADAPTED.get(family, [])
    assert sorted(adapted["modules"] + adapted["not_adapted"]) == shape_linear
    if family in ("mixtral", "qwen3_moe"):  # the experts are parameters, adapted too
        assert {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"} <= set(adapted["parameters"])
    for result in (plain, kd):
        assert result["steps"] == 2 and all(
            torch.isfinite(torch.tensor(s["loss"])) for s in _log(result)
        )
    assert all("kl" in s for s in _log(kd))
    # The merged adapters moved block weights only, never embeddings or norms.
    moved = _moved(pruned["angular"], tmp_path / "recovered")
    assert moved and not [k for k in moved if "norm" in k or "embed" in k or "lm_head" in k]

    # SLERP-merge the two recovered models, evaluate the merge.
    merged = tmp_path / "merged"
    run_merge(MergeSpec(models=[str(tmp_path / "recovered"), str(tmp_path / "recovered-kd")]),
              merged)  # fmt: skip
    # Every tensor is there: mergekit's layouts miss some of GPT-NeoX's and Qwen3-MoE's,
    # and run_merge then merges tensor by tensor (service/merge.py).
    assert _names(merged) == _names(tmp_path / "recovered")
    assert AutoModelForCausalLM.from_pretrained(merged).config.num_hidden_layers == 4
    ev = run_evaluate(
        EvaluateSpec(model=str(merged), tasks=["arith"], limit=4), tmp_path / "eval.json",
        data_dir=eval_data,
    )  # fmt: skip
    assert ev["tasks"]["arith"]["n"] == 4 and 0.0 <= ev["tasks"]["arith"]["acc"] <= 1.0


def _linear_paths(model) -> list[str]:
    from service.adapters import block_members

    return block_members(model)[0]


def _names(model_dir: Path) -> set[str]:
    from service.merge import tensor_names

    return tensor_names(model_dir)


def _log(result: dict) -> list[dict]:
    return json.loads((Path(result["out"]) / "train_log.json").read_text())["steps"]


def _moved(before_dir: Path, after_dir: Path) -> list[str]:
    from safetensors.torch import load_file

    before = load_file(next(before_dir.glob("*.safetensors")))
    after = load_file(next(after_dir.glob("*.safetensors")))
    assert before.keys() == after.keys()
    return [k for k in before if not torch.equal(before[k], after[k])]
