"""Typed dependencies: a route's signature reads like a sentence
(``def get_job(job_id: str, tenant: TenantDep, conn: RedisDep)``)."""

from __future__ import annotations

from typing import Annotated

import redis
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.settings import Settings, get_settings
from service.store import ArtifactStore
from workers.keys import tenant_for

SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_redis(request: Request) -> redis.Redis:
    return request.app.state.redis


RedisDep = Annotated[redis.Redis, Depends(get_redis)]


def get_store(settings: SettingsDep) -> ArtifactStore:
    return ArtifactStore(settings.home_dir())


StoreDep = Annotated[ArtifactStore, Depends(get_store)]

_bearer = HTTPBearer(auto_error=False, description="An API key: `distillery keys create`.")


def get_tenant(
    conn: RedisDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The tenant owning the bearer key; 401 without a valid one."""
    if credentials is None or not credentials.credentials:
        raise HTTPException(
            401, "missing API key (Authorization: Bearer <key>)", {"WWW-Authenticate": "Bearer"}
        )
    tenant = tenant_for(conn, credentials.credentials)
    if tenant is None:
        raise HTTPException(401, "invalid API key", {"WWW-Authenticate": "Bearer"})
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]
