"""One log line per HTTP request: method, path, status, milliseconds, and the tenant and
job id when the request has them (``service/logs.py``; JSON with
``DISTILLERY_LOG_FORMAT=json``).

A plain ASGI middleware rather than Starlette's ``BaseHTTPMiddleware``: that one runs the
app in a task of its own, and values the route learns would not come back to it. Here
the app runs in this coroutine's context: the auth dependency binds the tenant into the
dict this middleware opened, and the router leaves the path parameters (``job_id``) in
the shared ``scope``.
"""

from __future__ import annotations

import logging
import time

from service import logs

log = logging.getLogger("distillery.api")


class RequestLog:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # unless a response starts
        t0 = time.perf_counter()

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with logs.context() as ctx:
            try:
                await self.app(scope, receive, send_status)
            finally:
                job_id = (scope.get("path_params") or {}).get("job_id")
                if job_id:
                    ctx["job_id"] = job_id
                log.info(
                    "%s %s %d",
                    scope["method"],
                    scope["path"],
                    status,
                    extra={"status": status, "ms": round((time.perf_counter() - t0) * 1000, 1)},
                )
