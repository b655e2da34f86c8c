"""``GET /metrics``: Prometheus text format, built at scrape time from Redis.

    curl -s http://127.0.0.1:8000/metrics

The API does none of the work it reports on: jobs run in worker processes on any
machine. So nothing here counts in memory; :class:`DistilleryCollector` (a
prometheus-client custom collector) reads Redis on every scrape: the job counts,
durations and generated totals the workers keep (``workers/counters.py``), RQ's queues and
worker registrations, and the progress of running jobs. Any number of API replicas
answer the same figures. There are no tenant labels: the figures are the service's,
and tenants' ids would make the series unbounded.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator

import redis
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from workers import counters
from workers.lifecycle import queue_state


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


class DistilleryCollector(Collector):
    def __init__(self, conn: redis.Redis):
        self.conn = conn

    def collect(self) -> Iterator[Metric]:
        conn = self.conn
        jobs = GaugeMetricFamily(
            "distillery_jobs", "Job records by type and status.", labels=["type", "status"]
        )
        for field, n in sorted(conn.hgetall(counters.JOBS_KEY).items()):
            typ, status = _text(field).split("|", 1)
            jobs.add_metric([typ, status], int(n))
        yield jobs

        depth = GaugeMetricFamily(
            "distillery_queue_depth", "Jobs waiting in each RQ queue.", labels=["queue"]
        )
        running = GaugeMetricFamily(
            "distillery_queue_running", "Jobs a worker of each RQ queue holds.", labels=["queue"]
        )
        workers = GaugeMetricFamily(
            "distillery_workers",
            "Live workers listening on each queue (a dead one drops out after its heartbeat TTL).",
            labels=["queue"],
        )
        for name, q in queue_state(conn).items():
            depth.add_metric([name], q["queued"])
            running.add_metric([name], q["running"])
            workers.add_metric([name], q["workers"])
        yield depth
        yield running
        yield workers

        generated = {_text(k): int(v) for k, v in conn.hgetall(counters.GENERATED_KEY).items()}
        yield CounterMetricFamily(
            "distillery_generated_rows",
            "Rows written by succeeded distill jobs.",
            value=generated.get("rows", 0),
        )
        yield CounterMetricFamily(
            "distillery_generated_tokens",
            "Tokens the teacher generated for the rows of succeeded distill jobs.",
            value=generated.get("tokens", 0),
        )
        yield CounterMetricFamily(
            "distillery_prompt_tokens",
            "Prompt tokens the teacher read for the rows of succeeded distill jobs.",
            value=generated.get("prompt_tokens", 0),
        )
        yield CounterMetricFamily(
            "distillery_cached_rows",
            "Rows of succeeded distill jobs served from the rewrite cache (no engine call).",
            value=generated.get("cached_rows", 0),
        )
        yield self._tokens_per_second()
        yield self._durations()

    def _tokens_per_second(self) -> Metric:
        """The summed current rate of the running jobs that report one (distill jobs
        report the teacher's, finetune jobs the trainer's)."""
        keys = sorted(self.conn.smembers(counters.RUNNING_KEY))
        p = self.conn.pipeline(transaction=False)
        for key in keys:
            p.hmget(key, "type", "status", "progress")
        rates: dict[str, float] = defaultdict(float)
        for typ, status, progress in p.execute() if keys else []:
            if _text(status) != "running" or not progress:
                continue
            rate = json.loads(progress).get("tokens_per_s")
            if isinstance(rate, int | float):
                rates[_text(typ)] += rate
        g = GaugeMetricFamily(
            "distillery_tokens_per_second",
            "Tokens per second of the running jobs, by job type (teacher generation for "
            "distill, training throughput for finetune); rate(distillery_generated_tokens_total) "
            "gives the long-run generation rate.",
            labels=["type"],
        )
        for typ in sorted(set(rates) | {"distill"}):
            g.add_metric([typ], rates[typ])
        return g

    def _durations(self) -> Metric:
        h = HistogramMetricFamily(
            "distillery_job_duration_seconds",
            "Seconds from start to finish of jobs, by type and final status.",
            labels=["type", "status"],
        )
        raw = {_text(k): float(v) for k, v in self.conn.hgetall(counters.DURATIONS_KEY).items()}
        names = sorted({k.rsplit("|", 1)[0] for k in raw})
        for name in names:
            cumulative, buckets = 0.0, []
            for bound in [*map(float, counters.DURATION_BUCKETS), "+Inf"]:
                le = str(bound)
                cumulative += raw.get(f"{name}|{le}", 0.0)
                buckets.append((le, cumulative))
            h.add_metric(name.split("|", 1), buckets, raw.get(f"{name}|sum", 0.0))
        return h


def render(conn: redis.Redis) -> tuple[bytes, str]:
    """The exposition text and its content type. A registry per scrape: it holds only
    our collector, which keeps no state between scrapes."""
    registry = CollectorRegistry()
    registry.register(DistilleryCollector(conn))
    return generate_latest(registry), CONTENT_TYPE_LATEST
