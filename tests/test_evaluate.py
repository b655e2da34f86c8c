"""Evaluation through lm-evaluation-harness on local task files.

.venv/bin/python -m pytest -q tests/test_evaluate.py            # add -m "not slow" to skip the real model
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA

from service.errors import CancelledError, DistilleryError
from service.evaluate import retention, run_evaluate
from service.settings import resolve_data_dir
from service.specs import TASKS, EvaluateSpec
from service.tasks.configs import TASKS as TASK_CONFIGS
from service.tasks.configs import data_files, task_name, write_task_configs
from tests.recorder import Recorder

ROOT = Path(__file__).resolve().parents[1]

MC_ROWS = [
    {
        "query": "Question: Which gas do plants take in for photosynthesis?",
        "choices": ["oxygen", "carbon dioxide", "helium", "neon"],
        "gold": 1,
    },
    {"query": "Question: What is frozen water called?", "choices": ["ice", "steam"], "gold": 0},
    {
        "query": "Question: How do you open a jar?\n",
        "choices": ["Twist the lid.", "Paint the lid."],
        "gold": 0,
    },
    {
        "query": "The man turned on the faucet, therefore",
        "choices": ["water ran.", "it snowed."],
        "gold": 0,
    },
    {
        "query": "Passage: Cats are mammals.\nQuestion: is a cat a mammal?",
        "choices": ["no", "yes"],
        "gold": 1,
    },
    {"query": "Predators eat", "choices": ["grass", "rocks", "bunnies", "air"], "gold": 2},
]
WINOGRANDE_ROWS = [
    {
        "context_options": [
            "Sarah was a better surgeon than Maria so Sarah",
            "Sarah was a better surgeon than Maria so Maria",
        ],
        "continuation": "always got the easier cases.",
        "gold": 1,
    },
] * 6
GSM8K_ROWS = [
    {
        "question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
        "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}",
    }
    for a, b in [(3, 2), (4, 4), (10, 5), (7, 1), (2, 9), (6, 6)]
]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory) -> Path:
    """A data dir laid out like ../shared/data, six documents per task."""
    root = tmp_path_factory.mktemp("eval-data")
    for task, (files, _) in TASK_CONFIGS.items():
        for rel in files.values():
            if task == "winogrande":
                rows = WINOGRANDE_ROWS
            elif task == "gsm8k":
                rows = GSM8K_ROWS
            else:
                rows = MC_ROWS
            _write_jsonl(root / rel, rows)
    return root


def load_tasks(tasks: list[str], data_dir: Path, folder: Path) -> dict:
    from lm_eval.tasks import TaskManager

    write_task_configs(tasks, data_dir, folder, cache_dir=folder / "cache")
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    return manager.load([task_name(t) for t in tasks])["tasks"]


def test_task_table_matches_spec():
    assert set(TASK_CONFIGS) == set(TASKS)


def test_configs_load_and_format_prompts(sample_data, tmp_path):
    tasks = load_tasks(list(TASKS), sample_data, tmp_path / "tasks")
    assert set(tasks) == {task_name(t) for t in TASKS}
    for t in TASKS:
        task = tasks[task_name(t)]
        assert len(task.eval_docs) == 6, t

    arc = tasks[task_name("arc_easy")]
    doc = arc.eval_docs[0]
    assert arc.doc_to_text(doc) == (
        "Question: Which gas do plants take in for photosynthesis?\nAnswer:"
    )
    assert arc.doc_to_choice(doc) == MC_ROWS[0]["choices"]
    assert arc.doc_to_target(doc) == 1
    # piqa's queries end in a newline: stripped before "\nAnswer:".
    piqa = tasks[task_name("piqa")]
    assert piqa.doc_to_text(piqa.eval_docs[2]) == "Question: How do you open a jar?\nAnswer:"
    copa = tasks[task_name("copa")]
    assert copa.doc_to_text(copa.eval_docs[3]) == "The man turned on the faucet, therefore"

    # winogrande: partial evaluation, one context per option, the gold index as "text".
    wino = tasks[task_name("winogrande")]
    doc = wino.eval_docs[0]
    assert wino.multiple_input == 2
    assert wino.doc_to_text(doc) == 1
    reqs = wino.construct_requests(doc, wino.doc_to_choice(doc))
    assert [r.args for r in reqs] == [
        (ctx, " always got the easier cases.") for ctx in WINOGRANDE_ROWS[0]["context_options"]
    ]

    # gsm8k: 5-shot from the train file, "Question: ...\nAnswer:" prompts.
    gsm = tasks[task_name("gsm8k")]
    doc = gsm.eval_docs[0]
    assert gsm.OUTPUT_TYPE == "generate_until"
    ctx = gsm.fewshot_context(doc, num_fewshot=5)
    assert ctx.count("Question: ") == 6 and ctx.count("#### ") == 5
    assert ctx.endswith(f"Question: {GSM8K_ROWS[0]['question']}\nAnswer:")


def test_retention_arithmetic():
    model = {"a": {"acc": 0.5}, "b": {"acc": 0.3}, "c": {"acc": 0.2}, "d": {"acc": None}}
    base = {"a": {"acc": 0.625}, "b": {"acc": 0.3}, "c": {"acc": 0.0}, "d": {"acc": 0.5}}
    r = retention(model, base)
    assert r["tasks"]["a"] == pytest.approx(0.8)
    assert r["tasks"]["b"] == pytest.approx(1.0)
    assert r["tasks"]["c"] is None  # baseline 0: undefined, left out of the mean
    assert r["tasks"]["d"] is None
    assert r["mean"] == pytest.approx(0.9)
    assert retention({"a": {"acc": 0.1}}, {"a": {"acc": 0.0}})["mean"] is None


def test_data_dir_resolution(tmp_path, monkeypatch):
    from service.settings import get_settings

    monkeypatch.setenv("DISTILLERY_EVAL_DATA", str(tmp_path / "env"))
    get_settings.cache_clear()
    try:
        assert resolve_data_dir(tmp_path / "arg") == (tmp_path / "arg").resolve()
        assert resolve_data_dir() == (tmp_path / "env").resolve()
    finally:
        get_settings.cache_clear()


def test_missing_file_is_named(sample_data, tmp_path, tiny_llama):
    empty = tmp_path / "empty"
    (empty / "piqa").mkdir(parents=True)
    spec = EvaluateSpec(model=str(tiny_llama), tasks=["piqa", "gsm8k"], limit=2)
    with pytest.raises(DistilleryError) as err:
        run_evaluate(spec, tmp_path / "out.json", data_dir=empty)
    msg = str(err.value)
    for p in ("piqa/piqa.jsonl", "gsm8k/train.jsonl", "gsm8k/test.jsonl"):
        assert str(empty / p) in msg
    assert not (tmp_path / "out.json").exists()


def test_tiny_model_all_tasks_against_itself(sample_data, tmp_path, tiny_llama):
    spec = EvaluateSpec(
        model=str(tiny_llama), baseline=str(tiny_llama), tasks=list(TASKS), limit=5, batch_size=8
    )
    rec = Recorder()
    out = tmp_path / "eval.json"
    result = run_evaluate(spec, out, rec, data_dir=sample_data, max_gen_toks=16)

    assert json.loads(out.read_text()) == result
    assert result["model"] == str(tiny_llama)
    for report in (result, result["baseline"]):
        assert list(report["tasks"]) == list(TASKS)
        for t, r in report["tasks"].items():
            assert r["n"] == 5, t
            assert 0.0 <= r["acc"] <= 1.0, t
            if t != "gsm8k":
                assert 0.0 <= r["acc_norm"] <= 1.0, t
        accs = [r["acc"] for r in report["tasks"].values()]
        assert report["average"] == pytest.approx(sum(accs) / len(accs))
    assert result["tasks"]["winogrande"]["acc"] == result["tasks"]["winogrande"]["acc_norm"]
    # The same model on the same documents: identical scores, retention exactly 1.
    assert result["baseline"]["tasks"] == result["tasks"]
    for t, r in result["retention"]["tasks"].items():
        assert r == (1.0 if result["tasks"][t]["acc"] > 0 else None), t
    # Progress between tasks: one step per (model, task), then each model's last step.
    steps = [c["step"] for c in rec.calls]
    assert steps[0] == 0 and steps[-1] == 2 * len(TASKS) == rec.calls[-1]["steps_total"]
    assert [c["task"] for c in rec.calls if "task" in c] == list(TASKS) * 2


def test_cancel_stops_before_next_task(sample_data, tmp_path, tiny_llama):
    spec = EvaluateSpec(model=str(tiny_llama), tasks=["copa", "piqa"], limit=2)
    rec = Recorder(cancel_after=1)
    with pytest.raises(CancelledError):
        run_evaluate(spec, tmp_path / "out.json", rec, data_dir=sample_data)
    assert [c.get("task") for c in rec.calls] == ["copa"]
    assert not (tmp_path / "out.json").exists()


def _planted_docs(model_dir: Path, queries: list[str]) -> list[tuple[str, str, str]]:
    """(query, most likely next word, least likely next word) for each query, each word a
    single space-prefixed token that the tokenizer gives back unchanged after the query."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    words = {}
    for i in range(len(tok)):
        text = tok.decode([i])
        if len(text) > 2 and text[0] == " " and text[1:].isalpha():
            words[i] = text[1:]
    out = []
    for q in queries:
        prompt = q + "\nAnswer:"
        ids = tok.encode(prompt)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        ranked = sorted(words, key=lambda i: float(logits[i]), reverse=True)
        ok = [i for i in ranked if tok.encode(prompt + " " + words[i]) == ids + [i]]
        out.append((q, words[ok[0]], words[ok[-1]]))
    return out


def test_planted_choices_score_as_expected(tmp_path, tiny_llama):
    """The model's own argmax next word must win; lm-eval's acc sees it."""
    planted = _planted_docs(
        tiny_llama, ["Question: What colour is the sky?", "Question: Name a fruit."]
    )
    good = [
        {"query": q, "choices": [best, worst], "gold": 0}
        if i % 2 == 0
        else {"query": q, "choices": [worst, best], "gold": 1}
        for i, (q, best, worst) in enumerate(planted)
    ]
    bad = [{**d, "gold": 1 - d["gold"]} for d in good]
    results = {}
    for name, rows in (("good", good), ("bad", bad)):
        data = tmp_path / name
        _write_jsonl(data / "arc_easy" / "arc_easy.jsonl", rows)
        spec = EvaluateSpec(model=str(tiny_llama), tasks=["arc_easy"], batch_size=2)
        results[name] = run_evaluate(spec, tmp_path / f"{name}.json", data_dir=data)
    assert results["good"]["tasks"]["arc_easy"]["acc"] == 1.0
    assert results["bad"]["tasks"]["arc_easy"]["acc"] == 0.0
    assert results["good"]["tasks"]["arc_easy"]["n"] == 2


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} is absent")
def test_real_data_files(tmp_path, tiny_llama):
    # "arith" is generated (service/synthetic.py), not one of the shared files.
    public = [t for t in TASKS if t != "arith"]
    tasks = load_tasks(public, SHARED_DATA, tmp_path / "tasks")
    for t in public:
        lines = data_files(t, SHARED_DATA)["test"].read_text().splitlines()
        docs = tasks[task_name(t)].eval_docs
        assert len(docs) == len(lines), t
        # --limit K takes the first K documents, in file order.
        assert dict(docs[0]) == json.loads(lines[0]), t
    spec = EvaluateSpec(model=str(tiny_llama), tasks=public, limit=5, batch_size=8)
    result = run_evaluate(spec, tmp_path / "eval.json", data_dir=SHARED_DATA, max_gen_toks=16)
    assert result["data_dir"] == str(SHARED_DATA.resolve())
    for t, r in result["tasks"].items():
        assert r["n"] == 5 and 0.0 <= r["acc"] <= 1.0, t


def test_cli_end_to_end(sample_data, tmp_path, tiny_llama, session_home):
    out = tmp_path / "cli.json"
    cmd = [sys.executable, "-m", "service.cli", "evaluate", "--model", str(tiny_llama)]
    cmd += ["--baseline", str(tiny_llama), "--tasks", "copa,boolq", "--limit", "3"]
    cmd += ["--batch-size", "4", "--data-dir", str(sample_data), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed == json.loads(out.read_text())
    assert set(printed["tasks"]) == {"copa", "boolq"}
    assert all(r["n"] == 3 for r in printed["tasks"].values())
    assert set(printed["retention"]["tasks"]) == {"copa", "boolq"}

    bad = subprocess.run(
        cmd[:-4] + ["--data-dir", str(tmp_path / "nowhere"), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 1
    assert str(tmp_path / "nowhere" / "copa" / "copa.jsonl") in bad.stderr


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} is absent")
def test_builtin_model_beats_chance_on_arc_easy(tmp_path, session_home):
    spec = EvaluateSpec(model="builtin:smollm2-135m-instruct", tasks=["arc_easy"], limit=20)
    result = run_evaluate(spec, tmp_path / "eval.json", data_dir=SHARED_DATA)
    arc = result["tasks"]["arc_easy"]
    assert arc["n"] == 20
    assert arc["acc"] > 0.25, arc  # four choices: chance is 0.25


def test_every_document_has_its_score(tmp_path, tiny_llama):
    """Per-document scores (for paired comparisons) in document order, agreeing with acc."""
    planted = _planted_docs(
        tiny_llama, ["Question: What colour is the sky?", "Question: Name a fruit."]
    )
    q, best, worst = planted[0]
    q2, best2, worst2 = planted[1]
    rows = [
        {"query": q, "choices": [best, worst], "gold": 0},  # right
        {"query": q2, "choices": [best2, worst2], "gold": 1},  # wrong
        {"query": q, "choices": [worst, best], "gold": 1},  # right
    ]
    data = tmp_path / "data"
    _write_jsonl(data / "arc_easy" / "arc_easy.jsonl", rows)
    spec = EvaluateSpec(model=str(tiny_llama), tasks=["arc_easy"], batch_size=2)
    rec = run_evaluate(spec, tmp_path / "e.json", data_dir=data)["tasks"]["arc_easy"]
    assert rec["scores"] == "101"
    assert rec["acc"] == pytest.approx(2 / 3)
