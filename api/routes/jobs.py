"""/v1/jobs: submit, list, get, events (pages or Server-Sent Events), result, cancel.

    curl -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \\
         -d '{"type": "distill", "dataset": "ds_...", "max_new_tokens": 64}' \\
         http://127.0.0.1:8000/v1/jobs
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

import redis
import redis.asyncio as aredis
from fastapi import APIRouter, Body, Header, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse

from api.deps import AllTenants, ARedisDep, CallerDep, RedisDep, StoreDep, TenantDep
from api.refs import check_api_refs
from api.schemas import (
    EventPublic,
    EventsPublic,
    JobCreate,
    JobPublic,
    JobsPublic,
    JobStatus,
    to_spec,
)
from service.errors import DistilleryError
from service.redact import redact_text
from service.report_render import inline_images
from service.settings import get_settings
from service.store import ArtifactStore, NotFound
from workers import records
from workers.lifecycle import body_hash, cancel, reserve_idempotency_key, submit

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


class NotFinished(DistilleryError):
    code = "not_finished"


def load_job(conn: redis.Redis, job_id: str, tenant: str) -> dict:
    """A tenant's job record; another tenant's job is simply not found."""
    rec = records.get(conn, job_id)
    if rec is None or rec["tenant"] != tenant:
        raise NotFound(f"no job {job_id!r}")
    return rec


def job_public(conn: redis.Redis, rec: dict) -> JobPublic:
    children = []
    if rec["children"]:
        p = conn.pipeline()
        for cid in rec["children"]:
            p.hgetall(records.job_key(cid))
        children = [records.decode(raw) for raw in p.execute() if raw]
    return JobPublic.from_record(rec, children)


def check_capacity(conn: redis.Redis, tenant: str) -> None:
    """429 with Retry-After when the tenant already has DISTILLERY_MAX_ACTIVE_JOBS
    unfinished jobs."""
    settings = get_settings()
    active = records.count_active(conn, tenant)
    if active >= settings.max_active_jobs:
        raise HTTPException(
            429,
            f"{active} unfinished jobs: the limit is {settings.max_active_jobs} per tenant "
            "(DISTILLERY_MAX_ACTIVE_JOBS); retry when some have finished",
            {"Retry-After": str(settings.retry_after)},
        )


def create_job(
    conn: redis.Redis, store: ArtifactStore, tenant: str, body, idempotency_key: str | None
) -> tuple[dict, bool]:
    """(record, created): one Idempotency-Key and body always give the same job."""
    job_type, spec = to_spec(body)
    spec = type(spec).model_validate(check_api_refs(store, tenant, spec.model_dump(mode="json")))
    if not idempotency_key:
        check_capacity(conn, tenant)
        return submit(conn, store, tenant, job_type, spec), True
    job_id, is_new = reserve_idempotency_key(
        conn, tenant, idempotency_key, body_hash(job_type, spec)
    )
    if not is_new:
        rec = records.get(conn, job_id)
        if rec is not None:
            return rec, False
    check_capacity(conn, tenant)  # a replay is answered above, whatever the queue holds
    return submit(conn, store, tenant, job_type, spec, job_id=job_id), True


@router.post(
    "",
    status_code=202,
    summary="Submit a job",
    responses={
        409: {"description": "Idempotency-Key reused with another body"},
        422: {"description": "Invalid spec or reference"},
        429: {"description": "Too many unfinished jobs; see Retry-After"},
    },
)
def post_job(
    body: Annotated[JobCreate, Body(discriminator="type")],
    response: Response,
    tenant: TenantDep,
    conn: RedisDep,
    store: StoreDep,
    idempotency_key: Annotated[
        str | None,
        Header(max_length=255, description="Same key and body: the same job; other body: 409."),
    ] = None,
) -> JobPublic:
    rec, created = create_job(conn, store, tenant, body, idempotency_key)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return job_public(conn, rec)


@router.get("", summary="List jobs, newest first")
def list_jobs(
    caller: CallerDep,
    conn: RedisDep,
    after: Annotated[
        str | None,
        Query(
            pattern=r"^job_[0-9a-f]{16,32}$",  # garbage is a 422, as for events' ?after=
            description="Cursor: the last id of the previous page.",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    status: JobStatus | None = None,
    type: Annotated[str | None, Query(max_length=32)] = None,
    all_tenants: AllTenants = False,
) -> JobsPublic:
    items, more = records.list_jobs(
        conn, caller.scope(all_tenants), after=after, limit=limit, status=status, type=type
    )
    data = [job_public(conn, r) for r in items]
    return JobsPublic(data=data, has_more=more, next_cursor=data[-1].id if more and data else None)


@router.get("/{job_id}", summary="A job: status, progress, metrics, error, artifacts")
async def get_job(job_id: str, tenant: TenantDep, aconn: ARedisDep) -> JobPublic:
    # async all the way: this is the route pollers hit (bench/api_load.py)
    rec = await records.aget(aconn, job_id)
    if rec is None or rec["tenant"] != tenant:
        raise NotFound(f"no job {job_id!r}")
    children = await records.aget_many(aconn, rec["children"]) if rec["children"] else []
    return JobPublic.from_record(rec, children)


@router.post("/{job_id}/cancel", summary="Cancel queued or running work")
def cancel_job(job_id: str, tenant: TenantDep, conn: RedisDep) -> JobPublic:
    return job_public(conn, cancel(conn, load_job(conn, job_id, tenant)))


@router.get(
    "/{job_id}/result",
    summary="A finished job's output: JSONL rows (distill) or JSON",
    responses={200: {"content": {"application/x-ndjson": {}, "application/json": {}}}},
)
def get_result(
    job_id: str,
    tenant: TenantDep,
    conn: RedisDep,
    store: StoreDep,
    partial: Annotated[
        bool,
        Query(
            description="distill: while the job runs, the rows finished so far (JSONL, in "
            "input order, each with its input position in `index`)."
        ),
    ] = False,
) -> Response:
    rec = load_job(conn, job_id, tenant)
    if partial and rec["type"] == "distill" and rec["status"] in ("queued", "running"):
        from service.distill import Finished
        from workers import units

        lines = units.read_rows(conn, job_id)
        body = "".join(
            json.dumps({"index": i, **Finished.from_json(lines[i]).row}, ensure_ascii=False) + "\n"
            for i in sorted(lines)
        )
        return Response(body, media_type="application/x-ndjson")
    if rec["status"] != "succeeded":
        raise NotFinished(f"job {job_id} is {rec['status']}", {"status": rec["status"]})
    if rec["type"] == "distill":
        path = store.path("dataset", rec["artifacts"]["dataset"]) / "rows.jsonl"
        return FileResponse(path, media_type="application/x-ndjson", filename=f"{job_id}.jsonl")
    body = {
        "id": job_id,
        "type": rec["type"],
        "metrics": rec["metrics"],
        "artifacts": rec["artifacts"],
    }
    return Response(json.dumps(body, default=str), media_type="application/json")


@router.get(
    "/{job_id}/report",
    summary="A finished pipeline's report: self-contained HTML (?format=md for markdown)",
    responses={200: {"content": {"text/html": {}, "text/markdown": {}}}},
)
def get_report(
    job_id: str,
    tenant: TenantDep,
    conn: RedisDep,
    store: StoreDep,
    format: Annotated[str, Query(pattern="^(html|md)$")] = "html",
) -> Response:
    rec = load_job(conn, job_id, tenant)
    report = (rec.get("artifacts") or {}).get("report")
    if rec["type"] != "pipeline" or rec["status"] != "succeeded" or not report:
        raise NotFinished(
            f"job {job_id} has no report (pipeline jobs get one when they succeed)",
            {"status": rec["status"], "type": rec["type"]},
        )
    folder = store.path("run", report)
    # The report lists each step's spec as the run wrote it, paths on the server included.
    text = redact_text((folder / f"report.{format}").read_text())
    if format == "md":  # its figures inline: a client cannot fetch files beside it
        return Response(inline_images(text, folder), media_type="text/markdown; charset=utf-8")
    return Response(text, media_type="text/html; charset=utf-8")


@router.get(
    "/{job_id}/events",
    summary="Events: a page (?after=) or, with Accept: text/event-stream, a live stream",
    responses={200: {"content": {"text/event-stream": {}}}},
)
def get_events(
    job_id: str,
    request: Request,
    tenant: TenantDep,
    conn: RedisDep,
    after: Annotated[str | None, Query(pattern=r"^\d+-\d+$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    last_event_id: Annotated[str | None, Header(pattern=r"^\d+-\d+$")] = None,
) -> Response:
    load_job(conn, job_id, tenant)
    if "text/event-stream" in request.headers.get("accept", ""):
        return StreamingResponse(
            stream_events(request.app.state.redis_url, job_id, last_event_id or after),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    items, more = records.events(conn, job_id, after=after, limit=limit)
    page = EventsPublic(
        data=[EventPublic(**e) for e in items],
        has_more=more,
        next_cursor=items[-1]["id"] if items else after,
    )
    return Response(page.model_dump_json(), media_type="application/json")


def sse(event: dict) -> str:
    return f"id: {event['id']}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"


async def stream_events(
    url: str, job_id: str, after: str | None, block_ms: int = 5000
) -> AsyncIterator[str]:
    """Replay events after ``after``, then follow live ones (XREAD BLOCK) until the job
    ends. A comment line every ``block_ms`` keeps proxies from closing an idle stream."""
    # redis-py's default 5 s socket timeout would cut a blocking XREAD short.
    conn = aredis.Redis.from_url(url, socket_timeout=block_ms / 1000 + 10)
    key = records.events_key(job_id)
    cursor = after or "0-0"
    try:
        while True:
            got = await conn.xread({key: cursor}, block=block_ms, count=100)
            if not got:
                state = await conn.hget(records.job_key(job_id), "status")
                if state is None or state.decode() in records.TERMINAL:
                    return  # ended before this reader's cursor, or the record is gone
                yield ": keep-alive\n\n"
                continue
            for eid, fields in got[0][1]:
                event = records.decode_event(eid, fields)
                cursor = event["id"]
                yield sse(event)
                if event["type"] == "status" and event["message"] in records.TERMINAL:
                    return
    finally:
        await conn.aclose()
