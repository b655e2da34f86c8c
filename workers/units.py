"""Units of distillation work, in Redis: how rows of every job reach every teacher worker.

A distill job is registered here at submission (:func:`register`) with its row count. It
is never split up front: a teacher worker with room in its engine :func:`claim` s the next
*unit* (``DISTILLERY_UNIT_ROWS`` consecutive rows, carved when claimed, so a 1,000,000-row
job costs nothing until its rows are taken), holding it under a lease that it renews
(:func:`renew`) while the unit's rows are in its loop. Any number of workers on any
number of machines take units of one job; a job's rows can be in several workers at once.

Why not one RQ job per unit: an RQ worker executes one job at a time and tracks one
execution (one heartbeat) per worker, while a teacher worker holds many units of many jobs
in one engine loop, each needing its own lease. So units and their leases live here,
and RQ keeps what it does well for the rest of the system: each distill job has an RQ job
of the same id, created but never queued, that a pipeline's later steps depend on; the
worker that finishes the job marks it finished and has RQ enqueue the dependents
(``workers/teacher.py``, ``finish_rq_job``). What RQ would have given units, this gives
them the same way:

- **Abandoned work is requeued**: a lease not renewed for ``DISTILLERY_UNIT_LEASE``
  seconds (its worker died) is moved back by :func:`reap`, which every worker runs, to
  its job's retry list, taken before fresh rows; the worker that takes it generates only
  the rows not yet written.
- **Retries are bounded**: a unit requeued more than ``RETRIES`` times ends its job
  ``failed`` (``worker_lost``), as RQ's ``Retry(max=2)`` ends a job today.
- **Finished rows are durable at once and written once**: ``HSETNX`` on the job's row
  hash by row index (:func:`write_rows`, one pipeline per engine step, never one object
  per row in the store), so a row written twice by two workers is kept once.

Choosing a unit (:data:`_CLAIM`, one Lua script, atomic): interactive jobs first; then
the job whose tenant was served longest ago, and within a tenant the job served longest
ago (round-robin by tenant, then job, across all workers). A worker asks only for jobs
its loaded teacher can serve (the engine keys it accepts); an idle worker may take any job
and switches teacher (``workers/teacher.py``): a worker holds one teacher and dtype at a
time, and units of another teacher wait for a worker that holds it or one that is idle.

The rewrite cache (:func:`cache_get`, :func:`cache_put`) lives here too: per tenant, keyed
by a hash of teacher, engine, dtype, engine version, prompt and sampling, bounded by
``DISTILLERY_CACHE_ROWS`` entries per tenant (least recently used evicted first).
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from workers import records

P = f"{records.PREFIX}:teach"
RETRIES = 2  # a unit may be requeued this many times (RQ's Retry(max=2) for a job)


def tjob_key(job_id: str) -> str:
    return f"{P}:tjob:{job_id}"


def rows_key(job_id: str) -> str:
    return f"{P}:rows:{job_id}"


def usage_key(job_id: str) -> str:
    return f"{P}:usage:{job_id}"


def retry_key(job_id: str) -> str:
    return f"{P}:retry:{job_id}"


ACTIVE = {True: f"{P}:active:interactive", False: f"{P}:active:bulk"}
OPEN = f"{P}:open"  # every registered, unfinished job
WAKE = f"{P}:wake"  # a token per registration: an idle worker blocks on it, not polling
LEASES = f"{P}:leases"  # member "job|lo|hi|worker", score: expiry time


def engine_key(engine: str, teacher: str, dtype: str) -> str:
    return f"{engine}|{teacher}|{dtype}"


def register(
    pipe: redis.client.Pipeline,
    job_id: str,
    tenant: str,
    rows: int,
    unit_rows: int,
    interactive: bool,
    key: str,
) -> None:
    """Make job ``job_id``'s ``rows`` rows claimable (in the submission's pipeline)."""
    pipe.hset(
        tjob_key(job_id),
        mapping={
            "tenant": tenant,
            "total": rows,
            "next": 0,
            "unit_rows": max(1, unit_rows),
            "interactive": int(interactive),
            "engine_key": key,
        },
    )
    pipe.sadd(ACTIVE[interactive], job_id)
    pipe.sadd(OPEN, job_id)
    pipe.lpush(WAKE, job_id)
    pipe.ltrim(WAKE, 0, 63)


def wait_for_work(conn: redis.Redis, timeout: float) -> None:
    """Block an idle worker until a job is registered or ``timeout`` passes (one idle
    worker takes each token; the others find the work at their next timeout)."""
    conn.blpop([WAKE], timeout=timeout)


# ARGV: now, lease seconds, worker name, accepted engine keys (JSON list; empty: any),
# allow bulk (0/1). Returns {job, lo, hi} or nil. Terminal jobs (cancelled, failed) and
# jobs with nothing left to carve leave the active sets here.
_CLAIM = (
    """
local P = '__P__'
local accepted = cjson.decode(ARGV[4])
local accept = {}
for _, k in ipairs(accepted) do accept[k] = true end
local classes = {'interactive'}
if ARGV[5] == '1' then classes = {'interactive', 'bulk'} end
for _, class in ipairs(classes) do
  local active = P .. ':active:' .. class
  local best, bt, bj = nil, nil, nil
  for _, job in ipairs(redis.call('SMEMBERS', active)) do
    local meta = redis.call('HMGET', P .. ':tjob:' .. job, 'tenant', 'engine_key', 'total', 'next')
    local status = redis.call('HGET', '__J__' .. job, 'status')
    local terminal = status == 'succeeded' or status == 'failed' or status == 'cancelled'
    if meta[1] == false or terminal then
      redis.call('SREM', active, job)
    elseif #accepted == 0 or accept[meta[2]] then
      local retry = redis.call('LLEN', P .. ':retry:' .. job)
      if retry == 0 and tonumber(meta[4]) >= tonumber(meta[3]) then
        redis.call('SREM', active, job)
      else
        local tt = tonumber(redis.call('HGET', P .. ':tenant_tick', meta[1]) or '0')
        local jt = tonumber(redis.call('HGET', P .. ':job_tick', job) or '0')
        if best == nil or tt < bt or (tt == bt and jt < bj) then
          best, bt, bj = job, tt, jt
        end
      end
    end
  end
  if best then
    local tkey = P .. ':tjob:' .. best
    local unit = redis.call('LPOP', P .. ':retry:' .. best)
    local lo, hi
    if unit then
      local sep = string.find(unit, ':')
      lo = tonumber(string.sub(unit, 1, sep - 1))
      hi = tonumber(string.sub(unit, sep + 1))
    else
      local size = tonumber(redis.call('HGET', tkey, 'unit_rows'))
      local total = tonumber(redis.call('HGET', tkey, 'total'))
      lo = redis.call('HINCRBY', tkey, 'next', size) - size
      hi = math.min(lo + size, total)
    end
    local tick = redis.call('INCR', P .. ':tick')
    redis.call('HSET', P .. ':tenant_tick', redis.call('HGET', tkey, 'tenant'), tick)
    redis.call('HSET', P .. ':job_tick', best, tick)
    redis.call('ZADD', '__LEASES__', tonumber(ARGV[1]) + tonumber(ARGV[2]),
               best .. '|' .. lo .. '|' .. hi .. '|' .. ARGV[3])
    redis.call('HSETNX', P .. ':usage:' .. best, 'first_claim_at', ARGV[1])
    return {best, lo, hi}
  end
end
return nil
""".replace("__P__", P)
    .replace("__J__", f"{records.PREFIX}:job:")
    .replace("__LEASES__", LEASES)
)

# ARGV[1]: count the requeue as a retry (1) or not (0: a stopping worker handed the unit
# back); ARGV[2..]: lease members. Each member still leased goes back to its job's retry
# list (and the job back to its active set); returns [job, requeues of that unit] pairs.
_REQUEUE = """
local P = '__P__'
local out = {}
for i = 2, #ARGV do
  local member = ARGV[i]
  if redis.call('ZREM', '__LEASES__', member) == 1 then
    local a = string.find(member, '|', 1, true)
    local b = string.find(member, '|', a + 1, true)
    local c = string.find(member, '|', b + 1, true)
    local job = string.sub(member, 1, a - 1)
    local unit = string.sub(member, a + 1, b - 1) .. ':' .. string.sub(member, b + 1, c - 1)
    local tkey = P .. ':tjob:' .. job
    if redis.call('EXISTS', tkey) == 1 then
      redis.call('RPUSH', P .. ':retry:' .. job, unit)
      local class = 'bulk'
      if redis.call('HGET', tkey, 'interactive') == '1' then class = 'interactive' end
      redis.call('SADD', P .. ':active:' .. class, job)
      local attempts = tonumber(redis.call('HGET', tkey, 'requeued:' .. unit) or '0')
      if ARGV[1] == '1' then
        attempts = redis.call('HINCRBY', tkey, 'requeued:' .. unit, 1)
      end
      table.insert(out, job)
      table.insert(out, attempts)
    end
  end
end
return out
""".replace("__P__", P).replace("__LEASES__", LEASES)


def lease_member(job_id: str, lo: int, hi: int, worker: str) -> str:
    return f"{job_id}|{lo}|{hi}|{worker}"


def claim(
    conn: redis.Redis, worker: str, accepted: list[str], allow_bulk: bool, lease: float
) -> tuple[str, int, int] | None:
    got = conn.eval(
        _CLAIM, 0, repr(time.time()), repr(lease), worker, json.dumps(accepted), int(allow_bulk)
    )
    if not got:
        return None
    job, lo, hi = got
    return job.decode() if isinstance(job, bytes) else job, int(lo), int(hi)


def renew(conn: redis.Redis, members: list[str], lease: float) -> None:
    if members:
        conn.zadd(LEASES, {m: time.time() + lease for m in members}, xx=True)


def release(conn: redis.Redis, members: list[str], requeue: bool) -> None:
    """Drop leases: a finished unit's (``requeue`` False), or units a stopping worker
    hands back (``requeue`` True: at once, rather than when the lease lapses, and not
    counted as a retry)."""
    if not members:
        return
    if requeue:
        conn.eval(_REQUEUE, 0, 0, *members)
    else:
        conn.zrem(LEASES, *members)


def reap(conn: redis.Redis) -> dict[str, int]:
    """Requeue units whose lease lapsed (their worker died); {job: most requeues of one
    of its units}. Any worker runs it; two at once requeue each unit once."""
    expired = conn.zrangebyscore(LEASES, "-inf", repr(time.time()))
    if not expired:
        return {}
    out = conn.eval(_REQUEUE, 0, 1, *expired)
    found: dict[str, int] = {}
    for job, attempts in zip(out[::2], out[1::2], strict=True):
        job = job.decode() if isinstance(job, bytes) else job
        found[job] = max(found.get(job, 0), int(attempts))
    return found


def meta(conn: redis.Redis, job_id: str) -> dict[str, Any] | None:
    raw = conn.hgetall(tjob_key(job_id))
    if not raw:
        return None
    doc = {k.decode(): v.decode() for k, v in raw.items()}
    return {
        "tenant": doc["tenant"],
        "total": int(doc["total"]),
        "interactive": doc.get("interactive") == "1",
        "engine_key": doc.get("engine_key", ""),
    }


def written(conn: redis.Redis, job_id: str, indices: list[int]) -> set[int]:
    """Which of ``indices`` already have a durable row."""
    if not indices:
        return set()
    got = conn.hmget(rows_key(job_id), [str(i) for i in indices])
    return {i for i, v in zip(indices, got, strict=True) if v is not None}


def write_rows(conn: redis.Redis, by_job: dict[str, list[tuple[int, str, dict]]]) -> dict[str, int]:
    """Write finished rows ``{job: [(index, line, usage)]}`` in one round trip (HSETNX:
    the first write of a row wins) and add their usage; returns {job: rows done}."""
    pipe = conn.pipeline(transaction=False)
    now = repr(time.time())
    for job, items in by_job.items():
        for index, line, _ in items:
            pipe.hsetnx(rows_key(job), str(index), line)
        totals: dict[str, int] = {}
        for _, _, usage in items:
            for k, v in usage.items():
                totals[k] = totals.get(k, 0) + int(v)
        for k, v in totals.items():
            pipe.hincrby(usage_key(job), k, v)
        pipe.hsetnx(usage_key(job), "first_row_at", now)
        pipe.hlen(rows_key(job))
    res = pipe.execute()
    done, pos = {}, 0
    for job, items in by_job.items():
        pos += len(items) + len({k for _, _, u in items for k in u}) + 2
        done[job] = int(res[pos - 1])
    return done


def read_rows(conn: redis.Redis, job_id: str) -> dict[int, str]:
    """Every durable row of a job, {index: line} (HSCAN: no single huge reply)."""
    return {int(k): v.decode() for k, v in conn.hscan_iter(rows_key(job_id), count=1000)}


def usage(conn: redis.Redis, job_id: str) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in conn.hgetall(usage_key(job_id)).items()}


def forget(conn: redis.Redis, job_id: str) -> None:
    """A finished or ended job's unit state (its rows too: they are in the store now)."""
    pipe = conn.pipeline(transaction=False)
    for key in (tjob_key(job_id), rows_key(job_id), usage_key(job_id), retry_key(job_id)):
        pipe.delete(key)
    for active in ACTIVE.values():
        pipe.srem(active, job_id)
    pipe.srem(OPEN, job_id)
    pipe.hdel(f"{P}:job_tick", job_id)
    pipe.execute()


def open_jobs(conn: redis.Redis) -> list[str]:
    return sorted(m.decode() for m in conn.smembers(OPEN))


# -- the rewrite cache ----------------------------------------------------------------


def cache_key(tenant: str) -> str:
    return f"{P}:cache:{tenant}"


def cache_get(conn: redis.Redis, tenant: str, keys: list[str]) -> list[dict | None]:
    if not keys:
        return []
    got = conn.hmget(cache_key(tenant), keys)
    hits = {k: 1 for k, v in zip(keys, got, strict=True) if v is not None}
    if hits:
        conn.zadd(cache_key(tenant) + ":lru", {k: time.time() for k in hits})
    return [json.loads(v) if v is not None else None for v in got]


def cache_put(conn: redis.Redis, tenant: str, entries: dict[str, dict], max_rows: int) -> None:
    if not entries or max_rows <= 0:
        return
    lru = cache_key(tenant) + ":lru"
    pipe = conn.pipeline(transaction=False)
    pipe.hset(cache_key(tenant), mapping={k: json.dumps(v) for k, v in entries.items()})
    pipe.zadd(lru, {k: time.time() for k in entries})
    pipe.zcard(lru)
    size = pipe.execute()[-1]
    if size > max_rows:
        old = [m for m, _ in conn.zpopmin(lru, size - max_rows)]
        if old:
            conn.hdel(cache_key(tenant), *old)
