"""Build a teacher engine by name: ``make_engine("vllm", "builtin:smollm2-135m-instruct")``.

Each engine module is imported only when its engine is built (vLLM and the fast engine's
C kernels are heavy imports), and none of them imports this module.
"""

from __future__ import annotations

import importlib.util

from service.teacher.base import TeacherEngine

ENGINES = ("hf", "fast", "vllm", "openai")


# ``auto`` on a CPU: vLLM for a job of at least this many rows, the fast engine below it,
# where vLLM's start-up (tens of seconds: imports, model inspection, KV cache) costs more
# than its decoding saves. docs/performance.md (issue 14, shared 2-core AVX2 machine):
# `distillery distill` of 16 GSM8K rows took 64.4 s on fast, 88.6 s on vllm, 148.4 s on
# plain generate; vLLM fp32 decoded at 1.77x fast on GSM8K prompts, 0.98x on distillation
# prompts. 256 is set from those figures, not a measured break-even.
AUTO_VLLM_MIN_ROWS = 256


def pick_engine(name: str, rows: int | None = None) -> str:
    """What ``auto`` means here for a job of ``rows`` rows (None: unknown, or an engine
    kept loaded across jobs, where start-up is paid once): vLLM where it is installed, on
    a CPU only for jobs of AUTO_VLLM_MIN_ROWS rows or more; else the fast engine."""
    if name != "auto":
        return name
    if importlib.util.find_spec("vllm") is None:
        return "fast"
    import torch

    if torch.cuda.is_available() or rows is None or rows >= AUTO_VLLM_MIN_ROWS:
        return "vllm"
    return "fast"


def make_engine(name: str, model_ref: str, rows: int | None = None, **options) -> TeacherEngine:
    """Build an engine by name (``auto``: see :func:`pick_engine`)."""
    name = pick_engine(name, rows)
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
