"""Teacher agreement and speculative acceptance on tiny real models."""

from __future__ import annotations

import pytest

from service.agreement import compare_models, load_prompts
from service.speculative import acceptance, vllm_available


def test_acceptance_by_hand():
    # k=2 over 5 positions [T, T, F, T, T]:
    # round 1 proposes 2, accepts 2, teacher adds position 2 -> i=3;
    # round 2 proposes 2 (positions 3,4), accepts both, nothing left -> done.
    r = acceptance([[True, True, False, True, True]], k=2)
    assert (r["rounds"], r["proposed"], r["accepted"]) == (2, 4, 4)
    assert r["accepted_hist"] == [0, 0, 2]
    assert r["tokens_per_round"] == pytest.approx(5 / 2)
    # k=3 over [F, T, F, F]: round 1 accepts 0 (+ teacher token) -> i=1; round 2
    # proposes 3 (1,2,3), accepts 1, teacher adds 2 -> i=3; round 3 proposes 1, accepts 0,
    # teacher adds 3 -> done.
    r = acceptance([[False, True, False, False]], k=3)
    assert (r["rounds"], r["proposed"], r["accepted"]) == (3, 7, 1)
    assert r["acceptance_rate"] == pytest.approx(1 / 7)
    assert r["accepted_hist"] == [2, 1, 0, 0]


def test_acceptance_extremes():
    assert acceptance([[True] * 12], k=5)["acceptance_rate"] == 1.0
    none = acceptance([[False] * 12], k=5)
    assert none["acceptance_rate"] == 0.0
    assert none["rounds"] == 12 and none["tokens_per_round"] == 1.0


@pytest.fixture(scope="module")
def other_llama(tmp_path_factory, tokenizer_dir):
    from tests.conftest import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("other"), tokenizer_dir, layers=4, seed=1)


def test_student_equal_to_teacher_agrees_fully(tiny_llama, session_home):
    r = compare_models(
        str(tiny_llama),
        str(tiny_llama),
        prompts=4,
        max_new_tokens=12,
        k=5,
        speedup_prompts=2,
        dataset=None,
        data_dir=session_home,  # no task files there: the built-in prompts
        use_vllm=False,
    )
    a, s = r["agreement"], r["speculative"]
    assert a["source"] == "builtin" and a["prompts"] == 4
    assert a["tokens"] > 0
    assert a["kl_mean"] == 0.0
    assert a["top1"] == 1.0
    assert a["embedding_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert s["acceptance_rate"] == 1.0
    assert s["mean_accepted"] > 1
    # Assisted generation with itself as draft changes nothing in the output.
    assert s["assisted"]["identical"] == 2
    assert s["assisted"]["speedup"] > 0


def test_different_student_disagrees(tiny_llama, other_llama, alpaca_file):
    r = compare_models(
        str(other_llama),
        str(tiny_llama),
        prompts=3,
        dataset=str(alpaca_file),
        max_new_tokens=10,
        k=3,
        speedup_prompts=0,
        use_vllm=False,
    )
    a, s = r["agreement"], r["speculative"]
    assert a["source"] == str(alpaca_file) and a["prompts"] == 3
    assert a["kl_mean"] > 0.0
    assert 0.0 <= a["top1"] < 1.0
    assert a["embedding_cosine"] < 0.999
    assert s["acceptance_rate"] < 1.0
    assert "assisted" not in s
    # Acceptance is the replay of the same matches top-1 counts.
    assert s["proposed"] >= s["accepted"]


def test_prompt_sources(alpaca_file, tmp_path):
    prompts, source = load_prompts(str(alpaca_file), 2)
    assert source == str(alpaca_file) and prompts[0].startswith("Give three tips")
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(
        '{"question": "What is 2 + 2?", "answer": "4\\n#### 4"}\n'
    )
    prompts, source = load_prompts(None, 5, data_dir=tmp_path)
    assert prompts == ["What is 2 + 2?"] and source.endswith("gsm8k/test.jsonl")


@pytest.mark.skipif(not vllm_available(), reason="vLLM speculative decoding needs vllm and a GPU")
def test_vllm_draft_of_itself_is_fully_accepted(tiny_llama):
    from service.speculative import vllm_speculative

    r = vllm_speculative(
        str(tiny_llama),
        str(tiny_llama),
        [[{"role": "user", "content": p}] for p in ("Hello there.", "Name a colour.")],
        k=3,
        max_tokens=16,
    )
    assert r["acceptance_rate"] == pytest.approx(1.0, abs=0.02)
    assert r["identical"] == 2


def test_run_evaluate_with_teacher_adds_agreement(tiny_llama, tmp_path):
    import json

    from service.evaluate import run_evaluate
    from service.specs import EvaluateSpec
    from service.tasks.configs import data_files

    rows = [{"query": "Frozen water is", "choices": ["ice", "steam"], "gold": 0}] * 3
    for path in data_files("copa", tmp_path).values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = EvaluateSpec(
        model=str(tiny_llama),
        teacher=str(tiny_llama),
        tasks=["copa"],
        limit=2,
        agreement_prompts=2,
        agreement_max_new_tokens=6,
        draft_k=2,
        speedup_prompts=0,
    )
    result = run_evaluate(spec, tmp_path / "eval.json", data_dir=tmp_path)
    assert result["tasks"]["copa"]["n"] == 2
    assert result["agreement"]["kl_mean"] == 0.0 and result["agreement"]["prompts"] == 2
    assert result["speculative"]["acceptance_rate"] == 1.0 and result["speculative"]["k"] == 2
    assert json.loads((tmp_path / "eval.json").read_text())["agreement"] == result["agreement"]
