"""The FastAPI application.

    distillery up                                  # Redis, this API, a teacher and a trainer worker
    REDIS_URL=redis://127.0.0.1:6379/0 uvicorn --factory api.app:create_app --port 8000

OpenAPI docs at /docs. Every /v1 route needs a bearer API key (``distillery keys create``).
"""

from __future__ import annotations

import redis
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from api import console, errors
from api.keys import add_key
from api.request_log import RequestLog
from api.routes import console as console_routes
from api.routes import datasets, distill, health, jobs, models
from service import logs
from service.settings import get_settings
from workers.connect import configured_url

DESCRIPTION = """Recover the quality of layer-pruned LLMs by self-data distillation.

Upload a dataset, submit jobs (`prune`, `distill`, `finetune`, `evaluate`, `merge`, or the
whole `pipeline`), follow them (poll, page through events, or stream them as Server-Sent
Events), and fetch their results. Authenticate with `Authorization: Bearer <API key>`.
Errors are `{"error": {"code", "message", "details", "error_id"}}`; the error id names the
failure in the server's log."""


def create_app(redis_url: str | None = None) -> FastAPI:
    url = redis_url or configured_url(get_settings().home_dir())
    if not url:
        raise RuntimeError("no Redis: set REDIS_URL, or run `distillery up`")
    # After uvicorn's own logging setup (a factory runs after it): one format for all.
    logs.configure()
    # /docs (Swagger UI) and /redoc load their JavaScript and CSS from this server (the
    # fastapi-offline package ships them) rather than from a CDN: clusters often have no
    # internet, and the API reference must render there too.
    app: FastAPI = FastAPIOffline(title="Distillery", version="1", description=DESCRIPTION)
    app.add_middleware(RequestLog)
    app.state.redis_url = url
    # One client (and pool) per process; redis-py's pool is thread-safe, and sync routes
    # run in FastAPI's threadpool. health_check_interval re-checks idle connections, so a
    # restarted Redis is picked up again without restarting the API.
    app.state.redis = redis.Redis.from_url(url, health_check_interval=30)
    admin_key = get_settings().admin_key
    if admin_key:
        if len(admin_key) < 24:
            raise RuntimeError("DISTILLERY_ADMIN_KEY is too short: use at least 24 characters")
        add_key(app.state.redis, admin_key, "admin", admin=True)
    # The hot, I/O-only paths (auth, job status) use an asyncio client instead, made on
    # first use in the server's event loop (api/deps.py), so they need no threadpool hop.
    errors.install(app)
    for module in (datasets, jobs, distill, models, health):
        app.include_router(module.router)
    console.install(app, console_routes.router)  # the web console at /ui
    return app
