"""/healthz (the process answers), /readyz (Redis answers, each queue has a live worker)
and /metrics (Prometheus text format, read from Redis at scrape time: api/metrics.py).
Like the other two, /metrics needs no key: it carries no tenant's data, only the
service's totals; keep it off the public network (docs/deploy.md).
"""

from __future__ import annotations

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from api import metrics as prom
from api.deps import RedisDep
from api.schemas import Readiness
from workers.lifecycle import queue_state

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness")
def healthz() -> dict:
    return {"status": "ok"}


def readiness(conn: redis.Redis) -> Readiness:
    try:
        conn.ping()
    except redis.RedisError:
        return Readiness(ready=False, redis=False)
    queues = {
        name: {"workers": q["workers"], "queued": q["queued"]}
        for name, q in queue_state(conn).items()
    }
    ready = all(v["workers"] > 0 for v in queues.values())
    return Readiness(ready=ready, redis=True, queues=queues)


@router.get(
    "/readyz",
    summary="Readiness: Redis reachable and a live worker on every queue",
    responses={503: {"model": Readiness}},
)
def readyz(conn: RedisDep) -> JSONResponse:
    r = readiness(conn)
    return JSONResponse(r.model_dump(), status_code=200 if r.ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics: jobs, queues, workers, generated rows and tokens, durations",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
def metrics(conn: RedisDep) -> Response:
    body, content_type = prom.render(conn)
    return Response(body, media_type=content_type)
