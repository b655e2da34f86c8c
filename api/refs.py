"""What a caller may name in a spec, checked at submission (a 404 or 422 before a job is
queued rather than a failure in a worker).

Datasets and models are named by reference. Dataset and model ids must exist and belong
to the caller's tenant (another tenant's: not found, never forbidden, so ids do not leak).
Over the API, references are ids of the caller's own datasets, models and jobs, builtin
names and hub ids, never a path on the server; the CLI, on the operator's machine, keeps
local model folders. Where the model's depth is known, ``blocks`` must leave one block.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from service.errors import ModelError, SpecError
from service.models import HUB_PREFIX
from service.store import ArtifactStore, NotFound, is_artifact_id
from workers.outputs import DATASET_FIELDS, MODEL_FIELDS


def check_ref(store: ArtifactStore, tenant: str, field: str, ref: str) -> None:
    """A dataset or model id must exist and belong to ``tenant`` (another tenant's: not found).

    Dataset references through the API must be ids (a path would read the server's disk).
    Model references may still be builtin names and local directories."""
    if field in DATASET_FIELDS:
        if not is_artifact_id(ref) or not ref.startswith("ds_"):
            if ref.startswith("job_"):
                return
            raise SpecError(f"{field}: expected a dataset id (ds_...), got {ref!r}")
        kind = "dataset"
    elif is_artifact_id(ref) and ref.startswith("mdl_"):
        kind = "model"
    else:
        check_model_ref(field, ref)
        return
    try:
        manifest = store.manifest(kind, ref)
    except NotFound:
        manifest = None
    if manifest is None or manifest.get("tenant") != tenant:
        raise NotFound(f"{field}: no {kind} {ref!r}")


def check_model_ref(field: str, ref: str) -> None:
    """Builtin names must exist, and local directories must hold a model; hub ids (when
    the machine is online) are left to the worker."""
    from service.models import BUILTINS

    if ref.startswith("job_"):
        return
    if ref.startswith(HUB_PREFIX):
        return  # fetched by the worker (when the machine is online)
    if ref.startswith("builtin:"):
        if ref.split(":", 1)[1] not in BUILTINS:
            raise SpecError(f"{field}: unknown builtin model {ref!r}; known: {sorted(BUILTINS)}")
        return
    path = Path(ref).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return
    hub_like = ref.count("/") == 1 and not ref.startswith((".", "/", "~"))
    if not hub_like or path.exists():
        raise SpecError(f"{field}: {ref!r} is not a builtin, a model id or a model directory")


def check_refs(store: ArtifactStore, tenant: str, spec: dict) -> None:
    for field, value in spec.items():
        if field == "teacher" and spec.get("engine") == "openai":
            continue  # a model name on a remote server, not ours to check
        if field in DATASET_FIELDS or field in MODEL_FIELDS:
            for ref in value if isinstance(value, list) else [value]:
                if isinstance(ref, str):
                    check_ref(store, tenant, field, ref)


# A hub id as the API accepts it: "org/name", plain characters, no "..".
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def check_api_refs(store: ArtifactStore, tenant: str, spec: dict) -> dict:
    """References an API caller may use: ids of its own datasets, models and jobs,
    builtin names and hub ids. Never a path on the server (the CLI, running on the
    caller's own machine, keeps local paths). Then the checks every submission gets
    (``check_refs``) and, where the model's depth is known, ``blocks`` below it.

    Returns the spec to queue: hub ids written ``hf:org/name``, which a worker fetches
    from the hub and never reads as a folder relative to its working directory."""
    spec = dict(spec)
    for field, value in spec.items():
        if field not in DATASET_FIELDS and field not in MODEL_FIELDS:
            continue
        if field == "teacher" and spec.get("engine") == "openai":
            continue  # a model name on a remote server
        refs = value if isinstance(value, list) else [value]
        refs = [check_api_ref(field, r) if isinstance(r, str) else r for r in refs]
        spec[field] = refs if isinstance(value, list) else refs[0]
    check_refs(store, tenant, spec)
    check_depth(store, spec)
    check_architecture(store, spec)
    return spec


def check_api_ref(field: str, ref: str) -> str:
    """The reference as it will be queued; SpecError for anything else."""
    if is_artifact_id(ref) or re.fullmatch(r"job_[0-9a-f]{16,32}", ref):
        return ref
    if ref.startswith("builtin:") and field not in DATASET_FIELDS:
        return ref  # check_refs checks the name
    hub = ref.removeprefix(HUB_PREFIX)
    if field not in DATASET_FIELDS and HUB_ID_RE.match(hub) and ".." not in hub:
        return HUB_PREFIX + hub
    if field in DATASET_FIELDS:
        what = "a dataset id (ds_...)"
        how = "upload the rows (POST /v1/datasets) and name the dataset id"
    else:
        what = "a model id (mdl_...), a builtin (builtin:...) or a hub id (org/name)"
        how = "an operator can import a model directory: distillery models import DIR --tenant T"
    raise SpecError(
        f"{field}: expected {what}; paths on the server are not accepted over the API ({how})",
        {"field": field},
    )


def check_depth(store: ArtifactStore, spec: dict) -> None:
    """``blocks`` must leave at least one block of the model, whatever kind of reference
    names it: a store model's manifest knows its depth, the others' metadata does
    (``service.models.model_depth``: a builtin's GGUF header, a config.json), so a cold
    home refuses what a warm one does. A ``job_...`` model (an earlier step's product) is
    checked by the job itself."""
    from service.models import model_depth

    blocks, model = spec.get("blocks"), spec.get("model")
    if not isinstance(blocks, int) or not isinstance(model, str) or model.startswith("job_"):
        return
    if model.startswith("mdl_"):
        try:
            depth = (store.manifest("model", model).get("info") or {}).get("num_hidden_layers")
        except NotFound:
            return  # check_refs has answered 404 already
    else:
        try:
            depth = model_depth(model)
        except ModelError as exc:
            raise SpecError(f"model: {exc.message}", {"field": "model"}) from exc
    if isinstance(depth, int) and blocks >= depth:
        raise SpecError(
            f"blocks: cannot remove {blocks} blocks from {model}, which has {depth}; "
            f"choose between 1 and {depth - 1}",
            {"field": "blocks", "blocks": blocks, "num_hidden_layers": depth},
        )


def check_architecture(store: ArtifactStore, spec: dict) -> None:
    """A model to prune or fine-tune must be a decoder-only causal LM whose blocks the
    pipeline can find, and a list of adapter targets must name its modules
    (``service.adapters``): read from its config, the model built on torch's meta device
    (no weights), so a job that would fail on the model fails here, with the model's own
    module names, and never as a traceback in a worker. A ``job_...`` model (an earlier
    step's product) and a hub model out of reach are checked by the job itself."""
    from service.adapters import ALL_LINEAR, check_targets, model_shape, shape_of_config

    model = spec.get("model")
    targets = spec.get("target_modules", spec.get("lora_targets"))
    if not isinstance(model, str) or model.startswith("job_"):
        return
    if "blocks" not in spec and targets is None:  # not a prune, finetune or pipeline
        return
    try:
        if model.startswith("mdl_"):
            try:
                cfg = store.path("model", model) / "model" / "config.json"
                shape = shape_of_config(json.loads(cfg.read_text()), model)
            except (NotFound, OSError, ValueError):
                return  # check_refs has answered 404; a store model's config is ours
        else:
            shape = model_shape(model)
    except ModelError as exc:
        raise SpecError(f"model: {exc.message}", {"field": "model"}) from exc
    if shape is not None and isinstance(targets, list) and targets != [ALL_LINEAR]:
        field = "target_modules" if "target_modules" in spec else "lora_targets"
        try:
            check_targets(targets, shape, model)
        except SpecError as exc:
            raise SpecError(f"{field}: {exc.message}", {"field": field, **exc.details}) from exc
