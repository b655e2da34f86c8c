"""Sharded distillation: one distill job shared by any number of teacher workers.

A distill job with ``shards`` > 1 (or, with ``shards`` unset, more than ``shard_rows``
rows) is split at submission (``workers.submit``) into N shard records, children of the
job (type ``distill_shard``, step ``shard k/N``), each with an RQ job of the same id on
the ``teacher`` queue. A shard runs ``service.distill.run_distill`` with a
:class:`~service.specs.DistillShardSpec` on its contiguous range of rows
(``service.distill.shard_bounds``) into its own work folder. The job's own RQ job
depends on all its shards and is the gather step: it concatenates the shards' files in
shard order (= input order) into the job's output dataset (``gather``).

Shards are ordinary jobs for everything else, so the existing mechanisms apply to each:
a shard whose worker dies is requeued by RQ (``workers.jobs.on_rq_failure``) and resumes
from its own partial file; a shard that fails or is cancelled settles the job and
cancels its other shards (``workers.execute.stop_pipeline``); cancelling the job cancels
all its shards (``workers.submit.cancel``). A shard's progress is summed into the job's
record (:class:`ShardReporter`), and its events name the worker that ran it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import redis

from service.errors import DistilleryError
from service.specs import DistillSpec
from service.store import ArtifactStore, NotFound, is_artifact_id
from workers import records
from workers.reporter import RecordReporter

SHARD_TYPE = "distill_shard"


def dataset_rows(store: ArtifactStore, ref: str) -> int | None:
    """Rows of a dataset id, from its manifest; None when not known before the job runs
    (a file path, or a pipeline step's job id)."""
    if not is_artifact_id(ref) or not ref.startswith("ds_"):
        return None
    try:
        rows = store.manifest("dataset", ref).get("rows")
    except NotFound:
        return None
    return int(rows) if rows is not None else None


def shard_count(store: ArtifactStore | None, spec: DistillSpec) -> tuple[int, int | None]:
    """(shards, rows): ``spec.shards`` when set, else one shard per ``spec.shard_rows``
    rows; never more shards than rows when the row count is known."""
    rows = dataset_rows(store, spec.dataset) if store is not None else None
    if rows is not None and spec.limit is not None:
        rows = min(rows, spec.limit)
    if spec.shards is not None:
        n = spec.shards
    elif rows is None:
        n = 1
    else:
        n = math.ceil(rows / spec.shard_rows)
    if rows is not None:
        n = min(n, rows)
    return max(n, 1), rows


def shard_docs(doc: dict, n: int) -> list[dict]:
    """The shards' specs: the job's spec with ``shards`` fixed and the shard's position."""
    return [{**doc, "shards": n, "shard": k} for k in range(n)]


def create_shards(
    pipe: redis.client.Pipeline,
    tenant: str,
    parent_id: str,
    doc: dict,
    n: int,
    rows: int | None,
) -> list[tuple[str, dict]]:
    """Queue (in ``pipe``) the records of ``n`` shards of job ``parent_id`` and set the
    job's children and initial progress; return [(shard id, shard spec)]."""
    shards = [(records.new_job_id(), sdoc) for sdoc in shard_docs(doc, n)]
    for k, (sid, sdoc) in enumerate(shards):
        records.create(pipe, tenant=tenant, type=SHARD_TYPE, spec=sdoc, queue="teacher",
                       parent=parent_id, step=f"shard {k + 1}/{n}", job_id=sid, pipe=pipe)  # fmt: skip
    progress: dict[str, Any] = {"rows_done": 0, "shards": n, "shards_done": 0}
    if rows is not None:
        progress["rows_total"] = rows
    pipe.hset(
        records.job_key(parent_id),
        mapping={
            "children": json.dumps([sid for sid, _ in shards]),
            "progress": json.dumps(progress),
        },
    )
    return shards


# KEYS[1]: the job's hash; KEYS[2..]: its shards' hashes. ARGV[1]: updated_at.
# Sums the shards' rows, and the speed of those running, into the job's progress, in one
# step, so two shards writing at once cannot leave a stale sum behind.
_SUM_PROGRESS = """
local done, total, tps, finished = 0, 0, 0, 0
for i = 2, #KEYS do
  local raw = redis.call('HGET', KEYS[i], 'progress')
  local status = redis.call('HGET', KEYS[i], 'status')
  if raw and raw ~= '' then
    local p = cjson.decode(raw)
    done = done + (tonumber(p['rows_done']) or 0)
    total = total + (tonumber(p['rows_total']) or 0)
    if status == 'running' then tps = tps + (tonumber(p['tokens_per_s']) or 0) end
  end
  if status == 'succeeded' then finished = finished + 1 end
end
local raw = redis.call('HGET', KEYS[1], 'progress')
local cur = {}
if raw and raw ~= '' and raw ~= '{}' then cur = cjson.decode(raw) end
if (tonumber(cur['rows_total']) or 0) > total then total = tonumber(cur['rows_total']) end
cur['rows_done'] = done
cur['rows_total'] = total
cur['tokens_per_s'] = math.floor(tps * 10 + 0.5) / 10
cur['shards'] = #KEYS - 1
cur['shards_done'] = finished
cur['updated_at'] = tonumber(ARGV[1])
local out = cjson.encode(cur)
redis.call('HSET', KEYS[1], 'progress', out)
return out
"""


def sum_progress(conn: redis.Redis, parent_id: str, shard_ids: list[str]) -> dict:
    keys = [records.job_key(parent_id)] + [records.job_key(s) for s in shard_ids]
    out = conn.eval(_SUM_PROGRESS, len(keys), *keys, repr(time.time()))
    return json.loads(out)


class ShardReporter(RecordReporter):
    """A shard's reporter: its own record as usual, the sum over all shards in the job's
    record, and its events echoed to the job's stream (prefixed with the shard)."""

    def __init__(self, conn: redis.Redis, shard: dict, **kwargs: Any):
        super().__init__(conn, shard["id"], **kwargs)
        self.parent_id = shard["parent"]
        parent = records.get(conn, self.parent_id) or {}
        self.shard_ids = parent.get("children") or [shard["id"]]
        self.label = shard["step"] or shard["id"]

    def _write(self, now: float) -> None:
        emit = now - self._last_event >= self.event_every
        super()._write(now)
        doc = sum_progress(self.conn, self.parent_id, self.shard_ids)
        if emit:
            records.add_event(self.conn, self.parent_id, "progress", type="progress", data=doc)

    def event(self, message: str, level: str = "info", **data: Any) -> None:
        super().event(message, level=level, **data)
        records.add_event(self.conn, self.parent_id, f"{self.label}: {message}", level=level,
                          data={"shard": self.job_id, **data})  # fmt: skip


def gather(conn: redis.Redis, job: dict, home: Path, work: Path) -> dict:
    """The gather step of sharded job ``job``: its shards' rows, in order, into
    ``work/rows.jsonl``; returns the job's summary (``service.distill.gather_shards``)."""
    from service.distill import gather_shards

    shards = [records.get(conn, sid) for sid in job["children"]]
    unfinished = [sid for sid, s in zip(job["children"], shards, strict=True)
                  if s is None or s["status"] != "succeeded"]  # fmt: skip
    if unfinished:
        raise DistilleryError(f"shards not finished: {', '.join(unfinished)}")
    parts = [home / "jobs" / s["id"] / "rows.jsonl" for s in shards]
    summaries = [s["metrics"] for s in shards]
    started = job["started_at"] or time.time()
    return gather_shards(parts, summaries, work / "rows.jsonl", time.time() - started)


def remove_shard_outputs(home: Path, job: dict) -> None:
    """After a successful gather: the shards' work folders are no longer needed."""
    for sid in job["children"]:
        shutil.rmtree(home / "jobs" / sid, ignore_errors=True)
