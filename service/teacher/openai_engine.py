"""A teacher served elsewhere, used by URL through the OpenAI chat completions API.

    engine = make_engine("openai", "http://gpu-box:8000/v1", model="my-teacher")
    # or OpenAIEngine("http://gpu-box:8000/v1", model=None, api_key=..., concurrency=64)

Works with anything that speaks ``POST {base_url}/chat/completions``: ``vllm serve``,
SGLang, TGI's Messages API, the llama.cpp server, OpenAI itself. ``base_url`` is what an
OpenAI client takes (it includes ``/v1``). ``model=None`` asks ``GET {base_url}/models``
and takes the first id (a ``vllm serve`` process serves one model).

Requests run concurrently, at most ``concurrency`` at a time (an asyncio semaphore over
one ``httpx.AsyncClient``); the server batches them, so a GPU server wants this well
above 1 (default 32; vLLM schedules hundreds at once). A request that fails with 429, a 5xx
or a connection error/timeout is retried ``retries`` times with exponential backoff
(``Retry-After`` honoured); any other 4xx fails at once, with the server's message.

Prefill: the assistant turn is sent as the last message with ``continue_final_message:
true, add_generation_prompt: false``, vLLM's (and SGLang's) extension for continuing a
message; the completion then holds only the continuation. Servers without the extension
(``prefill_mode="plain"``: the llama.cpp server continues a trailing assistant message
by itself) get the assistant message alone. Sampling sends ``seed`` per request, so a row
is reproducible on servers that honour it (vLLM does, per request).
"""

from __future__ import annotations

import asyncio
import random
import threading

import httpx

from service.errors import DistilleryError
from service.teacher.base import Generation, GenParams, Request, TeacherEngine

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_BACKOFF = 30.0  # seconds; also the cap on a server's Retry-After


class TeacherServerError(DistilleryError):
    code = "teacher_server_error"


class OpenAIEngine(TeacherEngine):
    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        concurrency: int = 32,
        retries: int = 3,
        timeout: float = 600.0,
        backoff: float = 0.5,
        prefill_mode: str = "continue",
        **_options,  # batch_size, device: meaningless for a remote server
    ):
        if prefill_mode not in ("continue", "plain"):
            raise ValueError("prefill_mode is 'continue' or 'plain'")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.concurrency = max(1, int(concurrency))
        self.capacity = self.concurrency  # rows the teacher loop hands one step
        self.retries = max(0, int(retries))
        self.timeout = timeout
        self.backoff = backoff
        self.prefill_mode = prefill_mode

    def generate(
        self, requests: list[Request], params: GenParams, seeds: list[int] | None = None
    ) -> list[Generation]:
        if not requests:
            return []
        seeds = list(seeds) if seeds is not None else list(range(len(requests)))
        return _run_sync(self._generate_all(requests, params, seeds))

    async def _generate_all(self, requests, params, seeds) -> list[Generation]:
        gate = asyncio.Semaphore(self.concurrency)
        limits = httpx.Limits(max_connections=self.concurrency)
        async with httpx.AsyncClient(
            headers=self.headers, timeout=self.timeout, limits=limits
        ) as client:
            if self.model is None:
                self.model = await self._first_model(client)

            async def one(req: Request, seed: int) -> Generation:
                async with gate:
                    return await self._complete(client, req, params, seed)

            return list(
                await asyncio.gather(*(one(r, s) for r, s in zip(requests, seeds, strict=True)))
            )

    def body(self, req: Request, params: GenParams, seed: int) -> dict:
        messages = req.as_openai()
        body: dict = {
            "model": self.model,
            "messages": messages,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": int(seed),
            "n": 1,
        }
        if req.prefill:
            messages.append({"role": "assistant", "content": req.prefill})
            if self.prefill_mode == "continue":
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
        return body

    async def _first_model(self, client: httpx.AsyncClient) -> str:
        data = await self._send(client, "GET", "/models", None)
        models = data.get("data") or []
        if not models:
            raise TeacherServerError(f"{self.base_url}/models lists no model")
        return models[0]["id"]

    async def _complete(self, client, req: Request, params: GenParams, seed: int) -> Generation:
        data = await self._send(client, "POST", "/chat/completions", self.body(req, params, seed))
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
            usage = data.get("usage") or {}
        except (KeyError, IndexError, TypeError) as exc:
            raise TeacherServerError(f"unexpected chat completion: {str(data)[:300]}") from exc
        reason = choice.get("finish_reason") or "stop"
        return Generation(
            text=text,
            tokens=int(usage.get("completion_tokens") or 0),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            finish_reason="length" if reason == "length" else "stop",
            extra={"finish_reason": reason},
        )

    async def _send(self, client: httpx.AsyncClient, method: str, path: str, body) -> dict:
        url = self.base_url + path
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                resp = await client.request(method, url, json=body)
            except httpx.TransportError as exc:  # refused, reset, timed out
                if last:
                    raise TeacherServerError(f"{method} {url} failed: {exc!r}") from exc
                await asyncio.sleep(self._delay(attempt, None))
                continue
            if resp.status_code < 400:
                return resp.json()
            if resp.status_code in RETRY_STATUS and not last:
                await asyncio.sleep(self._delay(attempt, resp.headers.get("retry-after")))
                continue
            raise TeacherServerError(
                f"{method} {url} answered {resp.status_code}: {resp.text[:500]}",
                details={"status": resp.status_code, "attempts": attempt + 1},
            )
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), MAX_BACKOFF)
            except ValueError:
                pass
        # Exponential backoff with full jitter (AWS architecture blog, "Exponential
        # Backoff And Jitter"): spreads retries of many concurrent requests apart.
        return random.uniform(0, min(MAX_BACKOFF, self.backoff * 2**attempt))


def _run_sync(coro):
    """Run a coroutine to completion from sync code, also when the caller already runs an
    event loop (an async API handler): then it runs on a fresh loop in a thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict = {}

    def target():
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
