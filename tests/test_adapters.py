"""Adapter targets that exist on the model: the names come from the model's structure,
built from its config on the meta device (no weights); a given list must match every
name, at submission (422 naming the model's modules) and in the job; a model the
pipeline cannot work on is refused at submission with the reason.

    .venv/bin/python -m pytest -q tests/test_adapters.py
"""

from __future__ import annotations

import json

import pytest

from service.adapters import check_targets, model_shape
from service.errors import SpecError
from service.merge import tensor_names
from tests.conftest import ALPACA_ROWS
from tests.tiny_models import build_tiny

pytest_plugins = ["tests.redis_fixture"]

LLAMA = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    """Tiny models of the families whose module names differ from Llama's."""
    root = tmp_path_factory.mktemp("families")
    return {f: build_tiny(f, root / f, tokenizer_dir) for f in ("phi3", "gpt_neox", "mixtral")}


def test_module_names_come_from_the_model_not_the_checkpoint(tiny, session_home):
    assert model_shape("builtin:smollm2-135m-instruct").leaves() == LLAMA  # cold: no convert
    assert model_shape(str(tiny["phi3"])).leaves() == [
        "down_proj", "gate_up_proj", "o_proj", "qkv_proj",
    ]  # fmt: skip
    assert model_shape(str(tiny["gpt_neox"])).leaves() == [
        "dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value",
    ]  # fmt: skip
    # Mixtral's checkpoint holds experts.N.w1/w2/w3 (transformers 5 writes the hub layout);
    # the model holds them as two parameters, which is what peft adapts.
    mixtral = model_shape(str(tiny["mixtral"]))
    assert any(".experts.0.w1." in n for n in tensor_names(tiny["mixtral"]))
    assert mixtral.leaves() == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"} <= set(mixtral.parameters)
    assert model_shape("job_" + "0" * 20) is None  # an earlier step's product


def test_every_name_of_a_list_must_match(tiny):
    phi3 = model_shape(str(tiny["phi3"]))
    check_targets(["all-linear"], phi3, "phi3")
    check_targets(["qkv_proj", "mlp.down_proj"], phi3, "phi3")
    # SDFT's q_proj,v_proj matches nothing; o_proj,q_proj matches half: both refused (peft
    # would refuse the first only, and silently adapt o_proj alone for the second).
    for targets, missing in ((["q_proj", "v_proj"], ["q_proj", "v_proj"]),
                             (["o_proj", "q_proj"], ["q_proj"])):  # fmt: skip
        with pytest.raises(SpecError) as exc:
            check_targets(targets, phi3, "phi3")
        assert exc.value.details["missing"] == missing
        assert "qkv_proj" in exc.value.message and "gate_up_proj" in exc.value.message


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"model_type": "bert", "num_hidden_layers": 2}, "not a decoder-only"),
        ({"model_type": "t5", "num_layers": 2}, "not a decoder-only"),
        ({"model_type": "no-such-arch", "num_hidden_layers": 2}, "not an architecture"),
        ({"num_hidden_layers": 2}, "not an architecture"),
    ],
)
def test_a_model_the_pipeline_cannot_work_on_is_refused_with_the_reason(tmp_path, config, reason):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecError, match=reason):
        model_shape(str(tmp_path))


def test_the_finetune_job_refuses_a_list_the_model_lacks(tiny, alpaca_file, tmp_path):
    from service.finetune import run_finetune
    from service.specs import FinetuneSpec

    spec = FinetuneSpec(
        model=str(tiny["gpt_neox"]), dataset=str(alpaca_file), target_modules=["q_proj", "dense"]
    )
    with pytest.raises(SpecError, match="query_key_value"):
        run_finetune(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_submission_answers_422_with_the_models_module_names(
    api, tiny, session_home, tenant_key, tmp_path
):
    from service.models import import_model
    from service.store import ArtifactStore
    from tests.test_trust import error, upload

    store = ArtifactStore(session_home)
    phi3 = import_model(store, tenant_key[0], tiny["phi3"])["id"]
    ds = upload(api, ALPACA_ROWS[:2])
    for body in (
        {"type": "finetune", "model": phi3, "dataset": ds, "target_modules": ["q_proj", "v_proj"]},
        {
            "type": "pipeline",
            "model": phi3,
            "dataset": ds,
            "blocks": 2,
            "lora_targets": ["o_proj", "q_proj"],
        },  # fmt: skip
    ):
        err = error(api.post("/v1/jobs", json=body), 422)
        field = "target_modules" if body["type"] == "finetune" else "lora_targets"
        assert err["details"]["field"] == field, err
        assert "qkv_proj" in err["details"]["modules"] and "q_proj" in err["details"]["missing"]
    # A builtin on a cold home: its architecture's names, without converting it.
    body = {"type": "pipeline", "dataset": ds, "blocks": 2, "lora_targets": ["qkv_proj"]}
    err = error(api.post("/v1/jobs", json=body), 422)
    assert err["details"]["modules"] == LLAMA
    # An encoder is refused at submission, not in a worker.
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 4}))
    (bert / "model.safetensors").write_bytes(b"")
    enc = import_model(store, tenant_key[0], bert)["id"]
    body = {"type": "prune", "model": enc, "calibration": ds, "blocks": 1}
    assert "not a decoder-only" in error(api.post("/v1/jobs", json=body), 422)["message"]
    assert api.get("/v1/jobs").json()["data"] == []  # nothing was queued
    # The defaults and a matching list are accepted.
    ok = {"type": "finetune", "model": phi3, "dataset": ds, "target_modules": ["qkv_proj"]}
    assert api.post("/v1/jobs", json=ok).status_code == 202


def test_an_expert_parameter_named_in_a_list_is_adapted(tiny, alpaca_file, tmp_path):
    """Mixtral's experts are parameters: a list naming one goes to peft's
    target_parameters (and LoRA dropout, which peft has none of there, to 0)."""
    from service.finetune import run_finetune
    from service.specs import FinetuneSpec

    spec = FinetuneSpec(
        model=str(tiny["mixtral"]), dataset=str(alpaca_file), max_length=48, batch_size=8,
        target_modules=["q_proj", "experts.gate_up_proj"],
    )  # fmt: skip
    result = run_finetune(spec, tmp_path / "out")
    adapted = result["adapted_modules"]
    assert adapted["modules"] == ["self_attn.q_proj"]
    assert adapted["parameters"] == ["mlp.experts.gate_up_proj"]
    assert "mlp.experts.down_proj" in adapted["not_adapted"]
    assert result["lora_dropout"] == 0.0
