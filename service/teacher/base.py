"""The teacher engine interface (the engines and ``make_engine`` import this, never the
reverse: ``service/teacher/factory.py`` builds engines by name).

An engine turns chat requests into completions. A request is a conversation (OpenAI-style
``messages``) plus an optional ``prefill``: text the assistant turn starts with (the SDFT
math template pre-fills "Great! Let's think step by step. "); the completion excludes it.

Engines are long-lived: a teacher worker builds one and keeps it loaded between jobs.
``generate`` returns results in input order. Greedy decoding (temperature 0) must be
deterministic; sampling uses ``seeds[i]`` for request ``i`` so a row's rewrite does not
depend on which batch it landed in.

Stepping (what the teacher loop drives, ``service/teacher/loop.py``): ``start(key,
request, params, seed, priority)`` adds one request to the running batch, ``step()``
runs one engine step and returns the requests that finished in it, ``abort(keys)`` drops
requests. vLLM does this natively (continuous batching: requests join and leave the
batch at every step). The default here, for the reference ``hf`` engine and the remote
``openai`` one, runs every started request in one ``generate`` call per step: the same
loop drives them, without continuous batching.
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


def render_prompt(tokenizer, request: Request) -> list[int]:
    """Prompt tokens of a request: the chat template with the generation prompt, then
    the prefill as plain text. The rendered text already holds every special token, so
    the tokenizer adds none. Every engine that tokenizes locally uses this, so they all
    see the same ids. (SmolLM2's template adds its default system prompt when a
    request has no system turn; that is left as the template does it.)"""
    if not getattr(tokenizer, "chat_template", None):
        # A base model (builtin:gemma3-270m): the turns as plain text, one blank line
        # apart, after the tokenizer's own BOS, as service/train_data.py renders them.
        text = "\n\n".join(content for _, content in request.messages)
        text = text if text.endswith("\n") else text + "\n\n"
        return list(tokenizer(text + request.prefill)["input_ids"])
    text = tokenizer.apply_chat_template(
        request.as_openai(), tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer(text + request.prefill, add_special_tokens=False)["input_ids"])


class TeacherEngine(ABC):
    name: str = "base"
    _started: dict[str, tuple[Request, GenParams, int | None]]

    @abstractmethod
    def generate(
        self, requests: list[Request], params: GenParams, seeds: list[int] | None = None
    ) -> list[Generation]:
        """Completions for ``requests``, in input order."""

    def prompt_length(self, request: Request) -> int:
        """Length of a request's prompt, used to sort work into batches that pad little.

        Tokens where the engine holds a ``tokenizer`` (the same tokens every engine sees,
        :func:`render_prompt`), else characters (a proxy for remote engines)."""
        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is not None:
            return len(render_prompt(tokenizer, request))
        return sum(len(c) for _, c in request.messages) + len(request.prefill)

    # -- stepping (a default over ``generate``; VLLMEngine overrides it) -----------------

    def start(
        self,
        key: str,
        request: Request,
        params: GenParams,
        seed: int | None = None,
        priority: int = 0,
        prefix: list[int] | None = None,
    ) -> None:
        """Add request ``key`` to the running batch (lower ``priority`` runs earlier).
        ``prefix``: tokens a preempted request had generated (:meth:`preempt`); an engine
        that cannot continue from them starts over."""
        if not hasattr(self, "_started"):
            self._started = {}
        self._started[key] = (request, params, seed)

    def step(self) -> list[tuple[str, Generation]]:
        """One engine step; the requests that finished in it. Here: all started requests
        in ``generate`` calls, one per distinct ``GenParams``."""
        started, self._started = getattr(self, "_started", {}), {}
        by_params: dict[GenParams, list[str]] = {}
        for key, (_, params, _) in started.items():
            by_params.setdefault(params, []).append(key)
        out = []
        for params, keys in by_params.items():
            seeds = [started[k][2] or 0 for k in keys]
            gens = self.generate([started[k][0] for k in keys], params, seeds)
            out.extend(zip(keys, gens, strict=True))
        return out

    def abort(self, keys: list[str]) -> None:
        """Drop started requests (unknown keys are ignored)."""
        for key in keys:
            getattr(self, "_started", {}).pop(key, None)

    def preempt(self, keys: list[str]) -> dict[str, list[int]]:
        """Drop started requests to make room; {key: tokens generated so far} for those
        that can continue from them (none here: they start over)."""
        self.abort(keys)
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op for most engines
        """Free what the engine holds (a vLLM engine is freed by ending its process)."""
