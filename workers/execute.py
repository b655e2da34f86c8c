"""Run one job against its record: the part shared by the teacher worker (in-process,
with its cached engine) and the trainer's child process (``python -m workers.child``).

``execute`` moves the record queued → running (a cancelled job never starts), validates
the spec again, resolves inputs, calls the ``service`` run function with a
:class:`~workers.lifecycle.RecordReporter`, turns the products into artifacts and finishes
the record: succeeded (metrics, artifact ids), cancelled, or failed (code, message,
where, error id). Within a pipeline, a failed or cancelled step fails or cancels the pipeline and
its remaining steps; the last step (``report``) builds the summary table.

Distill jobs do not run here: the teacher loop runs them (``workers/teacher.py``) and
settles their records through ``workers.lifecycle`` the same way.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import redis

from service.errors import CancelledError, DistilleryError
from service.settings import get_settings
from service.specs import JOB_SPECS
from service.store import ArtifactStore
from workers import records
from workers.lifecycle import RecordReporter, end, error_doc, pipeline_of, start
from workers.outputs import artifact_id_for, register_outputs, resolve_job_refs, work_dir

log = logging.getLogger(__name__)
SPECS = dict(JOB_SPECS)


class StepFailed(Exception):
    """Raised to RQ after the record is marked failed, so RQ does not run dependents."""


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
    pipeline = pipeline_of(conn, job)
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


def finish_pipeline(conn: redis.Redis, report_job: dict) -> str:
    """The pipeline's last step: gather the steps' results (by the step names of
    ``service.steps``) into the summary table and the report."""
    from service.pipeline import build_summary, format_table
    from service.report import write_pipeline_report
    from service.steps import PRODUCTS

    parent = records.get(conn, report_job["parent"])
    steps = {c["step"]: c for c in (records.get(conn, cid) for cid in parent["children"]) if c}
    results = {name: c["metrics"] for name, c in steps.items() if name != "report"}
    seconds = {
        name: round((c["finished_at"] or 0) - (c["started_at"] or 0), 1)
        for name, c in steps.items()
        if c["started_at"] and c["finished_at"]  # not the report itself: it is running
    }
    summary = build_summary(parent["spec"], results, seconds)
    summary["table"] = format_table(summary)
    artifacts = {
        product: steps[step]["artifacts"].get(kind) for product, (step, kind) in PRODUCTS.items()
    }
    try:
        run_id = artifact_id_for("run", parent["id"])
        artifacts["report"] = write_pipeline_report(
            ArtifactStore.from_settings(), run_id, parent, results, summary, artifacts
        )
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
