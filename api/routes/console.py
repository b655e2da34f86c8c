"""/ui: the web console (api/console.py says how it is built and secured).

    distillery up        # then open http://127.0.0.1:8000/ui and paste the API key

Pages: jobs (live progress, cancel), a job (spec, steps, events, metrics, loss curve,
report), datasets and the distilled-dataset viewer (paged on the server through the row
index), models (lineage, file downloads), and a form to upload a dataset and start a job.
Each page calls the same service functions as the JSON routes.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Body, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import UploadFile

from api.console import (
    COOKIE,
    Session,
    SessionDep,
    close_session,
    open_session,
    progress_of,
    row_view,
    templates,
)
from api.datasets import owned, page, save_dataset
from api.deps import ARedisDep, RedisDep, SettingsDep, StoreDep
from api.downloads import file_response
from api.routes.jobs import create_job, job_public, load_job, stream_events
from api.routes.models import model_file_response, model_files
from api.schemas import DatasetPublic, JobCreate, ModelPublic
from service.errors import DistilleryError
from service.redact import redact_text
from service.row_index import counts, read_page
from workers import records
from workers.lifecycle import cancel

router = APIRouter(prefix="/ui", include_in_schema=False)
PAGE_ROWS = 20
JOB_TYPES = ("distill", "pipeline")  # what the form starts; the API takes every type
_JOB_BODY: TypeAdapter = TypeAdapter(Annotated[JobCreate, Body(discriminator="type")])


def render(request: Request, name: str, session: Session | None, status: int = 200, **ctx):
    ctx.update(session=session, path=request.url.path)
    return templates.TemplateResponse(request, name, ctx, status_code=status)


def check_csrf(session: Session, token: Any) -> None:
    if not isinstance(token, str) or token != session.csrf:
        raise HTTPException(403, "the form's CSRF token does not match this session")


def back(to: str) -> RedirectResponse:
    return RedirectResponse(to, status_code=303)


# -- session -----------------------------------------------------------------------------
@router.get("/login")
def login_page(request: Request, error: str | None = None) -> Response:
    return render(request, "login.html", None, error=error)


@router.post("/login")
async def login(request: Request, conn: ARedisDep) -> Response:
    form = await request.form()
    key = form.get("api_key")
    session = await open_session(conn, key.strip()) if isinstance(key, str) and key else None
    if session is None:
        return render(request, "login.html", None, 401, error="That API key is not valid.")
    response = back("/ui")
    # No max_age: a browser-session cookie. Path /ui: the JSON API never sees it.
    response.set_cookie(COOKIE, session.token, path="/ui", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")  # fmt: skip
    return response


@router.post("/logout")
async def logout(request: Request, session: SessionDep, conn: ARedisDep) -> Response:
    check_csrf(session, (await request.form()).get("csrf"))
    await close_session(conn, session.token)
    response = back("/ui/login")
    response.delete_cookie(COOKIE, path="/ui")
    return response


# -- jobs --------------------------------------------------------------------------------
@router.get("")
def jobs_page(request: Request, session: SessionDep, conn: RedisDep) -> Response:
    items, more = records.list_jobs(conn, session.tenant, limit=50)
    jobs = [job_public(conn, r) for r in items]
    rows = [{"job": j, "progress": progress_of(j)} for j in jobs]
    return render(request, "jobs.html", session, rows=rows, more=more)


@router.get("/jobs/{job_id}")
def job_page(job_id: str, request: Request, session: SessionDep, conn: RedisDep) -> Response:
    job = job_public(conn, load_job(conn, job_id, session.tenant))
    events, more = records.events(conn, job_id, limit=1000)
    losses = [
        [e["data"].get("step", i), e["data"]["loss"]]
        for i, e in enumerate(events)
        if e["type"] == "progress" and isinstance(e["data"].get("loss"), int | float)
    ]
    # Events are written at most once a second; the record holds the latest step too.
    latest = job.progress
    if isinstance(latest.get("loss"), int | float) and isinstance(latest.get("step"), int):
        if not losses or latest["step"] > losses[-1][0]:
            losses.append([latest["step"], latest["loss"]])
    return render(
        request, "job.html", session, job=job, progress=progress_of(job), events=events,
        more_events=more, losses=json.dumps(losses), spec=json.dumps(job.spec, indent=2),
        metrics=flat(job.metrics), usage=flat(job.progress),
    )  # fmt: skip


def flat(doc: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dicts as (dotted key, value) rows of a table."""
    out: list[tuple[str, str]] = []
    for k, v in (doc or {}).items():
        if isinstance(v, dict):
            out += flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v if isinstance(v, str) else json.dumps(v)))
    return out


@router.get("/jobs/{job_id}/events")
def job_events(
    job_id: str,
    request: Request,
    session: SessionDep,
    conn: RedisDep,
    after: Annotated[str | None, Query(pattern=r"^\d+-\d+$")] = None,
) -> Response:
    """The job's events after ``after`` as Server-Sent Events (on a reconnect the
    browser's Last-Event-ID goes first)."""
    load_job(conn, job_id, session.tenant)
    last = request.headers.get("last-event-id")
    if not (last and re.fullmatch(r"\d+-\d+", last)):
        last = after
    return StreamingResponse(
        stream_events(request.app.state.redis_url, job_id, last),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request, session: SessionDep, conn: RedisDep):
    form = await request.form()
    check_csrf(session, form.get("csrf"))
    rec = await run_in_threadpool(load_job, conn, job_id, session.tenant)
    try:
        await run_in_threadpool(cancel, conn, rec)
    except DistilleryError:
        pass  # it ended meanwhile: the page it goes back to says how
    to = form.get("next")
    return back(to if isinstance(to, str) and to.startswith("/ui") else f"/ui/jobs/{job_id}")


@router.get("/jobs/{job_id}/report")
def job_report(job_id: str, session: SessionDep, conn: RedisDep, store: StoreDep) -> Response:
    rec = load_job(conn, job_id, session.tenant)
    report = (rec.get("artifacts") or {}).get("report")
    if not report:
        raise HTTPException(404, f"job {job_id} has no report")
    text = redact_text((store.path("run", report) / "report.html").read_text())
    return Response(text, media_type="text/html; charset=utf-8")


@router.post("/jobs")
async def start_job(
    request: Request, session: SessionDep, conn: RedisDep, store: StoreDep
) -> Response:
    form = await request.form()
    check_csrf(session, form.get("csrf"))
    body: dict[str, Any] = {"type": form.get("type"), "dataset": form.get("dataset")}
    model = form.get("model")
    if isinstance(model, str) and model.strip():
        body["teacher" if body["type"] == "distill" else "model"] = model.strip()
    for field in ("max_new_tokens", "limit"):
        value = form.get(field)
        if isinstance(value, str) and value.strip():
            body[field] = value.strip()
    errors: list[str] = []
    extra = form.get("options")
    if isinstance(extra, str) and extra.strip():
        try:
            more = json.loads(extra)
            if not isinstance(more, dict):
                raise ValueError("not a JSON object")
            body.update(more)
        except ValueError as exc:
            errors.append(f"options: {exc}")
    if not errors:
        try:
            job_body = _JOB_BODY.validate_python(body)
            rec, _ = await run_in_threadpool(
                create_job, conn, store, session.tenant, job_body, None
            )
            return back(f"/ui/jobs/{rec['id']}")
        except ValidationError as exc:
            errors += [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}"
                       for e in exc.errors()]  # fmt: skip
        except (DistilleryError, HTTPException) as exc:
            errors.append(getattr(exc, "message", None) or str(getattr(exc, "detail", exc)))
    return await run_in_threadpool(
        lambda: new_page(request, session, store, status=422, errors=errors, form=dict(form))
    )


# -- datasets ----------------------------------------------------------------------------
def newest(store, kind: str, tenant: str, limit: int = 100) -> tuple[list[dict], bool]:
    """A tenant's newest artifacts of ``kind`` (manifests), and whether there are more."""
    return page(store.list(kind, tenant=tenant), None, limit)


@router.get("/datasets")
def datasets_page(request: Request, session: SessionDep, store: StoreDep) -> Response:
    items, more = newest(store, "dataset", session.tenant)
    return render(request, "datasets.html", session, more=more,
                  datasets=[DatasetPublic.from_manifest(m) for m in items])  # fmt: skip


@router.get("/datasets/{dataset_id}")
def dataset_page(
    dataset_id: str,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    reason: Annotated[str | None, Query(max_length=64)] = None,
    q: Annotated[str | None, Query(max_length=200)] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    ds = DatasetPublic.from_manifest(owned(store, "dataset", dataset_id, session.tenant))
    reason, q = reason or None, (q or "").strip() or None
    stats = counts(store, dataset_id)
    rows = read_page(store, dataset_id, offset, PAGE_ROWS, reason, q)
    views = [row_view(d["index"], d["row"]) for d in rows["data"]]

    def link(**changes: Any) -> str:
        params = {"reason": reason, "q": q, "offset": offset, **changes}
        return f"?{urlencode({k: v for k, v in params.items() if v not in (None, '', 0)})}"

    prev = max(offset - PAGE_ROWS, 0) if offset and not q else None
    nxt = rows["next_offset"]
    return render(
        request, "dataset.html", session, ds=ds, stats=stats, rows=views, reason=reason, q=q,
        offset=offset, total=rows["total"], distilled=any(v["rewrite"] is not None for v in views),
        prev_link=link(offset=prev) if prev is not None else None,
        next_link=link(offset=nxt) if nxt is not None else None,
        reason_link=lambda r: link(reason=r, offset=0),
    )  # fmt: skip


@router.get("/datasets/{dataset_id}/content")
def dataset_content(
    dataset_id: str, request: Request, session: SessionDep, store: StoreDep
) -> Response:
    owned(store, "dataset", dataset_id, session.tenant)
    entry = next(f for f in store.files("dataset", dataset_id) if f["name"] == "rows.jsonl")
    return file_response(request, store, "dataset", dataset_id, entry, "rows.jsonl")


@router.post("/datasets")
async def upload(
    request: Request, session: SessionDep, store: StoreDep, settings: SettingsDep
) -> Response:
    form = await request.form(max_files=1, max_fields=10)
    check_csrf(session, form.get("csrf"))
    file, name = form.get("file"), form.get("name")
    limit = int(settings.max_upload_mb * 2**20)
    errors: list[str] = []
    if not isinstance(file, UploadFile) or not file.filename:
        errors.append("choose a JSONL file to upload")
    else:
        data = await file.read(limit + 1)
        if len(data) > limit:
            errors.append(f"the file is larger than {limit} bytes (DISTILLERY_MAX_UPLOAD_MB)")
        else:
            try:
                label = name if isinstance(name, str) and name.strip() else file.filename
                m = await run_in_threadpool(save_dataset, store, session.tenant, data, label)
                return back(f"/ui/datasets/{m['id']}")
            except DistilleryError as exc:
                errors.append(exc.message)
                errors += [str(d) for d in (exc.details or {}).get("errors", [])[:20]]
    return await run_in_threadpool(
        lambda: new_page(request, session, store, status=422, upload_errors=errors)
    )


# -- models ------------------------------------------------------------------------------
@router.get("/models")
def models_page(request: Request, session: SessionDep, store: StoreDep) -> Response:
    items, more = newest(store, "model", session.tenant)
    return render(request, "models.html", session, more=more,
                  models=[ModelPublic.from_manifest(m) for m in items])  # fmt: skip


@router.get("/models/{model_id}")
def model_page(model_id: str, request: Request, session: SessionDep, store: StoreDep):
    manifest = owned(store, "model", model_id, session.tenant)
    model = ModelPublic.from_manifest(manifest, store.lineage(model_id))
    files = model_files(store, model_id, session.tenant)
    return render(request, "model.html", session, model=model, files=files,
                  base=str(request.base_url).rstrip("/"))  # fmt: skip


@router.get("/models/{model_id}/files/{name:path}")
def model_file(
    model_id: str, name: str, request: Request, session: SessionDep, store: StoreDep
) -> Response:
    return model_file_response(request, store, model_id, session.tenant, name)


# -- forms -------------------------------------------------------------------------------
def new_page(request: Request, session: Session, store, status: int = 200, **ctx) -> Response:
    items, _ = newest(store, "dataset", session.tenant)
    models, _ = newest(store, "model", session.tenant)
    ctx.setdefault("form", {})
    return render(request, "new.html", session, status, datasets=items, models=models,
                  job_types=JOB_TYPES, **ctx)  # fmt: skip


@router.get("/new")
def new(request: Request, session: SessionDep, store: StoreDep) -> Response:
    return new_page(request, session, store)
