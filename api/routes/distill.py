"""POST /v1/distill: rows in, distilled rows back when done within ``?wait=`` seconds,
else 202 with the job (follow it at /v1/jobs/{id}; its rows at /v1/jobs/{id}/result).
With ``wait`` > 0 the job is interactive (its rows are admitted before bulk work) unless
the body says ``priority`` or the request is above the interactive caps.

    curl -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \\
         -d '{"rows": [{"instruction": "Name a colour.", "output": "Red."}]}' \\
         "http://127.0.0.1:8000/v1/distill?wait=60"
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated

from fastapi import APIRouter, Body, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api.datasets import save_dataset
from api.deps import RedisDep, StoreDep, TenantDep
from api.refs import check_api_refs
from api.routes.jobs import check_capacity, job_public
from api.schemas import DistillRequest, DistillResponse
from service.specs import DistillSpec
from workers import records
from workers.lifecycle import submit

router = APIRouter(tags=["distill"])
MAX_WAIT = 600.0


@router.post(
    "/v1/distill",
    summary="Distill rows, waiting up to ?wait= seconds for the result",
    response_model=DistillResponse,
    responses={202: {"model": DistillResponse, "description": "Not done yet: the job."}},
)
async def distill_rows(
    body: Annotated[DistillRequest, Body()],
    tenant: TenantDep,
    conn: RedisDep,
    store: StoreDep,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT, description="Seconds to wait.")] = 30.0,
) -> JSONResponse:
    options = check_api_refs(store, tenant, body.model_dump(exclude={"rows"}))
    await run_in_threadpool(check_capacity, conn, tenant)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in body.rows).encode()
    manifest = await run_in_threadpool(save_dataset, store, tenant, data, "distill-request.jsonl")
    if wait > 0 and "priority" not in body.model_fields_set:
        options["priority"] = "interactive"  # a caller waits on it: first, within the caps
    spec = DistillSpec(dataset=manifest["id"], **options)
    rec = await run_in_threadpool(submit, conn, store, tenant, "distill", spec)
    deadline = time.monotonic() + wait
    status = rec["status"]
    while status not in records.TERMINAL and time.monotonic() < deadline:
        await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        status = await run_in_threadpool(records.status, conn, rec["id"])
    rec = await run_in_threadpool(records.get, conn, rec["id"])
    rows = None
    if rec["status"] == "succeeded":
        path = store.path("dataset", rec["artifacts"]["dataset"]) / "rows.jsonl"
        text = await run_in_threadpool(path.read_text, encoding="utf-8")
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    done = rec["status"] in records.TERMINAL
    out = DistillResponse(job=job_public(conn, rec), rows=rows)
    return JSONResponse(out.model_dump(mode="json"), status_code=200 if done else 202)
