"""Configuration in one place: every setting is an environment variable with the
``DISTILLERY_`` prefix (``DISTILLERY_HOME=/data distillery up``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.errors import DistilleryError

# The evaluation sets beside the project (../shared/data), when nothing else is named.
PROJECT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTILLERY_", extra="ignore")

    home: Path = Field(
        default=Path("~/.distillery"),
        description="Root of the artifact store: converted models, datasets, job outputs.",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis to use (also read from REDIS_URL). Unset: `distillery up` starts one.",
    )
    device: str = Field(
        default="auto", description="torch device for CPU/GPU work: auto, cpu, cuda, cuda:N."
    )
    threads: int | None = Field(
        default=None, description="torch intra-op threads; unset lets torch pick (all cores)."
    )
    eval_data: Path | None = Field(
        default=None,
        description="Folder holding the evaluation task files (arc_easy/, piqa/, ...); "
        "default ../shared/data beside the project when present.",
    )

    job_timeout: float = Field(
        default=86_400,
        description="Seconds a job may run before it is stopped (0 = no limit). Teacher jobs "
        "stop at their next batch, so the worker keeps its loaded engine.",
    )
    max_upload_mb: float = Field(
        default=512, gt=0, description="Largest dataset upload the API accepts, in MiB (413 above)."
    )
    max_dataset_rows: int = Field(
        default=1_000_000,
        gt=0,
        description="Most rows one uploaded dataset may hold (413 above).",
    )
    max_row_kb: float = Field(
        default=256,
        gt=0,
        description="Largest single row of an uploaded dataset, in KiB (422 naming the line).",
    )
    max_active_jobs: int = Field(
        default=100,
        gt=0,
        description="Unfinished (queued or running) jobs one tenant may have; a submission "
        "above it answers 429 with Retry-After.",
    )
    retry_after: int = Field(
        default=30, gt=0, description="Seconds the 429 of a full queue asks the client to wait."
    )
    cancel_grace: float = Field(
        default=15,
        ge=0,
        description="Seconds a cancelled trainer job gets to stop at its next step before "
        "its child process is terminated.",
    )
    admin_key: str | None = Field(
        default=None,
        repr=False,
        description="An admin API key the API registers (its hash) on start: the "
        "deployment's first key, from which tenants' keys can be made (docker-compose "
        "requires it). At least 24 characters.",
    )
    train_procs: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Processes a trainer worker starts for each finetune job: above 1 the "
        "job runs data parallel under torchrun, one process per GPU (gloo on CPU).",
    )

    # -- the vLLM teacher (service/teacher/vllm_engine.py) ------------------------------
    vllm_kv_cache_gib: float = Field(
        default=2,
        gt=0,
        description="KV cache of a vLLM teacher on CPU, in GiB (VLLM_CPU_KVCACHE_SPACE, when "
        "that is unset). 2 GiB holds ~46k fp32 tokens of the builtin model: ~100 rows of "
        "200 prompt + 256 new tokens decoding at once; more rows wait their turn.",
    )
    vllm_block_size: int | None = Field(
        default=None,
        ge=16,
        le=512,
        description="Tokens per KV-cache block of a vLLM teacher. Unset: 32 on a CPU (vLLM-CPU "
        "would take 128), vLLM's own choice on a GPU. Only whole blocks enter the prefix "
        "cache, so it is also the granularity at which a preempted row's prompt is found "
        "again (bench/preempt_cost.py).",
    )
    vllm_enforce_eager: bool | None = Field(
        default=None,
        description="Run vLLM without torch.compile. Unset: eager on a CPU, compiled on a "
        "GPU. On this 2-core CPU the compiled engine took 392-489 s to start (inductor; "
        "the cache under ~/.cache/vllm did not make the second start short) against "
        "~40 s eager, and decoded no faster (docs/performance.md).",
    )

    # -- the teacher tier (workers/teacher.py, workers/units.py, service/teacher/loop.py) --
    unit_rows: int = Field(
        default=16,
        ge=1,
        le=100_000,
        description="Rows per unit of distillation work: a teacher worker claims units of "
        "any job while its engine has room, so N workers serve one job together.",
    )
    unit_lease: float = Field(
        default=30,
        gt=0,
        description="Seconds a teacher worker's claim on a unit lasts without renewal (it "
        "renews every second); a dead worker's units are requeued after it.",
    )
    cache_rows: int = Field(
        default=100_000,
        ge=0,
        description="Rewrites kept in each tenant's rewrite cache (least recently used "
        "evicted first); 0 keeps none.",
    )
    interactive_max_rows: int = Field(
        default=64,
        ge=0,
        description="Largest request that runs as interactive (POST /v1/distill?wait=, or "
        "priority: interactive); a larger one runs as bulk.",
    )
    interactive_tenant_rows: int = Field(
        default=256,
        ge=0,
        description="Unfinished interactive rows one tenant may have; beyond it a new "
        "interactive request runs as bulk.",
    )
    teacher_max_rows: int | None = Field(
        default=None,
        ge=1,
        description="Rows a teacher worker keeps in its engine at once. Unset: the engine's "
        "own batch limit (vLLM's max_num_seqs).",
    )
    teacher_job_rows: int | None = Field(
        default=None,
        ge=1,
        description="Most rows one job may hold in a teacher worker's engine. Unset: "
        "teacher_max_rows (fair share still splits the room between jobs).",
    )
    teacher_bulk_while_interactive: int = Field(
        default=16,
        ge=0,
        description="Bulk rows a teacher worker keeps in its engine while interactive rows "
        "are in flight (the others step out, greedy ones keeping their tokens): on a CPU a "
        "step of a full batch costs several times a step of a few rows (the trade-off "
        "between interactive latency and bulk throughput is measured in "
        "docs/performance.md).",
    )

    # -- deployment (docs/deploy.md) ---------------------------------------------------
    store_url: str | None = Field(
        default=None,
        description="Object store holding the artifacts, as an fsspec URL (s3://bucket/prefix; "
        "needs the `s3` extra). Unset: artifacts live under home, which may be a shared "
        "filesystem path. Set: home is only this machine's cache of downloaded artifacts.",
    )
    store_options: dict[str, Any] = Field(
        default_factory=dict,
        description='fsspec storage options for store_url, as JSON (e.g. {"endpoint_url": '
        '"http://minio:9000"} for an S3-compatible server); credentials come from the usual '
        "AWS_* variables.",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="Log lines of the API and the workers: text, or one JSON object per line "
        "(with job_id and tenant where known) for a log shipper.",
    )
    log_level: str = Field(default="INFO", description="Logging level: DEBUG, INFO, WARNING...")

    def home_dir(self) -> Path:
        path = self.home.expanduser().resolve()  # a relative home: pieces start elsewhere
        path.mkdir(parents=True, exist_ok=True)
        return path


@lru_cache
def get_settings() -> Settings:
    return Settings()


def resolve_data_dir(data_dir: Path | None = None) -> Path:
    """The folder of task files: the argument, DISTILLERY_EVAL_DATA, or ../shared/data."""
    if data_dir is not None:
        return Path(data_dir).expanduser().resolve()
    configured = get_settings().eval_data
    if configured is not None:
        return Path(configured).expanduser().resolve()
    if PROJECT_DATA.is_dir():
        return PROJECT_DATA
    raise DistilleryError(
        "no evaluation data: pass --data-dir or set DISTILLERY_EVAL_DATA to the folder "
        f"holding arc_easy/, piqa/, ... (default {PROJECT_DATA} does not exist)"
    )
