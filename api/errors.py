"""Every error is JSON ``{"error": {"code", "message", "details", "error_id"}}``: the
service's own (``DistilleryError.code`` mapped to a status), FastAPI's validation errors,
Starlette's 404/405 and unexpected exceptions (500) alike.

A client reads no server internals: messages and details pass through
``service.redact`` (no server path), and an unexpected error answers only its error id;
its message, trace and the paths in them are logged under that id (a key of its own in
JSON logs), where an operator finds them."""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import DistilleryError, new_error_id
from service.redact import redact, redact_text

log = logging.getLogger(__name__)

STATUS_OF_CODE = {
    "invalid_dataset": 422,
    "invalid_spec": 422,
    "invalid_model": 422,
    "not_found": 404,
    "conflict": 409,
    "not_finished": 409,
    "cancelled": 409,
    "too_large": 413,
}
CODE_OF_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_jobs",
    503: "unavailable",
}


def error_response(
    status: int,
    code: str,
    message: str,
    details: object = None,
    headers: dict | None = None,
    error_id: str | None = None,
) -> JSONResponse:
    body = {
        "error": {
            "code": code,
            "message": redact_text(message),
            "details": redact(details),
            "error_id": error_id or new_error_id(),
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(DistilleryError)
    async def _service(request: Request, exc: DistilleryError) -> JSONResponse:
        status = STATUS_OF_CODE.get(exc.code, 400)
        error_id = new_error_id()
        log.info("%s %s: %s %s (error id %s)", request.method, request.url.path, status,
                 exc.message, error_id, extra={"error_id": error_id})  # fmt: skip
        return error_response(status, exc.code, exc.message, exc.details, error_id=error_id)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = CODE_OF_STATUS.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), None, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {
                "field": ".".join(str(x) for x in e.get("loc", ()) if x != "body") or None,
                "message": e.get("msg", ""),
                "type": e.get("type"),
            }
            for e in exc.errors()
        ]
        shown = "; ".join(f"{d['field']}: {d['message']}" for d in details[:5])
        kind = request.headers.get("content-type", "")
        whole = ("dict_type", "model_attributes_type", "model_type")
        if any(d["field"] is None and d["type"] in whole for d in details) and "json" not in kind:
            # The whole body failed: most often JSON sent without saying so.
            shown = f"the body must be a JSON object sent as application/json (got {kind or 'no Content-Type'})"
        return error_response(422, "invalid_request", f"invalid request: {shown}", details)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        error_id = new_error_id()
        log.error("%s %s failed (error id %s)", request.method, request.url.path, error_id,
                  exc_info=exc, extra={"error_id": error_id})  # fmt: skip
        return error_response(
            500,
            "internal",
            f"internal error; the server's log holds the details under error id {error_id}",
            error_id=error_id,
        )

    @app.exception_handler(redis.ConnectionError)
    async def _redis_down(request: Request, exc: redis.ConnectionError) -> JSONResponse:
        return error_response(503, "unavailable", "the job store (Redis) is unreachable")
