"""bench/recovery.py continues across sessions from its record: a condition whose
evaluation is recorded is neither trained nor evaluated again, a rebuilt prune that
removes other blocks than the record's stops the run, and docs/results.md is written
from the record alone (no run directory needed)."""

from __future__ import annotations

import json

import pytest

from bench import recovery


def make_experiment(tmp_path, **over) -> recovery.Experiment:
    argv = ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
            "--record", str(tmp_path / "record"), "--results", str(tmp_path / "results.md")]  # fmt: skip
    for k, v in over.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return recovery.Experiment(recovery.build_parser().parse_args(argv))


def report(arc: str, piqa: str) -> dict:
    tasks = {"arc_easy": arc, "piqa": piqa}
    return {"tasks": {t: {"acc": s.count("1") / len(s), "scores": s, "n": len(s)}
                      for t, s in tasks.items()}}  # fmt: skip


def test_a_recorded_condition_is_not_run_again(tmp_path, monkeypatch):
    exp = make_experiment(tmp_path)
    exp._write("eval-sft-6.json", report("1100", "10"))

    def never(*a, **k):
        raise AssertionError("a recorded condition was run again")

    monkeypatch.setattr(exp, "train", never)
    monkeypatch.setattr(exp, "evaluate", never)
    exp.condition("sft", 6)  # recorded: nothing to do
    with pytest.raises(AssertionError, match="run again"):
        exp.condition("sd", 6)  # not recorded: it would train


def test_the_results_come_from_the_record_alone(tmp_path):
    exp = make_experiment(tmp_path)
    exp._write("config.json", exp.config)
    exp._write("prune-6.json", {"removed_layers": [13, 14, 15, 16, 17, 18]})
    exp._write("eval-unpruned.json", report("1111", "11"))
    exp._write("eval-sft-6.json", report("1100", "10"))
    exp._write("eval-sd-6.json", report("1110", "11"))
    exp._write("train-sd-6.json", {"rows": 4, "steps": [{"loss": 2.0}], "tokens": 10,
                                   "first_loss": 2.5, "final_loss": 2.0, "seconds": 3})  # fmt: skip
    exp.times = {"finetune sd-6": 3.0}
    exp._write("cpus.json", {"finetune sd-6": "some CPU"})
    assert not (tmp_path / "run").exists()
    recovery.write_results(exp, tmp_path / "results.md")
    text = (tmp_path / "results.md").read_text()
    assert "| 6 blocks [13, 14, 15, 16, 17, 18], no fine-tuning | pending" in text
    assert "| 6 blocks, SFT | 0.500 | 0.500 | 0.500 | 50.0% |" in text
    sd_vs_sft = next(ln for ln in text.splitlines() if ln.startswith("| 6 blocks: self-data"))
    assert "+25.0" in sd_vs_sft and "(1/0)" in sd_vs_sft  # arc_easy: one document more
    assert "- `sd-6`: 4 rows, 1 steps" in text
    assert "- finetune sd-6: 3.0 (some CPU)" in text


def test_a_rebuilt_prune_must_remove_the_recorded_blocks(tmp_path, monkeypatch):
    import service.models
    import service.prune

    exp = make_experiment(tmp_path, blocks=6)
    exp._write("prune-6.json", {"removed_layers": [13, 14, 15, 16, 17, 18]})
    monkeypatch.setattr(service.models, "load_model", lambda ref: (None, None))
    monkeypatch.setattr(service.prune, "score_calibration", lambda *a: None)
    monkeypatch.setattr(service.prune, "run_prune",
                        lambda *a: {"removed_layers": [4, 5, 6, 7, 8, 9]})  # fmt: skip
    with pytest.raises(SystemExit, match="the record says"):
        exp.prune_all()
    assert json.loads((tmp_path / "record" / "prune-6.json").read_text())["removed_layers"][0] == 13
