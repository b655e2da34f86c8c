"""The hf teacher engine and the distillation loop, on a tiny random Llama.

Random weights write garbage, so these tests check mechanics (order, provenance,
resume, seeds, summary); the filters are tested on hand-written text in
test_templates.py. The teacher here is the session's tiny Llama with weights re-drawn
wider (std 0.2, so greedy text varies between rows instead of repeating one token)
and a louder EOS embedding (so some rewrites stop and others hit max_new_tokens).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from service.datasets import DISTILLED_FIELDS, read_dataset
from service.distill import (
    PARTIAL_SUFFIX,
    read_partial,
    row_seed,
    run_distill,
)
from service.errors import CancelledError, SpecError
from service.progress import Reporter
from service.specs import DistillSpec
from service.teacher.base import GenParams, Request
from service.teacher.factory import make_engine
from service.teacher.hf_engine import HFEngine, render_prompt
from tests.agree import draws_agree, greedy_agrees
from tests.conftest import ALPACA_ROWS, GSM8K_ROWS

ROOT = Path(__file__).resolve().parents[1]
# Sampling temperature of the tests that compare draws across batchings (with the peaked
# teacher, whose draws do not hang on the logits' last bits).
SAMPLE_T = 0.8


@pytest.fixture(scope="module")
def engine(wide_teacher) -> HFEngine:
    return HFEngine(str(wide_teacher), device="cpu", batch_size=16)


@pytest.fixture(scope="module")
def peaked(peaked_teacher) -> HFEngine:
    return HFEngine(str(peaked_teacher), device="cpu", batch_size=16)


@pytest.fixture
def mixed_file(tmp_path) -> Path:
    """8 Alpaca rows and 3 GSM8K rows, interleaved."""
    rows = ALPACA_ROWS[:4] + GSM8K_ROWS[:2] + ALPACA_ROWS[4:] + GSM8K_ROWS[2:]
    p = tmp_path / "mixed.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def spec_for(data: Path, teacher: Path, **kw) -> DistillSpec:
    base = dict(
        teacher=str(teacher), dataset=str(data), engine="hf", max_new_tokens=12, batch_size=3
    )
    return DistillSpec(**(base | kw))


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


REQUESTS = [
    Request((("user", "Name a colour."),)),
    Request((("system", "Be brief."), ("user", "Translate 'good morning' into French, please."))),
    Request((("user", "What is 2 + 3?"),), prefill="Great! Let's think step by step. "),
    Request((("user", "Hi"),)),
]


def test_render_prompt_is_the_chat_template_plus_the_prefill(engine):
    tok = engine.tokenizer
    req = REQUESTS[2]
    ids = render_prompt(tok, req)
    text = tok.apply_chat_template(req.as_openai(), tokenize=False, add_generation_prompt=True)
    assert tok.decode(ids) == text + req.prefill
    assert ids[: len(render_prompt(tok, Request(req.messages)))] == render_prompt(
        tok, Request(req.messages)
    )
    assert engine.prompt_length(req) == len(ids)


def test_greedy_batched_equals_one_at_a_time(engine):
    params = GenParams(max_new_tokens=10)
    batched = engine.generate(REQUESTS, params)
    single = [engine.generate([r], params)[0] for r in REQUESTS]
    # Left padding changes the kernels' shapes, and so the last bits on some CPUs: the
    # rows agree wherever greedy search is determined (tests/agree.py).
    exact = greedy_agrees(engine.model, engine.tokenizer, REQUESTS, single, batched)
    assert exact >= 0.6 * sum(g.tokens for g in single)
    assert len({g.text for g in batched}) > 1  # the teacher does not write one thing
    for g, r in zip(batched, REQUESTS, strict=True):
        assert g.prompt_tokens == len(render_prompt(engine.tokenizer, r))
        assert 1 <= g.tokens <= 10
        assert g.finish_reason == "stop" or (g.finish_reason, g.tokens) == ("length", 10)


def test_sampling_follows_the_row_seed_not_the_batch(peaked):
    # The peaked teacher: from the wide teacher's nearly flat 49k-token distribution a
    # last-bit change of the logits (another padding, another CPU) moves a draw.
    engine = peaked
    params = GenParams(max_new_tokens=6, temperature=SAMPLE_T, top_p=0.9)
    seeds = [11, 12, 13, 14]
    together = engine.generate(REQUESTS, params, seeds=seeds)
    alone = [
        engine.generate([r], params, seeds=[s])[0] for r, s in zip(REQUESTS, seeds, strict=True)
    ]
    # Each row, batched or alone, holds its own seed's draws wherever they are determined.
    for out in (together, alone):
        n = draws_agree(engine.model, engine.tokenizer, REQUESTS, out, seeds, SAMPLE_T, 0.9)
        assert n >= 0.6 * sum(g.tokens for g in out)
    other = engine.generate(REQUESTS, params, seeds=[21, 22, 23, 24])
    assert [g.text for g in other] != [g.text for g in together]
    greedy = engine.generate(REQUESTS, GenParams(max_new_tokens=6))
    assert [g.text for g in together] != [g.text for g in greedy]


def test_make_engine_builds_the_hf_engine(wide_teacher):
    eng = make_engine("hf", str(wide_teacher), batch_size=2)
    assert isinstance(eng, HFEngine) and eng.batch_size == 2


def test_output_rows_are_input_rows_in_order_with_provenance(
    mixed_file, wide_teacher, engine, tmp_path
):
    out = tmp_path / "out.jsonl"
    summary = run_distill(spec_for(mixed_file, wide_teacher), out, engine=engine)
    rows = read_dataset(mixed_file)
    got = read_lines(out)
    assert len(got) == len(rows) == summary["rows"] == 11
    for line, row in zip(got, rows, strict=True):
        assert {k: v for k, v in line.items() if k not in DISTILLED_FIELDS} == row.source
        assert line["original_response"] == row.response
        assert line["distilled"] == (line["reason"] == "ok")
        if not line["distilled"]:
            assert line["response"] == row.response
    reasons = [line["reason"] for line in got]
    assert summary["reasons"] == {r: reasons.count(r) for r in set(reasons)}
    assert summary["distilled"] == reasons.count("ok")
    assert summary["generated_tokens"] > 0 and summary["engine"] == "hf"
    assert not out.with_name(out.name + PARTIAL_SUFFIX).exists()
    assert {line["reason"] for line in got} <= {
        "ok",
        "empty",
        "echoed_template",
        "leaked_template",
        "truncated",
        "no_answer",
        "answer_mismatch",
    }
    # The output reads back as a dataset that trains on the kept responses.
    back = read_dataset(out)
    assert [r.response for r in back] == [line["response"] for line in got]
    assert [r.prompt for r in back] == [r.prompt for r in rows]
    assert [r.kind for r in back] == [r.kind for r in rows]


KILL_SCRIPT = """
import sys, threading
from pathlib import Path
from service.distill import run_distill
from service.progress import Reporter
from service.specs import DistillSpec

class StallAfterTwoBatches(Reporter):
    def progress(self, rows_done=0, **fields):
        if rows_done >= 6:
            print("READY", flush=True)
            threading.Event().wait()  # stalled until the test kills it

run_distill(DistillSpec.model_validate_json(sys.argv[1]), Path(sys.argv[2]), StallAfterTwoBatches())
"""


def test_resume_after_sigkill_equals_an_uninterrupted_run(
    mixed_file, wide_teacher, engine, tmp_path
):
    spec = spec_for(mixed_file, wide_teacher)
    whole = tmp_path / "whole.jsonl"
    run_distill(spec, whole, engine=engine)

    out = tmp_path / "resumed.jsonl"
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, spec.model_dump_json(), str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout.readline().strip() == "READY"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    lines = partial.read_text().splitlines()
    assert len(lines) == 1 + 6  # header + two batches of 3
    # A write torn by a kill: half a line, no newline.
    with partial.open("a") as fh:
        fh.write(lines[-1][: len(lines[-1]) // 2])

    summary = run_distill(spec, out, engine=engine)
    assert summary["resumed_rows"] == 6 and summary["rows"] == 11
    assert read_lines(out) == read_lines(whole)
    assert not partial.exists()


def test_cancel_between_batches_then_rerun_finishes_without_duplicates(
    mixed_file, wide_teacher, engine, tmp_path
):
    class CancelAfterTwoBatches(Reporter):
        checks = 0

        def check(self):
            self.checks += 1
            if self.checks > 2:
                raise CancelledError("cancelled")

    spec = spec_for(mixed_file, wide_teacher)
    out = tmp_path / "out.jsonl"
    with pytest.raises(CancelledError):
        run_distill(spec, out, CancelAfterTwoBatches(), engine=engine)
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    # Duplicate a finished line: the reader must still count each row once.
    lines = partial.read_text().splitlines()
    partial.write_text("\n".join(lines + [lines[1]]) + "\n")
    from service.distill import job_header

    header = json.loads(lines[0])
    assert sorted(read_partial(partial, header)) == sorted(
        json.loads(x)["index"] for x in lines[1:]
    )
    assert len(read_partial(partial, header)) == 6
    assert header == job_header(spec, header["dataset_sha256"], "hf", 11)

    summary = run_distill(spec, out, engine=engine)
    got = read_lines(out)
    assert summary["resumed_rows"] == 6
    assert [line["original_response"] for line in got] == [
        r.response for r in read_dataset(mixed_file)
    ]


def test_partial_of_another_spec_is_refused(mixed_file, wide_teacher, engine, tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(CancelledError):

        class CancelNow(Reporter):
            def check(self):
                raise CancelledError("cancelled")

        run_distill(spec_for(mixed_file, wide_teacher), out, CancelNow(), engine=engine)
    with pytest.raises(SpecError, match="different distillation"):
        run_distill(spec_for(mixed_file, wide_teacher, max_new_tokens=13), out, engine=engine)
    mixed_file.write_text(mixed_file.read_text() + json.dumps(ALPACA_ROWS[0]) + "\n")
    with pytest.raises(SpecError):
        run_distill(spec_for(mixed_file, wide_teacher), out, engine=engine)


def test_sampled_rows_do_not_depend_on_batch_size(mixed_file, peaked_teacher, peaked, tmp_path):
    # Batch sizes 2 and 5 pad differently: the same rows where the draws are determined,
    # which the peaked teacher makes all of them but for a ~1e-4 chance (tests/agree.py).
    engine = peaked

    def spec(**kw):
        return spec_for(mixed_file, peaked_teacher, temperature=SAMPLE_T, max_new_tokens=6, **kw)

    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    c = tmp_path / "c.jsonl"
    run_distill(spec(seed=3, batch_size=2), a, engine=engine)
    run_distill(spec(seed=3, batch_size=5), b, engine=engine)
    run_distill(spec(seed=4, batch_size=5), c, engine=engine)
    assert read_lines(a) == read_lines(b)
    assert read_lines(a) != read_lines(c)
    assert row_seed(3, 0) != row_seed(3, 1) != row_seed(4, 1)


def test_cli_writes_the_file_and_prints_the_summary(alpaca_file, wide_teacher, tmp_path, capsys):
    from api.cli import main

    out = tmp_path / "cli.jsonl"
    argv = [
        "distill",
        "--teacher",
        str(wide_teacher),
        "--dataset",
        str(alpaca_file),
        "--out",
        str(out),
    ]
    argv += ["--engine", "hf", "--limit", "5", "--max-new-tokens", "8", "--batch-size", "2"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 5 and summary["out"] == str(out)
    assert set(summary) >= {
        "distilled",
        "distilled_fraction",
        "reasons",
        "generated_tokens",
        "tokens_per_s",
        "seconds",
        "engine",
    }
    assert len(read_lines(out)) == 5


@pytest.mark.slow
def test_builtin_teacher_rewrites_alpaca_rows(session_home, alpaca_file, tmp_path):
    out = tmp_path / "real.jsonl"
    spec = DistillSpec(
        dataset=str(alpaca_file), limit=4, max_new_tokens=32, batch_size=4, engine="hf"
    )
    summary = run_distill(spec, out)
    got = read_lines(out)
    assert summary["rows"] == 4 and len(got) == 4
    assert summary["generated_tokens"] > 4 * 4  # real text, not EOS at once
    assert all(line["response"].strip() for line in got)


def test_engine_options_follow_the_spec():
    from service.distill import engine_options
    from service.teacher.factory import pick_dtype

    assert engine_options(DistillSpec(dataset="x", engine="hf")) == {"batch_size": 16}
    assert engine_options(DistillSpec(dataset="x", engine="hf", batch_size=3)) == {"batch_size": 3}
    # fast is deprecated: it runs on vLLM, with auto's dtype for this machine.
    assert engine_options(DistillSpec(dataset="x", engine="fast")) == {"dtype": pick_dtype("auto")}
    assert engine_options(DistillSpec(dataset="x", dtype="float32")) == {"dtype": "float32"}
