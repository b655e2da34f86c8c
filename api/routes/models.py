"""/v1/models: the pruned, recovered and merged models of a tenant, with lineage."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.datasets import owned, page
from api.deps import AllTenants, CallerDep, StoreDep, TenantDep
from api.schemas import ModelPublic, ModelsPublic

router = APIRouter(prefix="/v1/models", tags=["models"])


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
