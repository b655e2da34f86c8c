"""A teacher served elsewhere, used by URL through the OpenAI chat completions API.

    engine = make_engine("openai", "http://gpu-box:8000/v1", model="my-teacher")
    # or OpenAIEngine("http://gpu-box:8000/v1", model=None, api_key=..., concurrency=64)

Works with anything that speaks ``POST {base_url}/chat/completions``: ``vllm serve``,
SGLang, TGI's Messages API, the llama.cpp server, OpenAI itself. ``base_url`` is what an
OpenAI client takes (it includes ``/v1``). ``model=None`` asks ``GET {base_url}/models``
and takes the first id (a ``vllm serve`` process serves one model).

Requests run concurrently, at most ``concurrency`` at a time (an asyncio semaphore over
one long-lived ``httpx.AsyncClient`` on an event loop of the engine's own, in a thread);
the server batches them, so a GPU server wants this well above 1 (default 32; vLLM
schedules hundreds at once). The teacher loop drives it like a local engine: ``start``
sends a request at once, ``step`` returns those that came back (waiting up to
``STEP_WAIT`` seconds for one), ``abort`` cancels one in flight. A request that fails with 429, a 5xx
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
import concurrent.futures
import random
import threading

import httpx

from service.errors import DistilleryError
from service.teacher.base import Generation, GenParams, Request, TeacherEngine

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_BACKOFF = 30.0  # seconds; also the cap on a server's Retry-After
STEP_WAIT = 0.05  # seconds step() waits for a reply when none has come back yet


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

        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None
        self._gate: asyncio.Semaphore | None = None
        self._inflight: dict[str, concurrent.futures.Future] = {}
        self._lock = threading.Lock()

    # -- one event loop and one client for the engine's life ---------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, daemon=True, name="openai").start()

                async def setup():
                    limits = httpx.Limits(max_connections=self.concurrency)
                    self._client = httpx.AsyncClient(
                        headers=self.headers, timeout=self.timeout, limits=limits
                    )
                    self._gate = asyncio.Semaphore(self.concurrency)

                asyncio.run_coroutine_threadsafe(setup(), loop).result()
                self._loop = loop
            return self._loop

    async def _one(self, req: Request, params: GenParams, seed: int) -> Generation:
        assert self._client is not None and self._gate is not None
        async with self._gate:
            if self.model is None:
                self.model = await self._first_model(self._client)
            return await self._complete(self._client, req, params, seed)

    def start(
        self,
        key: str,
        request: Request,
        params: GenParams,
        seed: int | None = None,
        priority: int = 0,
        prefix: list[int] | None = None,
    ) -> None:
        loop = self._ensure_loop()
        self._inflight[key] = asyncio.run_coroutine_threadsafe(
            self._one(request, params, int(seed or 0)), loop
        )

    def step(self) -> list[tuple[str, Generation]]:
        if not self._inflight:
            return []
        by_future = {f: k for k, f in self._inflight.items()}
        done, _ = concurrent.futures.wait(
            list(by_future), timeout=STEP_WAIT, return_when=concurrent.futures.FIRST_COMPLETED
        )
        out = []
        for fut in done:
            key = by_future[fut]
            del self._inflight[key]
            out.append((key, fut.result()))  # a request that failed for good raises here
        return out

    def abort(self, keys: list[str]) -> None:
        for key in keys:
            fut = self._inflight.pop(key, None)
            if fut is not None:
                fut.cancel()

    def generate(
        self, requests: list[Request], params: GenParams, seeds: list[int] | None = None
    ) -> list[Generation]:
        if not requests:
            return []
        seeds = list(seeds) if seeds is not None else list(range(len(requests)))
        loop = self._ensure_loop()
        futures = [
            asyncio.run_coroutine_threadsafe(self._one(r, params, int(s)), loop)
            for r, s in zip(requests, seeds, strict=True)
        ]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        for fut in self._inflight.values():
            fut.cancel()
        self._inflight.clear()
        if self._client is not None:
            asyncio.run_coroutine_threadsafe(self._client.aclose(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)

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
