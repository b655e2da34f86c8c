"""A job's lifecycle, in one place: create, start, progress, end, cancel, and settling a
pipeline's steps.

    submit ─▶ queued ─▶ start ─▶ running ─▶ end ─▶ succeeded | failed | cancelled
                 └────────── cancel ─────────────▶ cancelled

The record (``workers/records.py``, what clients read) and the RQ job share the job's id.
Queue ``teacher`` runs distillation; queue ``train`` runs prune, finetune, evaluate, merge
and a pipeline's final ``report`` step. A pipeline is one record for the caller and one
record (and RQ job) per step of ``service.steps``, chained by RQ dependencies; a step
names the products of the steps it needs by their job ids (``"model": "job_..."``),
which ``workers.outputs.resolve_job_refs`` turns into artifact ids when it starts.

A distill job, alone or as a pipeline's step, is registered with the teacher tier as
units of rows that any teacher worker claims (``workers/units.py``, ``workers/teacher.py``);
its RQ job is created but never queued, and the worker that finishes the job marks it
finished, so RQ enqueues the steps that depend on it.

What RQ does and what stays ours:
- RQ queues, orders by dependency (``depends_on``), retries (``Retry(max=2)``) and
  requeues a job whose worker died (abandoned-job handling calls ``on_rq_failure``).
- Our record keeps a status beside RQ's because clients read it with tenant, progress,
  events and metrics, and RQ's job hash expires with its result TTL while our records
  follow their own retention. Each transition is one Lua script (status, counters,
  event), so a reader never sees a status without its event.
- RQ jobs are enqueued with ``job_timeout=-1``: the job enforces DISTILLERY_JOB_TIMEOUT
  itself, through ``RecordReporter.check`` (a teacher must not be killed mid-step, or
  its worker would lose its loaded engine) and the trainer's child supervision
  (``workers/jobs.py``: RQ would kill the work horse at once, and a cancel gets a grace
  period to stop at its next step first). A job that fails for a reason of its own sets
  ``retries_left = 0`` so RQ does not retry it.

Progress: every ``run_*`` function of ``service`` reports through a
:class:`service.progress.Reporter`; in a worker it is :class:`RecordReporter`, which
writes progress into the record and events into its stream, throttled (record at most
every ``every`` seconds, a progress event at most once a second) so a fast loop cannot
flood Redis. ``cancelled()`` reads the cancel flag, so running work stops at its next
batch or step; ``check()`` also enforces the job's deadline. A pipeline's step forwards
its progress and log events to the pipeline's own stream, each with the step's name in
``pipeline_step``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import redis
from rq import Queue, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Callback, Job, JobStatus

from service.errors import DistilleryError, new_error_id
from service.progress import Reporter
from service.redact import redact, redact_text
from service.specs import DistillSpec, PipelineSpec, Spec
from service.steps import NAMES as STEP_NAMES
from service.steps import pipeline_steps
from service.store import ArtifactStore
from workers import records, units

log = logging.getLogger(__name__)

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


def queue_state(conn: redis.Redis) -> dict[str, dict[str, int]]:
    """Per queue: live workers (``Worker.all`` skips one whose heartbeat key expired, so a
    dead worker drops out after its TTL), jobs waiting and jobs held by a worker. The
    teacher queue's RQ jobs are never queued (units are), so its waiting count is the
    distill jobs with rows not yet claimed, and its running count the teacher workers'
    held units."""
    from rq import Worker
    from rq.registry import StartedJobRegistry

    state = {}
    for name in QUEUES:
        q = Queue(name, connection=conn)
        state[name] = {
            "workers": len(Worker.all(queue=q)),
            "queued": q.count,
            "running": StartedJobRegistry(queue=q).count,
        }
    state["teacher"]["queued"] = len(units.open_jobs(conn))
    return state


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
        on_failure=Callback("workers.lifecycle.on_rq_failure"),
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
    """Write the record(s) and enqueue; return the top-level record as submitted
    (``queued``: a worker may have started it since). The caller has checked the spec's
    references (``api/refs.py``)."""
    if job_type == "pipeline":
        assert isinstance(spec, PipelineSpec)
        return submit_pipeline(conn, tenant, spec, job_id=job_id, store=store)
    if job_type not in QUEUE_OF or job_type in INTERNAL_TYPES:
        raise DistilleryError(f"unknown job type {job_type!r}")
    doc = spec.model_dump(mode="json")
    pipe = conn.pipeline()
    rec = records.create(pipe, tenant=tenant, type=job_type, spec=doc, queue=QUEUE_OF[job_type],
                         job_id=job_id, pipe=pipe)  # fmt: skip
    if isinstance(spec, DistillSpec):
        rows = register_distill(conn, pipe, store, tenant, rec["id"], spec)
        rec["progress"] = {"rows_done": 0, "rows_total": rows}
    pipe.execute()
    try:
        enqueue(conn, rec["id"], job_type, doc)
    except Exception as exc:
        error = {"code": "enqueue", "message": str(exc), "where": "submit"}
        records.transition(conn, rec["id"], ("queued",), "failed", finished_at=time.time(),
                           error=error)  # fmt: skip
        raise
    return rec


def submit_pipeline(
    conn: redis.Redis,
    tenant: str,
    spec: PipelineSpec,
    job_id: str | None = None,
    store: ArtifactStore | None = None,
) -> dict:
    """One record for the pipeline, then one record and RQ job per step of
    ``service.steps``, each depending on the steps it needs."""
    parent = records.create(conn, tenant=tenant, type="pipeline",
                            spec=spec.model_dump(mode="json"), queue=None, job_id=job_id)  # fmt: skip
    pid = parent["id"]
    ids = {name: records.new_job_id() for name in STEP_NAMES}
    steps = pipeline_steps(spec, ref=lambda name: ids[name])  # products named by job id
    docs = {s.name: s.spec.model_dump(mode="json") if s.spec else {} for s in steps}
    pipe = conn.pipeline()
    for step in steps:
        records.create(pipe, tenant=tenant, type=step.type, spec=docs[step.name],
                       queue=QUEUE_OF[step.type], parent=pid, step=step.name,
                       job_id=ids[step.name], pipe=pipe)  # fmt: skip
        if isinstance(step.spec, DistillSpec):
            register_distill(conn, pipe, store, tenant, ids[step.name], step.spec)
    pipe.execute()
    records.update(conn, pid, children=[ids[step.name] for step in steps])
    try:
        for step in steps:
            enqueue(conn, ids[step.name], step.type, docs[step.name],
                    depends_on=[ids[n] for n in step.needs])  # fmt: skip
    except Exception as exc:
        settle_pipeline(
            conn, pid, "failed", {"code": "enqueue", "message": str(exc), "where": "submit"}
        )
        raise
    return {**parent, "children": [ids[step.name] for step in steps]}


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
) -> int:
    """Make a distill job's rows claimable by the teacher tier (in ``pipe``); return how
    many rows it has."""
    from service.settings import get_settings

    rows = distill_rows(store, spec)
    interactive = spec.priority == "interactive" and admit_interactive(conn, tenant, job_id, rows)
    if spec.priority == "interactive" and not interactive:
        records.add_event(conn, job_id, f"{rows} rows: above the interactive caps, runs as bulk")
    key = units.engine_key(spec.engine, spec.teacher, spec.dtype)
    units.register(pipe, job_id, tenant, rows, get_settings().unit_rows, interactive, key)
    pipe.hset(records.job_key(job_id), "progress", json.dumps({"rows_done": 0, "rows_total": rows}))
    return rows


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
    job_id = job["id"]
    if job["status"] in records.TERMINAL:
        raise Conflict(f"job {job_id} already {job['status']}", {"status": job["status"]})
    records.request_cancel(conn, job_id)
    if job["type"] == "pipeline":
        settle_pipeline(conn, job_id, "cancelled", None)
    elif records.transition(conn, job_id, ("queued",), "cancelled", finished_at=time.time()):
        cancel_rq_job(conn, job_id)
        if job["parent"]:
            settle_pipeline(conn, job["parent"], "cancelled", None)
    else:
        records.add_event(conn, job_id, "cancel requested; stopping at the next step")
    return records.get(conn, job_id) or job


# -- start, progress, end ----------------------------------------------------------


def error_doc(exc: BaseException, job_type: str) -> dict:
    """{code, message, where, error_id} for the record, which clients read: the job type
    as ``where``, no trace, no server path (``service.redact``); an unexpected error's
    message names only its type. The full message, the innermost frame and the trace go
    to the server's log with the same ``error_id`` (a key of its own in JSON logs)."""
    error_id = new_error_id()
    if isinstance(exc, DistilleryError):
        log.warning("%s failed (error id %s): %s", job_type, error_id, exc,
                    extra={"error_id": error_id})  # fmt: skip
        return {
            "code": exc.code,
            "message": redact_text(exc.message),
            "where": job_type,
            "details": redact(exc.details),
            "error_id": error_id,
        }
    log.error("%s failed (error id %s): %s: %s", job_type, error_id, type(exc).__name__, exc,
              exc_info=exc, extra={"error_id": error_id})  # fmt: skip
    return {
        "code": "internal",
        "message": f"internal error ({type(exc).__name__}); the server's log holds the "
        f"details under error id {error_id}",
        "where": job_type,
        "error_id": error_id,
    }


def start(conn: redis.Redis, job: dict) -> bool:
    """queued → running (or running → running when RQ retries a job whose worker died)."""
    attempts = job["attempts"] + 1
    data = {"attempt": attempts}
    now = time.time()
    if not records.transition(
        conn,
        job["id"],
        ("queued", "running"),
        "running",
        data=data,
        started_at=now,
        attempts=attempts,
    ):
        return False
    if attempts > 1:
        records.add_event(
            conn, job["id"], f"resumed (attempt {attempts})", level="warning", data=data
        )
    pipeline = pipeline_of(conn, job)
    if pipeline:  # the pipeline's own stream follows its steps
        records.add_event(conn, pipeline, f"{job['step']}: running",
                          data={**data, "pipeline_step": job["step"], "job_id": job["id"]})  # fmt: skip
        records.transition(conn, pipeline, ("queued",), "running", started_at=now)
    return True


def pipeline_of(conn: redis.Redis, job: dict) -> str | None:
    """The pipeline a step belongs to (None for a job of its own)."""
    if not job["parent"]:
        return None
    return job["parent"] if records.get_type(conn, job["parent"]) == "pipeline" else None


def end(conn: redis.Redis, job: dict, status: str, **fields: Any) -> bool:
    """Finish a record (from queued or running); a pipeline step also settles its parent."""
    moved = records.transition(
        conn,
        job["id"],
        ("queued", "running"),
        status,
        data={k: v for k, v in fields.items() if k == "error"},
        finished_at=time.time(),
        **fields,
    )
    if moved and job["parent"]:
        records.add_event(conn, job["parent"], f"{job['step']}: {status}",
                          level="info" if status == "succeeded" else "warning",
                          data={"pipeline_step": job["step"], "job_id": job["id"]})  # fmt: skip
    if moved and job["parent"] and status != "succeeded":
        what = "failed" if status == "failed" else "was cancelled"
        error = fields.get("error") or {"code": "cancelled", "message": "cancelled"}
        settle_pipeline(
            conn,
            job["parent"],
            "failed" if status == "failed" else "cancelled",
            error={
                **error,
                "message": f"step {job['id']} ({job['type']}) {what}: "
                + str(error.get("message", "")),
                "where": job["id"],
            },  # fmt: skip
        )
    return moved


def settle_pipeline(conn: redis.Redis, pipeline_id: str, status: str, error: dict | None) -> None:
    """End a pipeline as ``status`` (failed or cancelled): cancel its unfinished steps,
    then mark it, once (a second call finds it ended)."""
    pipeline = records.get(conn, pipeline_id)
    if pipeline is None:
        return
    cancel_steps(conn, pipeline)
    fields: dict[str, Any] = {"finished_at": time.time()}
    if status == "failed" and error:
        fields["error"] = error
    if records.transition(conn, pipeline_id, ("queued", "running"), status, **fields):
        cancel_waiting_rq_job(conn, pipeline_id)


def cancel_steps(conn: redis.Redis, pipeline: dict) -> None:
    """Cancel a pipeline's steps: queued ones now (their RQ jobs too), running ones at
    their next batch or step (a distill step's rows leave the teacher loop at its next
    step); finished ones stay as they are."""
    for step_id in pipeline["children"]:
        records.request_cancel(conn, step_id)
        if records.transition(conn, step_id, ("queued",), "cancelled", finished_at=time.time()):
            cancel_rq_job(conn, step_id)


class JobTimeout(DistilleryError):
    code = "timeout"


class RecordReporter(Reporter):
    def __init__(
        self,
        conn: redis.Redis,
        job_id: str,
        *,
        deadline: float | None = None,
        every: float = 0.5,
        event_every: float = 1.0,
        forward_to: str | None = None,
        step: str | None = None,
    ):
        self.conn = conn
        self.job_id = job_id
        self.forward_to, self.step = forward_to, step  # the pipeline, and this step's name
        self.deadline = deadline  # time.monotonic() value; None = no limit
        self.every = every
        self.event_every = event_every
        self.latest: dict[str, Any] = {}
        self._last_write = 0.0
        self._last_event = 0.0
        self._last_cancel_check = 0.0
        self._cancelled = False
        self._dirty = False

    def progress(self, **fields: Any) -> None:
        self.latest.update(fields)
        self._dirty = True
        now = time.monotonic()
        if now - self._last_write >= self.every:
            self._write(now)

    def _write(self, now: float) -> None:
        doc = dict(self.latest, updated_at=time.time())
        records.update(self.conn, self.job_id, progress=doc)
        self._last_write = now
        self._dirty = False
        if now - self._last_event >= self.event_every:
            records.add_event(self.conn, self.job_id, "progress", type="progress", data=doc)
            if self.forward_to:
                records.add_event(self.conn, self.forward_to, f"{self.step}: progress",
                                  type="progress", data={**doc, "job_id": self.job_id,
                                                         "pipeline_step": self.step})  # fmt: skip
            self._last_event = now

    def flush(self) -> None:
        if self._dirty:
            self._last_event = 0.0
            self._write(time.monotonic())

    def event(self, message: str, level: str = "info", **data: Any) -> None:
        records.add_event(self.conn, self.job_id, message, type="log", level=level, data=data)
        if self.forward_to:
            records.add_event(self.conn, self.forward_to, f"{self.step}: {message}", type="log",
                              level=level, data={**data, "job_id": self.job_id, "pipeline_step": self.step})  # fmt: skip

    def cancelled(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and now - self._last_cancel_check >= 0.2:
            self._last_cancel_check = now
            self._cancelled = records.cancel_requested(self.conn, self.job_id)
        return self._cancelled

    def check(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise JobTimeout("job ran past its time limit (DISTILLERY_JOB_TIMEOUT)")
        super().check()


def on_rq_failure(job, connection: redis.Redis, exc_type, exc_value, tb) -> None:
    """RQ failure callback: also called for abandoned jobs (their worker died)."""
    rec = records.get(connection, job.id)
    if rec is None or rec["status"] in records.TERMINAL:
        return  # the job function already settled its record
    if job.retries_left:
        if records.transition(connection, job.id, ("running",), "queued"):
            records.add_event(
                connection,
                job.id,
                f"worker stopped mid-job ({exc_type.__name__}); requeued to resume",
                level="warning",
            )
        return
    end(
        connection,
        rec,
        "failed",
        error={
            "code": "worker_lost",
            "message": f"the worker stopped during the job and retries ran out ({exc_type.__name__})",
            "where": "rq",
        },
    )
