"""/v1/models: the pruned, recovered and merged models of a tenant, with lineage, and
their files for download (with Range support: a dropped download resumes).

    distillery models download mdl_... ./recovered/      # every file, hashes checked
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from api.datasets import owned, page
from api.deps import AllTenants, CallerDep, StoreDep, TenantDep
from api.downloads import file_response
from api.schemas import ModelFilePublic, ModelFilesPublic, ModelPublic, ModelsPublic
from service.store import ArtifactStore, NotFound

router = APIRouter(prefix="/v1/models", tags=["models"])

# A model artifact keeps the model in model/ (beside the job's result.json): the files a
# user downloads are those, named as from_pretrained expects them (config.json, ...).
MODEL_DIR = "model"


@router.get("", summary="List models, newest first")
def list_models(
    caller: CallerDep,
    store: StoreDep,
    after: Annotated[
        str | None, Query(description="Cursor: the last id of the previous page.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    all_tenants: AllTenants = False,
) -> ModelsPublic:
    items, more = page(store.list("model", tenant=caller.scope(all_tenants)), after, limit)
    data = [ModelPublic.from_manifest(m) for m in items]
    return ModelsPublic(data=data, has_more=more, next_cursor=data[-1].id if more else None)


@router.get("/{model_id}", summary="A model and its lineage")
def get_model(model_id: str, tenant: TenantDep, store: StoreDep) -> ModelPublic:
    manifest = owned(store, "model", model_id, tenant)
    return ModelPublic.from_manifest(manifest, store.lineage(model_id))


def model_files(store: ArtifactStore, model_id: str, tenant: str) -> list[dict]:
    owned(store, "model", model_id, tenant)
    return store.files("model", model_id, under=MODEL_DIR)


def model_file_response(
    request: Request, store: ArtifactStore, model_id: str, tenant: str, name: str
) -> Response:
    """One file of a tenant's model; ``name`` is matched against the manifest's list."""
    entry = next((f for f in model_files(store, model_id, tenant) if f["name"] == name), None)
    if entry is None:
        raise NotFound(f"model {model_id} has no file {name!r}")
    return file_response(request, store, "model", model_id, entry, f"{MODEL_DIR}/{name}")


@router.get("/{model_id}/files", summary="A model's files: names, sizes and sha256")
def list_model_files(model_id: str, tenant: TenantDep, store: StoreDep) -> ModelFilesPublic:
    files = model_files(store, model_id, tenant)
    return ModelFilesPublic(data=[ModelFilePublic(**f) for f in files])


@router.get(
    "/{model_id}/files/{name:path}",
    summary="Download one file of a model (Range requests resume a dropped download)",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {"description": "The requested byte range"},
        416: {"description": "The range is outside the file"},
    },
)
def get_model_file(
    model_id: str, name: str, request: Request, tenant: TenantDep, store: StoreDep
) -> Response:
    return model_file_response(request, store, model_id, tenant, name)
