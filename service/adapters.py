"""LoRA targets that exist on the model at hand, checked before anything is queued.

    shape = model_shape("builtin:smollm2-135m-instruct")   # no weights read
    shape.linear      # ['mlp.down_proj', 'mlp.gate_proj', ..., 'self_attn.v_proj']
    check_targets(["q_proj", "v_proj"], shape, "phi3/")    # SpecError naming qkv_proj, ...

The default target is ``all-linear`` (peft: every ``nn.Linear`` of the model but the
output head), which on a Llama is the seven attention and MLP projections the pipeline
adapted before (measured better than SDFT's ``q_proj,v_proj``, docs/results.md), and on a
Phi-3 its fused ``qkv_proj`` and ``gate_up_proj``, on a GPT-NeoX its ``query_key_value``
and ``dense*`` layers. A given list must match: peft raises only when *no* name matches,
so SDFT's ``q_proj,v_proj`` on a Phi-3 with ``o_proj`` in the list would silently adapt
one kind of projection of four.

The names come from the model's structure, built on torch's meta device from its config
alone (no weights read, no memory taken), so they are the names peft sees: a checkpoint's
tensor names are not (transformers 5 saves Mixtral's experts as ``experts.0.w1`` but
holds them as one ``experts.gate_up_proj`` parameter). Mixture-of-experts experts are
such parameters, not ``nn.Linear``; peft's ``all-linear`` reaches them through its
transformers-5 conversion (``peft/utils/transformers_weight_conversion.py``) for Mixtral
and Qwen-MoE, and whatever a run leaves out is listed in its metrics
(``adapted_modules``): e.g. the dense MLP layers of a Qwen3-MoE whose ``mlp_only_layers``
are set, which that conversion maps onto the experts' names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from service.errors import ModelError, SpecError

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class ModelShape:
    """What an adapter can reach in one decoder block, as paths inside the block
    (``self_attn.q_proj``), the same in every block of the model (union over blocks)."""

    model_type: str
    architecture: str
    linear: tuple[str, ...]  # nn.Linear modules
    parameters: tuple[str, ...]  # >= 2-D parameters of other modules (experts, routers)

    def leaves(self) -> list[str]:
        """The names a target list may use: each module's last name (``q_proj``)."""
        return sorted({p.rsplit(".", 1)[-1] for p in self.linear})


def block_members(model) -> tuple[list[str], list[str]]:
    """(linear module paths, other >= 2-D parameter paths) inside the decoder blocks of
    ``model``, relative to a block, sorted."""
    import torch

    from service.blocks import decoder_layers

    linear, params = set(), set()
    for layer in decoder_layers(model):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                linear.add(name)
                continue
            for pname, p in module.named_parameters(recurse=False):
                if p.dim() >= 2:
                    params.add(f"{name}.{pname}" if name else pname)
    return sorted(linear), sorted(params)


def shape_of_config(cfg: dict[str, Any], ref: str) -> ModelShape:
    """The ``ModelShape`` of a model from its config dict: the model is built on the meta
    device (no weights, no memory). SpecError for a model the pipeline cannot work on."""
    return _shape_of_config(json.dumps(cfg, sort_keys=True), ref)


@lru_cache(maxsize=64)
def _shape_of_config(cfg_json: str, ref: str) -> ModelShape:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg = json.loads(cfg_json)
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise SpecError(
            f"{ref}: model_type {model_type!r} is not an architecture this transformers "
            "knows (remote code is never run); supported are decoder-only causal LMs such "
            "as llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, olmo2, granite, "
            "mixtral, qwen3_moe and gpt_neox",
            {"model_type": model_type},
        )
    try:
        config = CONFIG_MAPPING[model_type].from_dict(
            {k: v for k, v in cfg.items() if k != "model_type"}
        )
    except Exception as exc:
        raise SpecError(f"{ref}: its config does not read as {model_type}: {exc}") from exc
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    # An encoder (BERT, RoBERTa: masked LMs that transformers can also run as causal LMs)
    # or an encoder-decoder (T5) is not a model whose blocks this method prunes.
    if (
        getattr(config, "is_encoder_decoder", False)
        or model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    ):
        raise SpecError(
            f"{ref}: {model_type} is not a decoder-only model: layer pruning and self-data "
            "distillation work on decoder-only causal LMs",
            {"model_type": model_type},
        )
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # no causal-LM class for this config
        raise SpecError(
            f"{ref}: {model_type} has no causal language model in this transformers "
            f"({type(exc).__name__}: {str(exc)[:200]})",
            {"model_type": model_type},
        ) from exc
    try:
        linear, params = block_members(model)
    except ModelError as exc:
        raise SpecError(f"{ref}: {exc.message}", {"model_type": model_type}) from exc
    if not linear and not params:
        raise SpecError(f"{ref}: no linear layer found in the decoder blocks of {model_type}")
    return ModelShape(model_type, type(model).__name__, tuple(linear), tuple(params))


def shape_of_model(model) -> ModelShape:
    """The ``ModelShape`` of a loaded model."""
    linear, params = block_members(model)
    return ModelShape(model.config.model_type, type(model).__name__, tuple(linear), tuple(params))


def check_targets(targets: list[str], shape: ModelShape, ref: str) -> None:
    """Every name of a target list must name a module of the model (peft's rule: a module
    path equal to it or ending in ``.<name>``); ``all-linear`` always does."""
    if list(targets) == [ALL_LINEAR]:
        return
    paths = [*shape.linear, *shape.parameters]
    missing = [t for t in targets if not any(p == t or p.endswith("." + t) for p in paths)]
    if missing:
        experts = f"; expert parameters (adapted by {ALL_LINEAR}): " if shape.parameters else ""
        raise SpecError(
            f"target modules {missing} are not in {ref} ({shape.architecture}); its linear "
            f"layers are {shape.leaves()}{experts}{', '.join(shape.parameters)}. "
            f"Use {ALL_LINEAR} (the default) or names from that list",
            {"missing": missing, "modules": shape.leaves(), "parameters": list(shape.parameters)},
        )


def lora_targets(targets: list[str], shape: ModelShape) -> tuple[str | list[str], list[str]]:
    """(``target_modules``, ``target_parameters``) for peft's ``LoraConfig``: a name that
    matches a parameter (``experts.gate_up_proj`` of a Mixtral) and no linear module goes
    to ``target_parameters`` as its paths inside a block."""
    if list(targets) == [ALL_LINEAR]:
        return ALL_LINEAR, []

    def hits(name: str, paths) -> list[str]:
        return [p for p in paths if p == name or p.endswith("." + name)]

    modules = [t for t in targets if hits(t, shape.linear)]
    params = sorted({p for t in targets if t not in modules for p in hits(t, shape.parameters)})
    return modules, params


def adapted_modules(peft_model, shape: ModelShape) -> dict[str, list[str]]:
    """What a peft model adapts, per decoder block (paths inside a block, union over
    blocks), and what of the blocks' linear layers and weight parameters (``shape``, read
    before the adapters went on) it leaves out."""
    import re

    linear, params = shape.linear, shape.parameters

    def in_block(name: str) -> str | None:
        m = re.search(r"\.(?:layers|layer|h|blocks)\.\d+\.(.+)$", name)
        return m.group(1) if m else None

    modules = sorted({p for n in peft_model.targeted_module_names if (p := in_block(n))})
    parameters = sorted(
        {p for n in (getattr(peft_model, "targeted_parameter_names", None) or [])
         if (p := in_block(n))}
    )  # fmt: skip
    left = [p for p in linear if p not in modules]
    left += [p for p in params if p not in parameters and p.rsplit(".", 1)[0] not in modules]
    return {
        "modules": modules,
        "parameters": parameters,
        "not_adapted": sorted(set(left)),
    }


# -- a model reference's shape, read from its config only --------------------------------


def model_shape(ref: str, home: Path | None = None) -> ModelShape | None:
    """The ``ModelShape`` of a model reference from its config alone (a builtin: its
    architecture, ``service.models.builtin_config``; a store model, a directory, a hub
    id: its ``config.json``). None for a ``job_...`` reference (an earlier step's product,
    checked when it runs); ModelError where the config cannot be read."""
    from service.models import builtin_config, builtin_name, config_source, read_config

    if ref.startswith("job_"):
        return None
    if name := builtin_name(ref):
        return shape_of_config(builtin_config(name, home), ref)
    cfg = read_config(*config_source(ref, home))
    if not isinstance(cfg, dict):
        raise ModelError(f"the config.json of {ref!r} is not an object")
    return shape_of_config(cfg, ref)
