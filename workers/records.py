"""Job records and their event streams, in Redis (the system of record).

One hash per job, ``distillery:job:<id>``: id, tenant, type, queue, spec, status,
progress, created/started/finished times, error (code, message, where), metrics,
artifact ids, parent and children (pipelines), cancel flag, attempts. JSON-valued fields
are stored as JSON text. Top-level jobs are indexed per tenant in a sorted set whose
members sort by creation time (``<microseconds>:<id>``), so cursor pagination is stable
while new jobs arrive.

Events (status changes, progress, warnings) go to a Redis stream per job,
``distillery:events:<id>``: ``XADD`` to append, ``XRANGE`` for pages after an event id,
``XREAD BLOCK`` for a live stream. A status change and its event are written by one Lua
script, so a reader never sees one without the other.

The API and the workers share this module; neither touches the keys directly. What is
written here is what clients read, so every field but the spec (which must rerun as it
was submitted) and every event pass through ``service.redact``: no server path reaches
a record, an event, a metric or an error (the full text stays in the server's log).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis

from service.redact import redact, redact_text
from workers import counters

PREFIX = "distillery"
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
JSON_FIELDS = ("spec", "progress", "error", "metrics", "artifacts", "children")
EVENTS_MAXLEN = 100_000  # approximate cap per job; progress events come at most once a second


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def events_key(job_id: str) -> str:
    return f"{PREFIX}:events:{job_id}"


def index_key(tenant: str) -> str:
    return f"{PREFIX}:jobs:{tenant}"


def new_job_id() -> str:
    return f"job_{uuid.uuid4().hex[:20]}"


def _dumps(v: Any) -> str:
    return json.dumps(v, default=str, separators=(",", ":"))


def _field(k: str, v: Any) -> str:
    """A record field as stored: JSON fields as JSON text; server paths hidden, except in
    the spec."""
    if k == "spec":
        return _dumps(v)
    if k in JSON_FIELDS or k == "data":  # "data": an event's
        return _dumps(redact(json.loads(_dumps(v))))
    return redact_text(str(v))


# KEYS: job hash, events stream, job counts hash, running set (workers/counters.py).
# ARGV: allowed from-statuses (JSON list), new status, event JSON data, maxlen, then
# field/value pairs to set. Returns 1 when it moved. The counts move with the status in
# the same script, so /metrics never sees a job in two statuses or in none.
_TRANSITION = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local cur = redis.call('HGET', KEYS[1], 'status')
local allowed = cjson.decode(ARGV[1])
local ok = false
for _, s in ipairs(allowed) do if s == cur then ok = true end end
if not ok then return 0 end
local typ = redis.call('HGET', KEYS[1], 'type') or ''
redis.call('HINCRBY', KEYS[3], typ .. '|' .. cur, -1)
redis.call('HINCRBY', KEYS[3], typ .. '|' .. ARGV[2], 1)
if ARGV[2] == 'running' then redis.call('SADD', KEYS[4], KEYS[1])
else redis.call('SREM', KEYS[4], KEYS[1]) end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'type', 'status', 'level', 'info',
           'message', ARGV[2], 'data', ARGV[3])
return 1
"""


def create(
    conn: redis.Redis,
    *,
    tenant: str,
    type: str,
    spec: dict,
    queue: str | None,
    parent: str | None = None,
    step: str | None = None,
    job_id: str | None = None,
    pipe: redis.client.Pipeline | None = None,
) -> dict:
    """Write a new queued record (and index it for its tenant when top-level)."""
    job_id = job_id or new_job_id()
    now = time.time()
    created_us = int(now * 1_000_000)
    doc = {
        "id": job_id,
        "tenant": tenant,
        "type": type,
        "queue": queue or "",
        "spec": _dumps(spec),
        "status": "queued",
        "progress": "{}",
        "created_at": repr(now),
        "created_us": str(created_us),
        "started_at": "",
        "finished_at": "",
        "error": "null",
        "metrics": "{}",
        "artifacts": "{}",
        "parent": parent or "",
        "step": step or "",
        "children": "[]",
        "cancel_requested": "0",
        "attempts": "0",
    }
    p = pipe if pipe is not None else conn.pipeline()
    p.hset(job_key(job_id), mapping=doc)
    p.hincrby(counters.JOBS_KEY, f"{type}|queued", 1)
    if not parent:
        p.zadd(index_key(tenant), {f"{created_us:017d}:{job_id}": 0})
        p.sadd(active_key(tenant), job_id)
    p.xadd(
        events_key(job_id),
        {"type": "status", "level": "info", "message": "queued", "data": "{}"},
        maxlen=EVENTS_MAXLEN,
        approximate=True,
    )
    if pipe is None:
        p.execute()
    return decode(doc)


def decode(raw: dict) -> dict:
    """Redis hash (str values) -> record dict with typed values."""
    doc: dict[str, Any] = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }
    for f in JSON_FIELDS:
        if f in doc:
            doc[f] = json.loads(doc[f]) if doc[f] else None
    for f in ("created_at", "started_at", "finished_at"):
        doc[f] = float(doc[f]) if doc.get(f) else None
    doc["created_us"] = int(doc.get("created_us") or 0)
    doc["attempts"] = int(doc.get("attempts") or 0)
    doc["cancel_requested"] = doc.get("cancel_requested") == "1"
    doc["parent"] = doc.get("parent") or None
    doc["step"] = doc.get("step") or None
    return doc


def get(conn: redis.Redis, job_id: str) -> dict | None:
    if not job_id.startswith("job_"):
        return None
    raw = conn.hgetall(job_key(job_id))
    return decode(raw) if raw else None


async def aget(aconn, job_id: str) -> dict | None:
    """``get`` on an asyncio client (the API's status route)."""
    if not job_id.startswith("job_"):
        return None
    raw = await aconn.hgetall(job_key(job_id))
    return decode(raw) if raw else None


async def aget_many(aconn, job_ids: list[str]) -> list[dict]:
    async with aconn.pipeline(transaction=False) as p:
        for jid in job_ids:
            p.hgetall(job_key(jid))
        raws = await p.execute()
    return [decode(raw) for raw in raws if raw]


def update(conn: redis.Redis, job_id: str, **fields: Any) -> None:
    """Set fields; JSON fields are serialised, others stored as text."""
    mapping = {k: _field(k, v) for k, v in fields.items()}
    conn.hset(job_key(job_id), mapping=mapping)


def transition(
    conn: redis.Redis,
    job_id: str,
    allowed: tuple[str, ...] | list[str],
    to: str,
    data: dict | None = None,
    **fields: Any,
) -> bool:
    """Atomically move status from one of ``allowed`` to ``to``, set ``fields`` and append
    a status event. False when the job was in another status (e.g. already cancelled)."""
    assert to in STATUSES
    args: list[str] = [_dumps(list(allowed)), to, _field("data", data or {}), str(EVENTS_MAXLEN)]
    for k, v in fields.items():
        args += [k, _field(k, v)]
    keys = (job_key(job_id), events_key(job_id), counters.JOBS_KEY, counters.RUNNING_KEY)
    moved = conn.eval(_TRANSITION, len(keys), *keys, *args)
    if moved == 1 and to in TERMINAL:
        counters.job_finished(conn, job_key(job_id), to)
    return moved == 1


def request_cancel(conn: redis.Redis, job_id: str) -> None:
    conn.hset(job_key(job_id), "cancel_requested", "1")


def cancel_requested(conn: redis.Redis, job_id: str) -> bool:
    return conn.hget(job_key(job_id), "cancel_requested") in (b"1", "1")


def get_type(conn: redis.Redis, job_id: str) -> str | None:
    t = conn.hget(job_key(job_id), "type")
    return t.decode() if isinstance(t, bytes) else t


def status(conn: redis.Redis, job_id: str) -> str | None:
    s = conn.hget(job_key(job_id), "status")
    return s.decode() if isinstance(s, bytes) else s


# -- events ---------------------------------------------------------------------------


def add_event(
    conn: redis.Redis,
    job_id: str,
    message: str,
    *,
    type: str = "log",
    level: str = "info",
    data: dict | None = None,
) -> str:
    eid = conn.xadd(
        events_key(job_id),
        {
            "type": type,
            "level": level,
            "message": redact_text(message),
            "data": _field("data", data or {}),
        },  # fmt: skip
        maxlen=EVENTS_MAXLEN,
        approximate=True,
    )
    return eid.decode() if isinstance(eid, bytes) else eid


def decode_event(eid: Any, fields: dict) -> dict:
    f = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }
    eid = eid.decode() if isinstance(eid, bytes) else eid
    return {
        "id": eid,
        "created_at": int(eid.split("-")[0]) / 1000.0,
        "type": f.get("type", "log"),
        "level": f.get("level", "info"),
        "message": redact_text(f.get("message", "")),  # an event written before redaction
        "data": redact(json.loads(f.get("data") or "{}")),
    }


def events(
    conn: redis.Redis, job_id: str, after: str | None = None, limit: int = 100
) -> tuple[list[dict], bool]:
    """Events after the event id ``after`` (exclusive), oldest first; and has_more."""
    start = f"({after}" if after else "-"
    raw = conn.xrange(events_key(job_id), min=start, max="+", count=limit + 1)
    items = [decode_event(eid, f) for eid, f in raw]
    return items[:limit], len(items) > limit


# -- listing --------------------------------------------------------------------------


def _scan_index(
    conn: redis.Redis, key: str, max_bound: str, limit: int, status: str | None, type: str | None
) -> list[dict]:
    """Up to ``limit`` matching records of one tenant index below ``max_bound``, newest
    first. Filters are applied while scanning in batches, so the result is full whenever
    enough matching jobs exist."""
    out: list[dict] = []
    batch = max(limit * 2, 50)
    while True:
        members = conn.zrevrangebylex(key, max_bound, "-", start=0, num=batch)
        if not members:
            return out
        ids = [(m.decode() if isinstance(m, bytes) else m).split(":", 1)[1] for m in members]
        p = conn.pipeline()
        for jid in ids:
            p.hgetall(job_key(jid))
        for raw in p.execute():
            if not raw:
                continue
            rec = decode(raw)
            if (status and rec["status"] != status) or (type and rec["type"] != type):
                continue
            out.append(rec)
            if len(out) == limit:
                return out
        last = members[-1].decode() if isinstance(members[-1], bytes) else members[-1]
        max_bound = f"({last}"
        if len(members) < batch:
            return out


def list_jobs(
    conn: redis.Redis,
    tenant: str | None,
    *,
    after: str | None = None,
    limit: int = 20,
    status: str | None = None,
    type: str | None = None,
) -> tuple[list[dict], bool]:
    """A tenant's top-level jobs (every tenant's when ``tenant`` is None: admin keys),
    newest first, after the job id ``after``; and has_more."""
    max_bound = "+"
    if after:
        rec = get(conn, after)
        if rec is None or (tenant is not None and rec["tenant"] != tenant):
            return [], False
        max_bound = f"({rec['created_us']:017d}:{after}"
    if tenant is not None:
        keys = [index_key(tenant)]
    else:
        keys = sorted(conn.scan_iter(match=index_key("*"), count=1000))
    found: list[dict] = []
    for key in keys:
        found += _scan_index(conn, key, max_bound, limit + 1, status, type)
    found.sort(key=lambda r: (r["created_us"], r["id"]), reverse=True)
    return found[:limit], len(found) > limit


def active_key(tenant: str) -> str:
    return f"{PREFIX}:active:{tenant}"


def count_active(conn: redis.Redis, tenant: str) -> int:
    """How many of ``tenant``'s top-level jobs are not finished (queued or running).
    Finished or vanished ones are dropped from the set as they are seen, so the set
    stays about as small as the limit it is checked against."""
    ids = [m.decode() if isinstance(m, bytes) else m for m in conn.smembers(active_key(tenant))]
    if not ids:
        return 0
    p = conn.pipeline()
    for jid in ids:
        p.hget(job_key(jid), "status")
    states = p.execute()
    done = [
        jid for jid, st in zip(ids, states, strict=True) if st is None or st.decode() in TERMINAL
    ]
    if done:
        conn.srem(active_key(tenant), *done)
    return len(ids) - len(done)
