"""The web console's plumbing: its session, its security headers and the views its pages
render (routes in ``api/routes/console.py``, templates in ``api/templates/``).

Front end: server-rendered Jinja2 templates and one small script (``api/static/``), the
smallest approach that does the job. Every page is a plain HTML document the API renders
from the same ``service``/``workers`` calls its JSON routes make, so there is nothing to
build, no bundle and lock file to keep, and no CDN or download at run time (the console
must work on an offline cluster, as /docs does). The script only adds what HTML cannot:
live progress over Server-Sent Events and the loss curve.

Session: a browser cannot send ``Authorization: Bearer`` on an ``EventSource``, so the
console signs in once with an API key (POST /ui/login) and gets a random session token
in a cookie scoped to ``/ui`` (HttpOnly, SameSite=Strict, no expiry: it ends with the
browser session; Redis forgets it after ``SESSION_TTL`` idle seconds). Redis maps the
token to the key's hash, which is checked again on every request, so revoking the key
ends its sessions. The key itself is never stored in the browser. The API's own bearer
auth is unchanged; the cookie is not accepted outside /ui. Forms carry a per-session CSRF
token as well (SameSite already keeps other sites' posts out; the token covers old
browsers).

Every response under /ui carries a Content-Security-Policy allowing only this origin's
scripts and styles (no inline script), and rows are user data: Jinja's autoescape
escapes every value, and the diff marks are built as (kind, text) pairs, never as HTML.
"""

from __future__ import annotations

import difflib
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import redis.asyncio as aredis
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from api.deps import ARedisDep
from api.keys import KEYS_HASH, hash_key
from service.datasets import Row, normalise

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=HERE / "templates")  # autoescape on for .html

COOKIE = "distillery_ui"
SESSION_TTL = 12 * 3600
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-src 'self'; frame-ancestors 'self'; "
    "base-uri 'none'"
)
# The pipeline report is a self-contained HTML file with its own <style> and data: images,
# shown in a sandboxed frame: no script at all.
REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; sandbox"


class LoginRequired(Exception):
    """A console page without a valid session: the browser goes to /ui/login."""


@dataclass(frozen=True)
class Session:
    token: str
    tenant: str
    csrf: str


def session_key(token: str) -> str:
    return f"distillery:ui:session:{token}"


async def open_session(conn: aredis.Redis, api_key: str) -> Session | None:
    """A new session for a valid API key; None for an unknown key."""
    digest = hash_key(api_key)
    tenant = await conn.hget(KEYS_HASH, digest)
    if tenant is None:
        return None
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
    await conn.hset(session_key(token), mapping={"digest": digest, "csrf": csrf})
    await conn.expire(session_key(token), SESSION_TTL)
    return Session(token, tenant.decode(), csrf)


async def close_session(conn: aredis.Redis, token: str | None) -> None:
    if token:
        await conn.delete(session_key(token))


async def get_session(request: Request, conn: ARedisDep) -> Session:
    token = request.cookies.get(COOKIE)
    if not token or len(token) > 100:
        raise LoginRequired()
    async with conn.pipeline(transaction=False) as p:
        p.hgetall(session_key(token))
        p.expire(session_key(token), SESSION_TTL)  # idle time counts from the last page
        raw, _ = await p.execute()
    if not raw:
        raise LoginRequired()
    tenant = await conn.hget(KEYS_HASH, raw[b"digest"])
    if tenant is None:  # the key was revoked: so is the session
        await conn.delete(session_key(token))
        raise LoginRequired()
    return Session(token, tenant.decode(), raw[b"csrf"].decode())


SessionDep = Annotated[Session, Depends(get_session)]


class SecurityHeaders:
    """Pure ASGI middleware (it leaves streamed responses alone, as Server-Sent Events
    need): the CSP and friends on every response under /ui."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/ui" or path.startswith("/ui/")):
            return await self.app(scope, receive, send)
        csp = REPORT_CSP if path.endswith("/report") else CSP

        async def with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", csp.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin"),
                    (b"cache-control", b"no-store"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


def install(app: FastAPI, router: APIRouter) -> None:
    """The console's routes, its static files, its headers; a page without a session
    sends the browser to the sign-in form."""
    app.add_middleware(SecurityHeaders)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")
    app.include_router(router)

    @app.exception_handler(LoginRequired)
    async def _login(request: Request, exc: LoginRequired) -> RedirectResponse:
        return RedirectResponse("/ui/login", status_code=303)


# -- what the pages show -----------------------------------------------------------------
_TOKEN = re.compile(r"\s+|\w+|[^\w\s]")


def diff(before: str, after: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Word-level differences: (the original's segments, the rewrite's segments), each
    a list of (kind, text) with kind "same", "del" (only in the original) or "ins" (only
    in the rewrite). difflib's SequenceMatcher over words and spaces."""
    a, b = _TOKEN.findall(before or ""), _TOKEN.findall(after or "")
    left: list[tuple[str, str]] = []
    right: list[tuple[str, str]] = []
    sm = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == "equal":
            left.append(("same", "".join(a[i1:i2])))
            right.append(("same", "".join(b[j1:j2])))
        else:
            if i2 > i1:
                left.append(("del", "".join(a[i1:i2])))
            if j2 > j1:
                right.append(("ins", "".join(b[j1:j2])))
    return left, right


def row_view(index: int, obj: dict) -> dict:
    """What the viewer shows of one row: instruction, original response and rewrite (a
    distilled row's; the kept one, or the rejected rewrite), the differences, the
    reason. Rows of an uploaded dataset show their instruction and response."""
    parsed, _ = normalise(obj, index + 1)
    instruction = parsed.instruction if isinstance(parsed, Row) else json.dumps(obj)[:2000]
    reason = obj.get("reason") if isinstance(obj.get("reason"), str) else None
    original = obj.get("original_response")
    if original is None:
        response = parsed.response if isinstance(parsed, Row) else ""
        return {"index": index, "instruction": instruction, "reason": reason,
                "original": [("same", response)], "rewrite": None}  # fmt: skip
    rewrite = obj.get("response") if obj.get("distilled") else obj.get("rejected_rewrite")
    left, right = diff(str(original), str(rewrite or ""))
    return {"index": index, "instruction": instruction, "reason": reason, "original": left,
            "rewrite": right, "kept": "rewrite" if obj.get("distilled") else "original"}  # fmt: skip


def progress_of(job: Any) -> dict[str, Any]:
    """(done, total, label) of a job's progress record, for a progress bar."""
    p = job.progress or {}
    for done, total in (("rows_done", "rows_total"), ("step", "steps_total")):
        if isinstance(p.get(total), int | float) and p.get(total):
            return {"done": p.get(done) or 0, "total": p[total], "label": f"{p.get(done) or 0}/{p[total]}"}  # fmt: skip
    if job.status == "succeeded":
        return {"done": 1, "total": 1, "label": "done"}
    return {"done": 0, "total": 1, "label": ""}
