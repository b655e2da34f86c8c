"""Build a teacher engine by name: ``make_engine("vllm", "builtin:smollm2-135m-instruct")``.

Each engine module is imported only when its engine is built (vLLM and the fast engine's
C kernels are heavy imports), and none of them imports this module.
"""

from __future__ import annotations

import importlib.util

from service.teacher.base import TeacherEngine

ENGINES = ("hf", "fast", "vllm", "openai")


# ``auto`` on a CPU, from one quiet side-by-side run (docs/performance.md, issue 14:
# `bench.teacher_side_by_side`, 64 prompts, 128 new tokens, 2 rounds, a 2-core Xeon with
# AMX): in exact fp32 the fast engine wins GSM8K prompts (434 tok/s against vLLM's 308)
# and ties on distillation prompts (242 against 248), and it starts sooner, so fp32 stays
# on `fast`. bf16 is vLLM's alone (the fast and hf engines run fp32): 1.6-2x fast where
# the CPU has AMX or AVX512-BF16, slower than fp32 where it has neither.


def pick_engine(name: str, rows: int | None = None, dtype: str = "float32") -> str:
    """What ``auto`` means here: vLLM where it is installed and a GPU is present, or where
    the job asks for bf16; else the fast engine. ``rows`` (the job's size) is accepted for
    a size rule once one is measured."""
    if name != "auto":
        return name
    if importlib.util.find_spec("vllm") is None:
        return "fast"
    import torch

    return "vllm" if torch.cuda.is_available() or dtype == "bfloat16" else "fast"


def make_engine(name: str, model_ref: str, rows: int | None = None, **options) -> TeacherEngine:
    """Build an engine by name (``auto``: see :func:`pick_engine`, which reads the
    ``dtype`` option)."""
    name = pick_engine(name, rows, options.get("dtype", "float32"))
    if name == "hf":
        from service.teacher.hf_engine import HFEngine

        return HFEngine(model_ref, **options)
    if name == "fast":
        from service.teacher.fast_engine import FastEngine

        return FastEngine(model_ref, **options)
    if name == "vllm":
        from service.teacher.vllm_engine import VLLMEngine

        return VLLMEngine(model_ref, **options)
    if name == "openai":
        from service.teacher.openai_engine import OpenAIEngine

        return OpenAIEngine(model_ref, **options)
    raise ValueError(f"unknown teacher engine {name!r}; one of auto, {', '.join(ENGINES)}")
