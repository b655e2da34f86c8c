"""Typed dependencies: a route's signature reads like a sentence
(``def get_job(job_id: str, tenant: TenantDep, conn: RedisDep)``).

The dependencies are ``async`` and the key lookup uses the asyncio Redis client: a sync
dependency costs a hop to the threadpool per request, which dominated the time of a
status poll (bench/api_load.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated

import redis
import redis.asyncio as aredis
from fastapi import Depends, HTTPException, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.keys import alookup
from service import logs
from service.settings import Settings, get_settings
from service.store import ArtifactStore


async def settings() -> Settings:
    return get_settings()


SettingsDep = Annotated[Settings, Depends(settings)]


async def get_redis(request: Request) -> redis.Redis:
    return request.app.state.redis


RedisDep = Annotated[redis.Redis, Depends(get_redis)]


async def get_aredis(request: Request) -> aredis.Redis:
    """The app's asyncio client, made in (and bound to) the running event loop: a server
    has one loop, but a TestClient may start a new loop per request."""
    state = request.app.state
    loop = asyncio.get_running_loop()
    if getattr(state, "aredis_loop", None) is not loop:
        state.aredis = aredis.Redis.from_url(state.redis_url, health_check_interval=30)
        state.aredis_loop = loop
    return state.aredis


ARedisDep = Annotated[aredis.Redis, Depends(get_aredis)]


async def get_store(s: SettingsDep) -> ArtifactStore:
    return ArtifactStore.from_settings(s)


StoreDep = Annotated[ArtifactStore, Depends(get_store)]

_bearer = HTTPBearer(auto_error=False, description="An API key: `distillery keys create`.")


@dataclass(frozen=True)
class Caller:
    """Who is calling: the key's tenant, and whether the key is an admin key."""

    tenant: str
    admin: bool = False

    def scope(self, all_tenants: bool) -> str | None:
        """The tenant whose items a list route shows; None (every tenant) for an admin
        key that asks for ``?all=true`` (403 for any other key)."""
        if not all_tenants:
            return self.tenant
        if not self.admin:
            raise HTTPException(403, "?all=true needs an admin key")
        return None


async def get_caller(
    conn: ARedisDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The tenant owning the bearer key; 401 without a valid one."""
    if credentials is None or not credentials.credentials:
        raise HTTPException(
            401, "missing API key (Authorization: Bearer <key>)", {"WWW-Authenticate": "Bearer"}
        )
    tenant, admin = await alookup(conn, credentials.credentials)
    if tenant is None:
        raise HTTPException(401, "invalid API key", {"WWW-Authenticate": "Bearer"})
    logs.bind(tenant=tenant)  # the request's log line names the tenant
    return Caller(tenant, admin)


CallerDep = Annotated[Caller, Depends(get_caller)]


async def get_tenant(caller: CallerDep) -> str:
    return caller.tenant


TenantDep = Annotated[str, Depends(get_tenant)]

AllTenants = Annotated[
    bool,
    Query(
        alias="all",
        description="Admin keys only: list every tenant's items (403 for other keys).",
    ),
]
