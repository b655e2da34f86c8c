"""Submitting and cancelling jobs: records first, then RQ jobs with the same id.

Queue ``teacher`` runs distillation; queue ``train`` runs prune, finetune, evaluate,
merge and a pipeline's final ``report`` step. A ``pipeline`` is one record for the
caller and one child record (and RQ job) per step, chained by RQ dependencies::

    prune ──┬──────────────▶ evaluate pruned ─────┐
    distill ┴▶ finetune ───▶ evaluate recovered ──┼▶ report
    evaluate baseline ────────────────────────────┘

A step names the products of earlier steps by their job ids (``"model": "job_..."``);
``workers.outputs.resolve_job_refs`` turns them into artifact ids when the step starts.

A distill job, alone or as a pipeline's step, is registered with the teacher tier as
units of rows that any teacher worker claims (``workers/units.py``, ``workers/teacher.py``);
its RQ job is created but never queued, and the worker that finishes the job marks it
finished, so RQ enqueues the steps that depend on it.

RQ jobs are enqueued with ``job_timeout=-1`` (the job enforces DISTILLERY_JOB_TIMEOUT
itself: a teacher job must not be killed mid-batch, or its worker would lose its loaded
engine) and ``Retry(max=2)``: a job whose worker died is put back by RQ's abandoned-job
handling and resumes. A job that fails for a reason of its own sets ``retries_left = 0``
(``workers.jobs``) so it is not retried.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import redis
from rq import Queue, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Callback, Job, JobStatus

from service.errors import DistilleryError
from service.pipeline import step_specs
from service.specs import DistillSpec, PipelineSpec, Spec
from service.store import ArtifactStore
from workers import records, units
from workers.outputs import check_refs

QUEUES = ("teacher", "train")
QUEUE_OF = {
    "distill": "teacher",
    "prune": "train",
    "finetune": "train",
    "evaluate": "train",
    "merge": "train",
    "report": "train",
}
INTERNAL_TYPES = ("report",)  # made by the service, never submitted
FUNC_OF = {"teacher": "workers.teacher.placeholder", "train": "workers.jobs.train_job"}
RETRIES = 2
IDEMPOTENCY_TTL = 24 * 3600  # seconds a key is remembered (Stripe keeps them 24 h)


class Conflict(DistilleryError):
    code = "conflict"


def enqueue(
    conn: redis.Redis, job_id: str, job_type: str, spec: dict, depends_on: list[str] | None = None
) -> None:
    queue = QUEUE_OF[job_type]
    if queue == "teacher":  # created, never queued: the teacher loop runs it
        job = Queue(queue, connection=conn).create_job(
            FUNC_OF[queue],
            args=(job_id,),
            job_id=job_id,
            timeout=-1,
            status=JobStatus.CREATED,
            result_ttl=7 * 24 * 3600,
            failure_ttl=7 * 24 * 3600,
            description=f"{job_type} {job_id}",
        )
        job.save()
        return
    Queue(queue, connection=conn).enqueue_call(
        func=FUNC_OF[queue],
        args=(job_id, job_type, spec),
        job_id=job_id,
        timeout=-1,
        retry=Retry(max=RETRIES),
        on_failure=Callback("workers.jobs.on_rq_failure"),
        depends_on=depends_on or None,
        result_ttl=7 * 24 * 3600,
        failure_ttl=7 * 24 * 3600,
        description=f"{job_type} {job_id}",
    )


def submit(
    conn: redis.Redis,
    store: ArtifactStore,
    tenant: str,
    job_type: str,
    spec: Spec,
    *,
    job_id: str | None = None,
) -> dict:
    """Validate references, write the record(s), enqueue; return the top-level record."""
    doc = spec.model_dump(mode="json")
    check_refs(store, tenant, doc)
    if job_type == "pipeline":
        assert isinstance(spec, PipelineSpec)
        return submit_pipeline(conn, tenant, spec, job_id=job_id, store=store)
    if job_type not in QUEUE_OF or job_type in INTERNAL_TYPES:
        raise DistilleryError(f"unknown job type {job_type!r}")
    pipe = conn.pipeline()
    rec = records.create(pipe, tenant=tenant, type=job_type, spec=doc, queue=QUEUE_OF[job_type],
                         job_id=job_id, pipe=pipe)  # fmt: skip
    if isinstance(spec, DistillSpec):
        register_distill(conn, pipe, store, tenant, rec["id"], spec)
    pipe.execute()
    try:
        enqueue(conn, rec["id"], job_type, doc)
    except Exception as exc:
        error = {"code": "enqueue", "message": str(exc), "where": "submit"}
        records.transition(conn, rec["id"], ("queued",), "failed", finished_at=time.time(),
                           error=error)  # fmt: skip
        raise
    return records.get(conn, rec["id"]) or rec


def submit_pipeline(
    conn: redis.Redis,
    tenant: str,
    spec: PipelineSpec,
    job_id: str | None = None,
    store: ArtifactStore | None = None,
) -> dict:
    parent = records.create(conn, tenant=tenant, type="pipeline",
                            spec=spec.model_dump(mode="json"), queue=None, job_id=job_id)  # fmt: skip
    pid = parent["id"]
    steps = step_specs(spec, Path("/unused"))
    ids = {name: records.new_job_id() for name in ("prune", "distill", "finetune")}
    for name in ("baseline", "pruned", "recovered"):
        ids[f"evaluate {name}"] = records.new_job_id()
    ids["report"] = records.new_job_id()
    # (step, type, spec, dependencies); earlier products are named by job id.
    plan: list[tuple[str, str, dict, list[str]]] = [
        ("prune", "prune", steps["prune"].model_dump(mode="json"), []),
        ("distill", "distill", steps["distill"].model_dump(mode="json"), []),
        (
            "finetune",
            "finetune",
            steps["finetune"]
            .model_copy(update={"model": ids["prune"], "dataset": ids["distill"]})
            .model_dump(mode="json"),
            [ids["prune"], ids["distill"]],
        ),
    ]
    for name, model_from in (("baseline", None), ("pruned", "prune"), ("recovered", "finetune")):
        espec = steps["evaluate"][name]
        if model_from:
            espec = espec.model_copy(update={"model": ids[model_from]})
        plan.append(
            (
                f"evaluate {name}",
                "evaluate",
                espec.model_dump(mode="json"),
                [ids[model_from]] if model_from else [],
            )  # fmt: skip
        )
    plan.append(
        (
            "report",
            "report",
            {},
            [ids["evaluate baseline"], ids["evaluate pruned"], ids["evaluate recovered"]],
        )  # fmt: skip
    )
    pipe = conn.pipeline()
    for step, job_type, doc, _ in plan:
        records.create(pipe, tenant=tenant, type=job_type, spec=doc, queue=QUEUE_OF[job_type],
                       parent=pid, step=step, job_id=ids[step], pipe=pipe)  # fmt: skip
    register_distill(conn, pipe, store, tenant, ids["distill"], steps["distill"])
    pipe.execute()
    records.update(conn, pid, children=[ids[step] for step, *_ in plan])
    try:
        for step, job_type, doc, deps in plan:
            enqueue(conn, ids[step], job_type, doc, depends_on=deps)
    except Exception as exc:
        from workers.execute import stop_pipeline

        stop_pipeline(
            conn, pid, "failed", {"code": "enqueue", "message": str(exc), "where": "submit"}
        )
        raise
    return records.get(conn, pid) or parent


def distill_rows(store: ArtifactStore | None, spec: DistillSpec) -> int:
    """Rows a distill job will rewrite: from its dataset's manifest, else by reading it."""
    from service.datasets import dataset_path, read_dataset
    from service.store import NotFound, is_artifact_id

    rows = None
    if store is not None and is_artifact_id(spec.dataset) and spec.dataset.startswith("ds_"):
        try:
            rows = store.manifest("dataset", spec.dataset).get("rows")
        except NotFound:
            rows = None
    if rows is None:
        rows = len(read_dataset(dataset_path(spec.dataset), limit=spec.limit))
    return min(int(rows), spec.limit) if spec.limit is not None else int(rows)


def interactive_key(tenant: str) -> str:
    return f"{units.P}:interactive:{tenant}"


def admit_interactive(conn: redis.Redis, tenant: str, job_id: str, rows: int) -> bool:
    """Whether a job asking for interactive priority gets it: at most
    DISTILLERY_INTERACTIVE_MAX_ROWS rows, and the tenant's unfinished interactive rows
    within DISTILLERY_INTERACTIVE_TENANT_ROWS (a 100,000-row request is bulk work)."""
    from service.settings import get_settings

    settings = get_settings()
    if rows > settings.interactive_max_rows:
        return False
    key = interactive_key(tenant)
    held = 0
    for member, score in conn.zrange(key, 0, -1, withscores=True):
        other = member.decode()
        if records.status(conn, other) in (None, *records.TERMINAL):
            conn.zrem(key, other)
        else:
            held += int(score)
    if held + rows > settings.interactive_tenant_rows:
        return False
    conn.zadd(key, {job_id: rows})
    return True


def register_distill(
    conn: redis.Redis,
    pipe: redis.client.Pipeline,
    store: ArtifactStore | None,
    tenant: str,
    job_id: str,
    spec: DistillSpec,
) -> None:
    """Make a distill job's rows claimable by the teacher tier (in ``pipe``)."""
    from service.settings import get_settings

    rows = distill_rows(store, spec)
    interactive = spec.priority == "interactive" and admit_interactive(conn, tenant, job_id, rows)
    if spec.priority == "interactive" and not interactive:
        records.add_event(conn, job_id, f"{rows} rows: above the interactive caps, runs as bulk")
    key = units.engine_key(spec.engine, spec.teacher, spec.dtype)
    units.register(pipe, job_id, tenant, rows, get_settings().unit_rows, interactive, key)
    pipe.hset(records.job_key(job_id), "progress", json.dumps({"rows_done": 0, "rows_total": rows}))


def body_hash(job_type: str, spec: Spec) -> str:
    doc = {"type": job_type, **spec.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def reserve_idempotency_key(
    conn: redis.Redis, tenant: str, key: str, digest: str
) -> tuple[str, bool]:
    """(job id, is_new): the same key and body give the same job; another body, 409."""
    rkey = f"{records.PREFIX}:idem:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}"
    job_id = records.new_job_id()
    if conn.set(rkey, json.dumps({"hash": digest, "job_id": job_id}), nx=True, ex=IDEMPOTENCY_TTL):
        return job_id, True
    doc = json.loads(conn.get(rkey) or "{}")
    if doc.get("hash") != digest:
        raise Conflict("Idempotency-Key reused with a different request body")
    return doc["job_id"], False


def cancel_rq_job(conn: redis.Redis, job_id: str) -> None:
    try:
        Job.fetch(job_id, connection=conn).cancel()
    except (NoSuchJobError, InvalidJobOperation):
        pass


def cancel_waiting_rq_job(conn: redis.Redis, job_id: str) -> None:
    """Cancel an RQ job that has not started (waiting on its dependencies); a running one
    is left to finish and find its record settled."""
    try:
        job = Job.fetch(job_id, connection=conn)
        if job.get_status(refresh=False) in (JobStatus.DEFERRED, JobStatus.QUEUED):
            job.cancel()
    except (NoSuchJobError, InvalidJobOperation):
        pass


def cancel(conn: redis.Redis, job: dict) -> dict:
    """Cancel queued work now; running work stops at its next batch or step."""
    from workers.execute import stop_pipeline

    job_id = job["id"]
    if job["status"] in records.TERMINAL:
        raise Conflict(f"job {job_id} already {job['status']}", {"status": job["status"]})
    records.request_cancel(conn, job_id)
    if job["type"] == "pipeline":
        stop_pipeline(conn, job_id, "cancelled", None)
    elif records.transition(conn, job_id, ("queued",), "cancelled", finished_at=time.time()):
        cancel_rq_job(conn, job_id)
        if job["parent"]:
            stop_pipeline(conn, job["parent"], "cancelled", None)
    else:
        records.add_event(conn, job_id, "cancel requested; stopping at the next step")
    return records.get(conn, job_id) or job
