"""Where a job's inputs come from and where its outputs go.

Inputs: a spec names datasets and models by reference. Inside a pipeline, a step's input
can be an earlier step's job id (``job_...``); it is resolved here, when the step starts,
to the artifact that job produced. Dataset and model ids must belong to the job's tenant.

Outputs: each job works in ``$DISTILLERY_HOME/jobs/<job id>/`` (a stable folder, so a
retried job resumes: distillation from its last written batch, fine-tuning from its
checkpoint), and on success its products become artifacts of the store, named after the
job (``mdl_<job hex>``, so registering twice replaces rather than duplicates):

- prune, finetune, merge: a ``model`` whose manifest lists its parents (lineage);
- distill: a ``dataset`` (``rows.jsonl``, every row with its provenance fields);
- evaluate: a ``run`` holding ``eval.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import redis

from service.errors import SpecError
from service.redact import redact
from service.row_index import write_index
from service.store import ArtifactStore
from workers import records

# Which spec fields hold a dataset, and which a model (lists: every item is one).
DATASET_FIELDS = ("dataset", "calibration")
MODEL_FIELDS = ("model", "teacher", "baseline", "models")
# What each job type leaves in its work folder, and the artifact it becomes.
OUTPUTS = {
    "prune": ("model", "model"),
    "finetune": ("model", "model"),
    "merge": ("model", "model"),
    "distill": ("rows.jsonl", "dataset"),
    "evaluate": ("eval.json", "run"),
}


def work_dir(home: Path, job_id: str) -> Path:
    d = home / "jobs" / job_id
    d.mkdir(parents=True, exist_ok=True)
    return d


def artifact_id_for(kind: str, job_id: str) -> str:
    prefix = {"model": "mdl", "dataset": "ds", "run": "run"}[kind]
    return f"{prefix}_{job_id.removeprefix('job_')}"


def resolve_job_refs(conn: redis.Redis, tenant: str, spec: dict) -> dict:
    """Replace ``job_...`` references by the artifact that (finished) job produced."""
    out = dict(spec)
    for field, value in spec.items():
        if field not in DATASET_FIELDS and field not in MODEL_FIELDS:
            continue
        want = "dataset" if field in DATASET_FIELDS else "model"
        refs = value if isinstance(value, list) else [value]
        resolved = []
        for ref in refs:
            if isinstance(ref, str) and ref.startswith("job_"):
                rec = records.get(conn, ref)
                if rec is None or rec["tenant"] != tenant:
                    raise SpecError(f"{field}: no job {ref!r}")
                art = (rec.get("artifacts") or {}).get(want)
                if rec["status"] != "succeeded" or not art:
                    raise SpecError(f"{field}: job {ref} has not produced a {want}")
                ref = art
            resolved.append(ref)
        out[field] = resolved if isinstance(value, list) else resolved[0]
    return out


def parents_of(job_type: str, spec: dict) -> list[str]:
    """The references a new model was made from, for its lineage."""
    if job_type == "merge":
        return list(spec["models"])
    if job_type == "finetune":
        return [spec["model"], spec["dataset"]]
    return [spec["model"]]


def register_outputs(
    store: ArtifactStore,
    job: dict,
    spec: dict,
    work: Path,
    result: dict,
) -> dict[str, str]:
    """Move the job's products into the store; return {kind: artifact id}."""
    name, kind = OUTPUTS[job["type"]]
    src = work / name
    if not src.exists():
        raise FileNotFoundError(f"{job['type']} wrote no {src}")
    art_id = artifact_id_for(kind, job["id"])
    manifest: dict[str, Any] = {"tenant": job["tenant"], "job_id": job["id"], "op": job["type"]}
    if kind == "model":
        from service.models import model_info

        manifest.update(parents=parents_of(job["type"], spec), info=model_info(src))
        manifest["metrics"] = redact(
            {k: v for k, v in result.items() if isinstance(v, int | float | str | list)}
        )
    elif kind == "dataset":
        manifest.update(
            name=f"distilled by {job['id']}",
            rows=sum(1 for line in src.open("rb") if line.strip()),
            parents=[spec["dataset"], spec["teacher"]],
            source="distill",
        )
    else:
        manifest.update(parents=[r for r in (spec.get("model"), spec.get("baseline")) if r])
    with store.create(kind, artifact_id=art_id, **manifest) as tmp:
        dest = tmp / ("model" if kind == "model" else name)
        shutil.move(str(src), str(dest))
        if kind == "dataset":
            write_index(tmp)  # pages and per-reason counts for the viewer (the console's)
        (tmp / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return {kind: art_id}
