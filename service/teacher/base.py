"""The teacher engine interface.

An engine turns chat requests into completions. A request is a conversation (OpenAI-style
``messages``) plus an optional ``prefill``: text the assistant turn starts with (the SDFT
math template pre-fills "Great! Let's think step by step. "); the completion excludes it.

Engines are long-lived: a teacher worker builds one and keeps it loaded between jobs.
``generate`` returns results in input order. Greedy decoding (temperature 0) must be
deterministic; sampling uses ``seeds[i]`` for request ``i`` so a row's rewrite does not
depend on which batch or shard it landed in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Request:
    messages: tuple[tuple[str, str], ...]  # ((role, content), ...)
    prefill: str = ""

    def as_openai(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0


@dataclass
class Generation:
    text: str
    tokens: int  # generated tokens (prefill excluded)
    prompt_tokens: int = 0
    finish_reason: str = "stop"  # "stop" (EOS) or "length"
    extra: dict = field(default_factory=dict)


class TeacherEngine(ABC):
    name: str = "base"

    @abstractmethod
    def generate(
        self, requests: list[Request], params: GenParams, seeds: list[int] | None = None
    ) -> list[Generation]:
        """Completions for ``requests``, in input order."""

    def prompt_length(self, request: Request) -> int:
        """Length of a request's prompt, used to sort work into batches that pad little.

        Tokens where the engine holds a ``tokenizer`` (the same tokens every engine sees,
        ``hf_engine.render_prompt``), else characters (a proxy for remote engines)."""
        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is not None:
            from service.teacher.hf_engine import render_prompt

            return len(render_prompt(tokenizer, request))
        return sum(len(c) for _, c in request.messages) + len(request.prefill)

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op for most engines
        """Free what the engine holds (a vLLM engine is freed by ending its process)."""


def make_engine(name: str, model_ref: str, **options) -> TeacherEngine:
    """Build an engine by name. ``auto`` is vLLM on a GPU when importable, else ``fast``."""
    if name == "auto":
        import importlib.util

        import torch

        gpu = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None
        name = "vllm" if gpu else "fast"
        try:
            if name == "fast":
                import service.teacher.fast_engine  # noqa: F401
        except ImportError:
            name = "hf"
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
    raise ValueError(f"unknown teacher engine {name!r}")
