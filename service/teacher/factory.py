"""Build a teacher engine by name: ``make_engine("vllm", "builtin:smollm2-135m-instruct")``.

Each engine module is imported only when its engine is built (vLLM and the fast engine's
C kernels are heavy imports), and none of them imports this module.
"""

from __future__ import annotations

import importlib.util

from service.teacher.base import TeacherEngine

ENGINES = ("hf", "fast", "vllm", "openai")


# ``auto``: vLLM on a GPU; on a CPU the fast engine, until a quiet side-by-side run says
# otherwise. The only CPU figures so far (docs/performance.md, issue 14: a shared 2-core
# AVX2 machine, one round of 16 prompts) had vLLM fp32 at 1.77x fast on GSM8K prompts but
# 0.98x on distillation prompts (Distillery's vLLM path 0.43x), and `distillery distill`
# of 16 rows took 88.6 s on vllm against 64.4 s on fast. vLLM on a CPU is one
# `--engine vllm` away.


def pick_engine(name: str, rows: int | None = None) -> str:
    """What ``auto`` means here: vLLM where it is installed and a GPU is present, else the
    fast engine. ``rows`` (the job's size) is accepted for a size rule once one is
    measured."""
    if name != "auto":
        return name
    if importlib.util.find_spec("vllm") is None:
        return "fast"
    import torch

    return "vllm" if torch.cuda.is_available() else "fast"


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
