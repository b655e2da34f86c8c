"""Teacher engines against the reference, plain ``generate`` (``HFEngine``), and the
reference itself.

    .venv/bin/python -m pytest -q tests/test_engines.py

``HFEngine`` must stop at the stop ids every engine shares (generation config and
tokenizer) and draw each sampled row from its own seed whatever its batch. The OpenAI
engine runs against a real HTTP server started here (FastAPI + uvicorn serving the tiny
model through ``HFEngine``) whose first answer is a 503. vLLM against the reference:
tests/test_vllm.py.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time

import pytest
import torch
from agree import draws_agree
from conftest import build_tiny_llama, peaked_copy

from service.teacher.base import GenParams, Request
from service.teacher.factory import make_engine
from service.teacher.hf_engine import HFEngine

QUESTIONS = [
    "Hi",
    "Name a primary colour.",
    "Tom has 3 apples and buys 2 more. How many apples does he have now? Explain briefly.",
    "Write one sentence about the sea.",
    "A box holds 4 pens. How many pens are in 3 boxes? Think step by step and show all "
    "the intermediate results before giving the final answer as a number.",
    "What is 2 + 2?",
    "Translate 'good morning' to French, then to German, then to Italian.",
]


def chat(q: str, prefill: str = "", system: str | None = None) -> Request:
    msgs = (("system", system),) if system else ()
    return Request((*msgs, ("user", q)), prefill=prefill)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The machine is shared: one thread keeps small-op latency sane under load. Every
    # engine under test runs with the same setting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def varied_llama(tmp_path_factory, tokenizer_dir):
    """A tiny random Llama whose greedy output varies from token to token. (The session's
    ``tiny_llama``, tied and initialised at 0.02, repeats one token forever, which would
    make "same tokens as generate" an empty check.)"""
    # 4 heads of 16: the HF engine takes them (vLLM would not).
    out = tmp_path_factory.mktemp("varied-llama")
    return build_tiny_llama(out, tokenizer_dir, layers=4, num_attention_heads=4,
                            num_key_value_heads=2, tie_word_embeddings=False,
                            initializer_range=0.1)  # fmt: skip


@pytest.fixture(scope="module")
def hf(varied_llama):
    return HFEngine(str(varied_llama), device="cpu", batch_size=1)


def same(a, b) -> None:
    """Bit-equal outputs: only for one implementation against itself (exact by
    construction), never for two engines (their kernels round differently per CPU)."""
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.finish_reason for g in a] == [g.finish_reason for g in b]
    assert [g.prompt_tokens for g in a] == [g.prompt_tokens for g in b]


def test_hf_stops_at_generation_config_eos(varied_llama, tmp_path, hf):
    # A token the model really emits becomes an EOS in a copy's generation_config.json:
    # the engine must stop there and count the stop token (eos_token_ids, the stop ids
    # every engine shares).
    reqs = [chat(q) for q in QUESTIONS[:3]]
    params = GenParams(max_new_tokens=12)
    ids = hf.generate(reqs[:1], params)[0].extra["token_ids"]
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    stop_token = ids[k]
    model_dir = tmp_path / "eos-model"
    shutil.copytree(varied_llama, model_dir)
    gen_cfg = json.loads((model_dir / "generation_config.json").read_text())
    gen_cfg["eos_token_id"] = [gen_cfg["eos_token_id"], stop_token]
    (model_dir / "generation_config.json").write_text(json.dumps(gen_cfg))
    out = HFEngine(str(model_dir), device="cpu", batch_size=1).generate(reqs, params)
    assert out[0].finish_reason == "stop" and out[0].tokens == k + 1
    assert out[0].extra["token_ids"] == ids[: k + 1]


@pytest.fixture(scope="module")
def peaked_llama(varied_llama, tmp_path_factory):
    return peaked_copy(varied_llama, tmp_path_factory.mktemp("peaked-llama"), 8.0)


def test_sampling_follows_seeds_not_batches(peaked_llama):
    # Batches of 3 with left padding: each row must still draw from its own seed.
    hf = HFEngine(str(peaked_llama), device="cpu", batch_size=3)
    reqs = [chat(q) for q in QUESTIONS]
    params = GenParams(max_new_tokens=16, temperature=0.9, top_p=0.9)
    seeds = [11, 12, 13, 14, 15, 16, 17]

    def drawn(out, rows, row_seeds) -> None:
        """Each row holds its own seed's draws from the reference logits, wherever they
        are determined on this CPU (tests/agree.py); most of them must be."""
        n = draws_agree(hf.model, hf.tokenizer, rows, out, row_seeds, 0.9, 0.9)
        total = sum(g.tokens for g in out)
        assert n >= 0.6 * total, f"only {n} of {total} draws were determined"

    a = hf.generate(reqs, params, seeds)
    # The same engine on the same input: exact by construction.
    assert [g.text for g in a] == [g.text for g in hf.generate(reqs, params, seeds)]
    drawn(a, reqs, seeds)
    # Other batch mates and another order: each row still draws from its own seed.
    order = [6, 2, 4]
    sub = [reqs[i] for i in order]
    drawn(hf.generate(sub, params, [seeds[i] for i in order]), sub, [seeds[i] for i in order])
    assert len({g.text for g in a}) > 1
    other = hf.generate(reqs, params, [s + 100 for s in seeds])
    assert [g.text for g in other] != [g.text for g in a]
    drawn(other, reqs, [s + 100 for s in seeds])
    # One row per batch (no padding): same seeds, same samples where determined.
    hf.batch_size = 1
    drawn(hf.generate(reqs, params, seeds), reqs, seeds)


# --- OpenAI-compatible engine against a real server -------------------------------------


def serve(engine: HFEngine, fail_first: int):
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()
    state = {"calls": 0, "inflight": 0, "max_inflight": 0, "bodies": []}
    # lock: also lets a request wait for another to be in flight (their overlap)
    lock, gen_lock = threading.Condition(), threading.Lock()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "tiny", "object": "model"}]}

    @app.post("/v1/chat/completions")
    def completions(body: dict):
        with lock:
            state["calls"] += 1
            call = state["calls"]
            state["inflight"] += 1
            state["max_inflight"] = max(state["max_inflight"], state["inflight"])
            state["bodies"].append(body)
            lock.notify_all()
        try:
            if call <= fail_first:
                return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
            if body.get("model") != "tiny":
                return JSONResponse({"error": {"message": "no such model"}}, status_code=404)
            msgs, prefill = body["messages"], ""
            if body.get("continue_final_message"):
                prefill, msgs = msgs[-1]["content"], msgs[:-1]
            req = Request(tuple((m["role"], m["content"]) for m in msgs), prefill=prefill)
            params = GenParams(body["max_tokens"], body["temperature"], body["top_p"])
            with lock:  # overlap with another request when one comes (a lone one goes on)
                lock.wait_for(lambda: state["inflight"] > 1, timeout=0.5)
            with gen_lock:
                g = engine.generate([req], params, seeds=[body["seed"]])[0]
            return {
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": g.text},
                        "finish_reason": g.finish_reason,
                    }
                ],
                "usage": {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.tokens},
            }
        finally:
            with lock:
                state["inflight"] -= 1

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}/v1", state


def test_openai_engine_against_a_real_server(hf):
    from service.teacher.openai_engine import OpenAIEngine, TeacherServerError

    server, thread, url, state = serve(hf, fail_first=1)
    try:
        reqs = [chat(q) for q in QUESTIONS[:5]]
        reqs.append(chat(QUESTIONS[2], prefill="Great! Let's think step by step. "))
        params = GenParams(max_new_tokens=10)
        engine = make_engine("openai", url, model=None, concurrency=2, retries=3, backoff=0.01)
        out = engine.generate(reqs, params)
        same(hf.generate(reqs, params), out)
        assert state["calls"] == len(reqs) + 1  # the 503 was retried
        assert 1 < state["max_inflight"] <= 2  # concurrent, and bounded
        # Through the teacher loop: the same rows, over the same long-lived client.
        from service.teacher.loop import EngineLoop, Item

        client = engine._client
        loop = EngineLoop(engine)
        loop.add([Item(f"j/{i}", "j", "t", i, r, params) for i, r in enumerate(reqs)])
        got = {}
        while not loop.idle:
            got.update((it.index, g) for it, g in loop.step())
        same(out, [got[i] for i in range(len(reqs))])
        assert engine._client is client and 1 < state["max_inflight"] <= 2
        prefilled = [b for b in state["bodies"] if b["messages"][-1]["role"] == "assistant"]
        assert prefilled and all(b["continue_final_message"] for b in prefilled)
        # Seeded sampling passes through.
        sparams = GenParams(max_new_tokens=8, temperature=0.9, top_p=0.9)
        same(
            hf.generate(reqs[:3], sparams, [5, 6, 7]), engine.generate(reqs[:3], sparams, [5, 6, 7])
        )
        # A 4xx other than 429 is not retried.
        calls = state["calls"]
        with pytest.raises(TeacherServerError, match="404"):
            OpenAIEngine(url, model="nope", retries=3, backoff=0.01).generate(reqs[:1], params)
        assert state["calls"] == calls + 1
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    # Connection refused after the server is gone: retried, then a clear error.
    with pytest.raises(TeacherServerError, match="failed"):
        OpenAIEngine(url, model="tiny", retries=1, backoff=0.01).generate(reqs[:1], params)
