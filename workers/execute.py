"""Run one job against its record: the part shared by the teacher worker (in-process,
with its cached engine) and the trainer's child process (``python -m workers.child``).

``execute`` moves the record queued → running (a cancelled job never starts), validates
the spec again, resolves inputs, calls the ``service`` run function with a
:class:`~workers.reporter.RecordReporter`, turns the products into artifacts and finishes
the record: succeeded (metrics, artifact ids), cancelled, or failed (code, message,
where, error id). Within a pipeline, a failed or cancelled step fails or cancels the pipeline and
its remaining steps; the last step (``report``) builds the summary table.

Distill jobs do not run here: the teacher loop runs them (``workers/teacher.py``) and
uses :func:`end` and :func:`error_doc` to settle their records the same way.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from service.errors import CancelledError, DistilleryError
from service.redact import redact, redact_text
from service.settings import get_settings
from service.specs import JOB_SPECS
from service.store import ArtifactStore
from workers import records
from workers.outputs import artifact_id_for, register_outputs, resolve_job_refs, work_dir
from workers.reporter import RecordReporter

log = logging.getLogger(__name__)
SPECS = dict(JOB_SPECS)


class StepFailed(Exception):
    """Raised to RQ after the record is marked failed, so RQ does not run dependents."""


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


def new_error_id() -> str:
    return f"err_{uuid.uuid4().hex[:16]}"


def run_step(job_type: str, spec: Any, work: Path, reporter: RecordReporter) -> dict:
    """Call the service's run function for ``job_type``; outputs go under ``work``."""
    if job_type == "prune":
        from service.prune import run_prune

        return run_prune(spec, work / "model", reporter)
    if job_type == "finetune":
        from service.finetune import run_finetune

        # resume=True: continue from work/model.ckpt when a lost worker left one.
        return run_finetune(spec, work / "model", reporter, resume=True)
    if job_type == "evaluate":
        from service.evaluate import run_evaluate

        return run_evaluate(spec, work / "eval.json", reporter, data_dir=get_settings().eval_data)
    if job_type == "merge":
        from service.merge import run_merge

        return run_merge(spec, work / "model", reporter)
    raise DistilleryError(f"unknown job type {job_type!r}")


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
    pipeline = _pipeline_of(conn, job)
    if pipeline:  # the pipeline's own stream follows its steps
        records.add_event(conn, pipeline, f"{job['step']}: running",
                          data={**data, "pipeline_step": job["step"], "job_id": job["id"]})  # fmt: skip
        records.transition(conn, pipeline, ("queued",), "running", started_at=now)
    return True


def execute(conn: redis.Redis, job_id: str, timeout: float | None = None) -> str:
    """Run job ``job_id``; return its final status."""
    job = records.get(conn, job_id)
    if job is None:
        raise DistilleryError(f"no job record {job_id}")
    if job["type"] == "report":
        if not start(conn, job):
            return records.status(conn, job_id) or "unknown"
        try:
            return finish_pipeline(conn, job)
        except Exception as exc:
            end(conn, job, "failed", error=error_doc(exc, "report"))
            raise StepFailed(str(exc)) from exc
    if not start(conn, job):
        return records.status(conn, job_id) or "unknown"
    settings = get_settings()
    store = ArtifactStore.from_settings(settings)
    timeout = timeout if timeout is not None else settings.job_timeout
    deadline = time.monotonic() + timeout if timeout and timeout > 0 else None
    pipeline = _pipeline_of(conn, job)
    reporter = RecordReporter(conn, job_id, deadline=deadline, forward_to=pipeline,
                              step=job["step"] or job["type"])  # fmt: skip
    try:
        raw = resolve_job_refs(conn, job["tenant"], job["spec"])
        spec = SPECS[job["type"]].model_validate(raw)
        work = work_dir(settings.home_dir(), job_id)
        result = run_step(job["type"], spec, work, reporter)
        reporter.flush()
        artifacts = register_outputs(store, job, spec.model_dump(mode="json"), work, result)
    except CancelledError:
        reporter.flush()
        end(conn, job, "cancelled")
        return "cancelled"
    except Exception as exc:
        if worker_gone():
            # A job's child whose worker died (under torchrun a rank then loses its peer
            # mid-collective): the error is that death's. Leave the record running; RQ
            # requeues the abandoned job and it resumes from its checkpoint.
            os._exit(3)
        reporter.flush()
        end(conn, job, "failed", error=error_doc(exc, job["type"]))
        raise StepFailed(str(exc)) from exc
    end(conn, job, "succeeded", metrics=result, artifacts=artifacts)
    return "succeeded"


def _pipeline_of(conn: redis.Redis, job: dict) -> str | None:
    """The pipeline a step belongs to (None for a job of its own)."""
    if not job["parent"]:
        return None
    return job["parent"] if records.get_type(conn, job["parent"]) == "pipeline" else None


def worker_gone() -> bool:
    """In a job's child process (``workers.child``): whether the worker that started it,
    ``DISTILLERY_WORKER_PID``, has died. Always False in a worker itself."""
    pid = int(os.environ.get("DISTILLERY_WORKER_PID", "0"))
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        return False
    return False


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
        stop_pipeline(
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


def stop_pipeline(conn: redis.Redis, parent_id: str, status: str, error: dict | None) -> None:
    """Settle a parent job (a pipeline): cancel its unfinished
    children, then mark it ``status``; a parent that has a parent settles that one too."""
    from workers.submit import cancel_waiting_rq_job

    parent = records.get(conn, parent_id)
    if parent is None:
        return
    stop_children(conn, parent)
    fields: dict[str, Any] = {"finished_at": time.time()}
    if status == "failed" and error:
        fields["error"] = error
    if records.transition(conn, parent_id, ("queued", "running"), status, **fields):
        cancel_waiting_rq_job(conn, parent_id)
        if parent["parent"]:
            stop_pipeline(conn, parent["parent"], status, error)


def stop_children(conn: redis.Redis, parent: dict) -> None:
    """Cancel a parent's children: queued ones now, running ones at their next batch or
    step (a distill step's rows leave the teacher loop at its next step); a child with
    children of its own is cancelled with them."""
    from workers.submit import cancel_rq_job, cancel_waiting_rq_job

    for child_id in parent["children"]:
        records.request_cancel(conn, child_id)
        if records.transition(conn, child_id, ("queued",), "cancelled", finished_at=time.time()):
            cancel_rq_job(conn, child_id)
        child = records.get(conn, child_id)
        if child and child["children"]:
            stop_children(conn, child)
            if records.transition(
                conn, child_id, ("running",), "cancelled", finished_at=time.time()
            ):
                cancel_waiting_rq_job(conn, child_id)


def write_report(
    parent: dict, prune: dict, distill: dict, evals: dict, summary: dict, artifacts: dict
) -> str:
    """A ``run`` artifact holding the pipeline's run folder and its report (HTML, markdown,
    plots), served at GET /v1/jobs/{id}/report."""
    from service.pipeline import write_run_dir
    from service.report import run_report

    store = ArtifactStore.from_settings()
    run_id = artifact_id_for("run", parent["id"])
    parents = [a for a in artifacts.values() if a]
    with store.create(
        "run", artifact_id=run_id, tenant=parent["tenant"], job_id=parent["id"], parents=parents
    ) as tmp:
        write_run_dir(tmp, parent["spec"], prune, distill, evals, summary)
        recovered = artifacts.get("recovered")
        if recovered:
            log = store.path("model", recovered) / "model" / "train_log.json"
            if log.is_file():
                (tmp / "recovered").mkdir(exist_ok=True)
                shutil.copy(log, tmp / "recovered" / "train_log.json")
        run_report(tmp, name=parent["id"])
    return run_id


def finish_pipeline(conn: redis.Redis, report_job: dict) -> str:
    """The pipeline's last step: gather the steps' results into the summary table."""
    from service.pipeline import build_summary, format_table

    parent = records.get(conn, report_job["parent"])
    steps = {c["step"]: c for c in (records.get(conn, cid) for cid in parent["children"]) if c}
    prune, distill, finetune = (steps[k]["metrics"] for k in ("prune", "distill", "finetune"))
    evals = {
        name: steps[f"evaluate {name}"]["metrics"] for name in ("baseline", "pruned", "recovered")
    }
    seconds = {
        name: round((c["finished_at"] or 0) - (c["started_at"] or 0), 1)
        for name, c in steps.items()
        if c["started_at"] and c["finished_at"]  # not the report itself: it is running
    }
    summary = build_summary(parent["spec"], prune, distill, finetune, evals, seconds)
    summary["table"] = format_table(summary)
    artifacts = {
        "pruned": steps["prune"]["artifacts"].get("model"),
        "distilled": steps["distill"]["artifacts"].get("dataset"),
        "recovered": steps["finetune"]["artifacts"].get("model"),
    }
    try:
        artifacts["report"] = write_report(parent, prune, distill, evals, summary, artifacts)
    except Exception as exc:  # the results stand without their report; say why
        records.add_event(conn, parent["id"], f"report not written: {exc}", level="warning")
    end(conn, report_job, "succeeded", metrics={"table": summary["table"]})
    records.transition(
        conn,
        parent["id"],
        ("queued", "running"),
        "succeeded",
        finished_at=time.time(),
        metrics=summary,
        artifacts=artifacts,
    )
    return "succeeded"
