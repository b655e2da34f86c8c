"""/v1/datasets: upload (multipart or application/x-ndjson), list, get, content, pages of
rows (through the index written with the dataset), per-reason counts, delete.

curl -H "Authorization: Bearer $KEY" -F file=@rows.jsonl http://127.0.0.1:8000/v1/datasets
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from api.datasets import owned, page, save_dataset
from api.deps import AllTenants, CallerDep, SettingsDep, StoreDep, TenantDep
from api.schemas import DatasetPublic, DatasetsPublic, DatasetStats, RowsPage
from service.row_index import counts, read_page

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

RAW_TYPES = ("application/x-ndjson", "application/jsonl", "application/json", "text/plain")
MULTIPART_SLACK = 64 * 1024  # boundaries and part headers around the file

UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "name": {"type": "string"},
                    },
                    "required": ["file"],
                }
            },
            "application/x-ndjson": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"upload larger than {limit} bytes (DISTILLERY_MAX_UPLOAD_MB)")


async def _read_capped(chunks, limit: int) -> bytes:
    data = bytearray()
    async for chunk in chunks:
        data += chunk
        if len(data) > limit:
            raise _too_large(limit)
    return bytes(data)


async def _file_chunks(upload: UploadFile, size: int = 1 << 20):
    while chunk := await upload.read(size):
        yield chunk


@router.post(
    "",
    status_code=201,
    summary="Upload a dataset (JSONL), validated line by line",
    openapi_extra=UPLOAD_DOC,
    responses={413: {"description": "Over the size limit"}, 422: {"description": "Bad rows"}},
)
async def upload_dataset(
    request: Request,
    tenant: TenantDep,
    store: StoreDep,
    settings: SettingsDep,
    name: Annotated[str | None, Query(max_length=200, description="A name to show.")] = None,
) -> DatasetPublic:
    limit = int(settings.max_upload_mb * 2**20)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + MULTIPART_SLACK:
        raise _too_large(limit)
    if ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(422, "multipart upload needs a 'file' part")
        data = await _read_capped(_file_chunks(upload), limit)
        field_name = form.get("name")
        name = name or (field_name if isinstance(field_name, str) else None) or upload.filename
    elif ctype in RAW_TYPES or not ctype:
        data = await _read_capped(request.stream(), limit)
    else:
        raise HTTPException(415, "send multipart/form-data (field 'file') or application/x-ndjson")
    default = "upload.json" if ctype == "application/json" else "upload.jsonl"
    manifest = await run_in_threadpool(save_dataset, store, tenant, data, name or default)
    return DatasetPublic.from_manifest(manifest)


@router.get("", summary="List datasets, newest first")
def list_datasets(
    caller: CallerDep,
    store: StoreDep,
    after: Annotated[
        str | None, Query(description="Cursor: the last id of the previous page.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    all_tenants: AllTenants = False,
) -> DatasetsPublic:
    items, more = page(store.list("dataset", tenant=caller.scope(all_tenants)), after, limit)
    data = [DatasetPublic.from_manifest(m) for m in items]
    return DatasetsPublic(data=data, has_more=more, next_cursor=data[-1].id if more else None)


@router.get("/{dataset_id}", summary="A dataset's metadata")
def get_dataset(dataset_id: str, tenant: TenantDep, store: StoreDep) -> DatasetPublic:
    return DatasetPublic.from_manifest(owned(store, "dataset", dataset_id, tenant))


@router.get(
    "/{dataset_id}/content",
    summary="The rows, as JSONL",
    response_class=FileResponse,
    responses={200: {"content": {"application/x-ndjson": {}}}},
)
def get_dataset_content(dataset_id: str, tenant: TenantDep, store: StoreDep) -> FileResponse:
    owned(store, "dataset", dataset_id, tenant)
    path = store.path("dataset", dataset_id) / "rows.jsonl"
    return FileResponse(path, media_type="application/x-ndjson", filename=f"{dataset_id}.jsonl")


@router.get(
    "/{dataset_id}/rows",
    summary="A page of rows (all, one reason's, or a text search), read through the index",
)
def get_dataset_rows(
    dataset_id: str,
    tenant: TenantDep,
    store: StoreDep,
    offset: Annotated[int, Query(ge=0, description="Rows of the selection to skip.")] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    reason: Annotated[
        str | None,
        Query(max_length=64, description="Only rows of this reason (ok, empty, truncated, ...)."),
    ] = None,
    q: Annotated[
        str | None,
        Query(max_length=200, description="Only rows with this text in a value (a scan)."),
    ] = None,
) -> RowsPage:
    owned(store, "dataset", dataset_id, tenant)
    return RowsPage.model_validate(read_page(store, dataset_id, offset, limit, reason, q))


@router.get("/{dataset_id}/stats", summary="Rows, and rows per reason (from the index)")
def get_dataset_stats(dataset_id: str, tenant: TenantDep, store: StoreDep) -> DatasetStats:
    owned(store, "dataset", dataset_id, tenant)
    return DatasetStats.model_validate(counts(store, dataset_id))


@router.delete("/{dataset_id}", status_code=204, summary="Delete a dataset")
def delete_dataset(dataset_id: str, tenant: TenantDep, store: StoreDep) -> Response:
    owned(store, "dataset", dataset_id, tenant)
    store.delete("dataset", dataset_id)
    return Response(status_code=204)
