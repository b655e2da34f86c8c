"""Teacher engines against the reference, plain ``generate`` (``HFEngine``).

    .venv/bin/python -m pytest -q tests/test_engines.py          # add -m "not slow" to skip the real model

The fast engine must reproduce generate's greedy tokens on prompts of mixed lengths with
more prompts than slots (slot refill), early EOS, prefills and a shared prefix; sampling
must follow the seeds and not the batch. The OpenAI engine runs against a real HTTP server
started here (FastAPI + uvicorn serving the tiny model through ``HFEngine``) whose first
answer is a 503.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time

import pytest
import torch
from agree import TOL, draws_agree, forced_logits, greedy_agrees
from conftest import GSM8K_ROWS, SHARED_DATA, peaked_copy

from service.teacher.base import GenParams, Request
from service.teacher.factory import make_engine
from service.teacher.fast_engine import FastEngine
from service.teacher.hf_engine import HFEngine, render_prompt
from service.teacher.kv import SlotCache
from service.teacher.llama_forward import unsupported_reason
from service.teacher.slots import shared_prefix

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


# The builtin model's logits span tens of units over 30 blocks: the engines differ more.
REAL_TOL = 2e-3


def chat(q: str, prefill: str = "", system: str | None = None) -> Request:
    msgs = (("system", system),) if system else ()
    return Request((*msgs, ("user", q)), prefill=prefill)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The machine is shared: one thread keeps small-op latency sane under load. Both
    # engines under test run with the same setting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def varied_llama(tmp_path_factory, tokenizer_dir):
    """A tiny random Llama whose greedy output varies from token to token. (The session's
    ``tiny_llama``, tied and initialised at 0.02, repeats one token forever, which would
    make "same tokens as generate" an empty check.)"""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        initializer_range=0.1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    out = tmp_path_factory.mktemp("varied-llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf(varied_llama):
    return HFEngine(str(varied_llama), device="cpu", batch_size=1)


@pytest.fixture(scope="module")
def fast(varied_llama):
    # Drafts on (lookahead 3): every greedy test below also checks looked-up drafts.
    return FastEngine(str(varied_llama), slots=3, lookahead=3)


def agree(ref_engine, reqs, ref, out, tol: float = TOL) -> None:
    """``out`` (another implementation) decodes greedily what ``ref`` (plain generate)
    does, wherever that is determined on this CPU (tests/agree.py); most tokens must be."""
    exact = greedy_agrees(ref_engine.model, ref_engine.tokenizer, reqs, ref, out, tol)
    total = sum(g.tokens for g in ref)
    assert exact >= 0.6 * total, f"only {exact} of {total} tokens were determined"


def same(a, b) -> None:
    """Bit-equal outputs: only for one implementation against itself (exact by
    construction), never for two engines (their kernels round differently per CPU)."""
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.finish_reason for g in a] == [g.finish_reason for g in b]
    assert [g.prompt_tokens for g in a] == [g.prompt_tokens for g in b]


def test_shared_prefix_and_cache_move():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # each keeps one own token
    cache = SlotCache(layers=2, slots=3, kv_heads=1, max_len=5, head_dim=2)
    cache.k[:, 2, :, :3] = 7.0
    cache.move(2, 0, 3)
    assert torch.equal(cache.k[:, 0, :, :3], cache.k[:, 2, :, :3])
    assert cache.k[:, 0, :, 3:].abs().sum() == 0


def test_fast_greedy_equals_generate_with_refill(hf, fast):
    reqs = [chat(q) for q in QUESTIONS]  # 7 prompts through 3 slots
    params = GenParams(max_new_tokens=20)
    ref = hf.generate(reqs, params)
    out = fast.generate(reqs, params)
    agree(hf, reqs, ref, out)
    assert all(g.tokens == 20 and g.finish_reason == "length" for g in out)
    assert len({t for g in out for t in g.extra["token_ids"]}) > 40  # a real check
    assert fast.forward is not None  # the fast path ran, not the fallback
    assert fast.stats["accepted"] > 0  # some looked-up drafts were checked and kept
    if shutil.which("gcc") or shutil.which("cc"):
        assert fast.forward.native is not None  # decode attention ran in the C kernel
    # Without the shared-prefix copy, packed weights, attention groups, drafts or the C
    # kernel (SDPA instead), and with one slot per prompt: the same tokens.
    wide = FastEngine(
        "unused",
        slots=16,
        share_prefix=False,
        pack_weights=False,
        attn_groups=1,
        lookahead=0,
        native=False,
        model=fast.model,
        tokenizer=fast.tokenizer,
    )
    agree(hf, reqs, ref, wide.generate(reqs, params))


def test_fast_prefill_and_system_prompt(hf, fast):
    reqs = [
        chat(QUESTIONS[2], prefill="Great! Let's think step by step. "),
        chat(QUESTIONS[1], system="You are terse."),
        chat(QUESTIONS[4], prefill="Sure", system="You are an expert in math."),
    ]
    params = GenParams(max_new_tokens=16)
    ref = hf.generate(reqs, params)
    out = fast.generate(reqs, params)
    agree(hf, reqs, ref, out)
    assert not out[0].text.startswith("Great!")  # the completion excludes the prefill


def test_fast_stops_at_eos_like_generate(varied_llama, tmp_path, hf, fast):
    # Make a token the model really emits an EOS: copy the model with that token added
    # to generation_config.eos_token_id, so both engines must stop there. The token is
    # one that greedy search reaches without a near-tie on the way (any CPU picks it).
    reqs = [chat(q) for q in QUESTIONS]
    probe = fast.generate(reqs, GenParams(max_new_tokens=12))
    ids = probe[0].extra["token_ids"]
    logits = forced_logits(hf.model, render_prompt(hf.tokenizer, reqs[0]), ids)
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1] >= 10 * TOL).tolist()
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    assert all(clear[: k + 1]), "the probe row hits a near-tie before its stop token"
    stop_token = ids[k]
    model_dir = tmp_path / "eos-model"
    shutil.copytree(varied_llama, model_dir)
    gen_cfg = json.loads((model_dir / "generation_config.json").read_text())
    gen_cfg["eos_token_id"] = [gen_cfg["eos_token_id"], stop_token]
    (model_dir / "generation_config.json").write_text(json.dumps(gen_cfg))
    params = GenParams(max_new_tokens=12)
    ref_engine = HFEngine(str(model_dir), device="cpu", batch_size=1)
    ref = ref_engine.generate(reqs, params)
    out = FastEngine(str(model_dir), slots=2).generate(reqs, params)
    agree(ref_engine, reqs, ref, out)
    for g in (ref[0], out[0]):
        assert g.finish_reason == "stop" and g.tokens == k + 1
        assert g.extra["token_ids"][-1] == stop_token


def test_fast_max_new_tokens_one(hf, fast):
    reqs = [chat(q) for q in QUESTIONS[:4]]
    params = GenParams(max_new_tokens=1)
    agree(hf, reqs, hf.generate(reqs, params), fast.generate(reqs, params))


@pytest.fixture(scope="module")
def peaked_llama(varied_llama, tmp_path_factory):
    return peaked_copy(varied_llama, tmp_path_factory.mktemp("peaked-llama"), 8.0)


def test_sampling_follows_seeds_not_batches(peaked_llama):
    hf = HFEngine(str(peaked_llama), device="cpu", batch_size=1)
    fast = FastEngine(str(peaked_llama), slots=3)
    reqs = [chat(q) for q in QUESTIONS]
    params = GenParams(max_new_tokens=16, temperature=0.9, top_p=0.9)
    seeds = [11, 12, 13, 14, 15, 16, 17]

    def drawn(out, rows, row_seeds) -> None:
        """Each row holds its own seed's draws from the reference logits, wherever they
        are determined on this CPU (tests/agree.py); most of them must be."""
        n = draws_agree(hf.model, hf.tokenizer, rows, out, row_seeds, 0.9, 0.9)
        total = sum(g.tokens for g in out)
        assert n >= 0.6 * total, f"only {n} of {total} draws were determined"

    a = fast.generate(reqs, params, seeds)
    # The same engine on the same input: exact by construction.
    assert [g.text for g in a] == [g.text for g in fast.generate(reqs, params, seeds)]
    drawn(a, reqs, seeds)
    # Other batch mates and another order: each row still draws from its own seed.
    order = [6, 2, 4]
    sub = [reqs[i] for i in order]
    drawn(fast.generate(sub, params, [seeds[i] for i in order]), sub, [seeds[i] for i in order])
    assert len({g.text for g in a}) > 1
    other = fast.generate(reqs, params, [s + 100 for s in seeds])
    assert [g.text for g in other] != [g.text for g in a]
    drawn(other, reqs, [s + 100 for s in seeds])
    # The reference engine draws the same way: same seeds, same samples where determined.
    drawn(hf.generate(reqs, params, seeds), reqs, seeds)


def test_int8_weights_option(varied_llama):
    # Not exact by design (docs/performance.md measures how far it drifts from fp32):
    # here it only has to run on int8 kernels and finish every request.
    engine = FastEngine(str(varied_llama), slots=3, weights="int8")
    assert all(p.int8 is not None for p in engine.forward.projections())
    out = engine.generate([chat(q) for q in QUESTIONS], GenParams(max_new_tokens=8))
    assert [g.tokens for g in out] == [8] * len(QUESTIONS)
    with pytest.raises(ValueError, match="int8"):
        FastEngine(str(varied_llama), weights="int4")


def test_unsupported_architecture_falls_back(varied_llama, tmp_path):
    model_dir = tmp_path / "gelu-llama"
    shutil.copytree(varied_llama, model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (model_dir / "config.json").write_text(json.dumps(cfg))
    engine = make_engine("fast", str(model_dir), slots=4, batch_size=8)
    assert engine.forward is None and unsupported_reason(engine.model)
    reqs = [chat(q) for q in QUESTIONS[:3]]
    params = GenParams(max_new_tokens=8)
    # The fallback is generate itself, but at batch 8 with left padding: other kernels.
    ref_engine = HFEngine(str(model_dir), device="cpu", batch_size=1)
    agree(ref_engine, reqs, ref_engine.generate(reqs, params), engine.generate(reqs, params))


def test_qwen2_biases(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(1)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        initializer_range=0.1,
        eos_token_id=tok.eos_token_id,
    )
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # non-zero q/k/v biases, so the bias path matters
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "qwen")
    tok.save_pretrained(tmp_path / "qwen")
    path = str(tmp_path / "qwen")
    reqs = [chat(q) for q in QUESTIONS[:4]]
    params = GenParams(max_new_tokens=10)
    engine = FastEngine(path, slots=2)
    assert engine.forward is not None and engine.forward.blocks[0].qkv.b is not None
    ref_engine = HFEngine(path, device="cpu", batch_size=1)
    agree(ref_engine, reqs, ref_engine.generate(reqs, params), engine.generate(reqs, params))


# --- OpenAI-compatible engine against a real server -------------------------------------


def serve(engine: HFEngine, fail_first: int):
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()
    state = {"calls": 0, "inflight": 0, "max_inflight": 0, "bodies": []}
    lock, gen_lock = threading.Lock(), threading.Lock()

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
            time.sleep(0.05)  # let concurrent requests overlap
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


@pytest.mark.slow
def test_fast_equals_generate_on_the_real_model(session_home):
    gsm8k = SHARED_DATA / "gsm8k" / "test.jsonl"
    if gsm8k.is_file():
        questions = [json.loads(line)["question"] for line in gsm8k.read_text().splitlines()[:4]]
    else:
        questions = [r["question"] for r in GSM8K_ROWS] + [QUESTIONS[2]]
    reqs = [chat(q) for q in questions]
    params = GenParams(max_new_tokens=32)
    hf = HFEngine("builtin:smollm2-135m-instruct", device="cpu", batch_size=1)
    ref = hf.generate(reqs, params)
    fast = FastEngine("builtin:smollm2-135m-instruct", slots=2)
    # 30 blocks of width 576: the two engines' logits differ by up to ~1e-4 here.
    agree(hf, reqs, ref, fast.generate(reqs, params), tol=REAL_TOL)
    fast.lookahead = 3
    agree(hf, reqs, ref, fast.generate(reqs, params), tol=REAL_TOL)
    assert fast.stats["accepted"] > 0
