"""/healthz (the process answers) and /readyz (Redis answers, each queue has a live worker).

/metrics (Prometheus) belongs beside these; it comes with its own issue.
"""

from __future__ import annotations

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from rq import Queue, Worker

from api.deps import RedisDep
from api.schemas import Readiness
from workers.submit import QUEUES

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness")
def healthz() -> dict:
    return {"status": "ok"}


def readiness(conn: redis.Redis) -> Readiness:
    try:
        conn.ping()
    except redis.RedisError:
        return Readiness(ready=False, redis=False)
    queues = {}
    for name in QUEUES:
        q = Queue(name, connection=conn)
        # Worker.all skips workers whose key expired: one that died stops counting after
        # its heartbeat TTL (workers/worker.py), one that stopped cleanly at once.
        queues[name] = {"workers": len(Worker.all(queue=q)), "queued": q.count}
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
