"""Paired bootstrap differences (service/stats.py)."""

from __future__ import annotations

import numpy as np
import pytest

from service.stats import paired_difference, task_scores


def _bits(x) -> str:
    return "".join("1" if v else "0" for v in x)


def test_identical_models_differ_by_exactly_zero():
    a = {"piqa": "0110101", "arc_easy": "1100"}
    r = paired_difference(a, dict(a), resamples=500)
    assert r["diff"] == 0 and r["ci"] == [0, 0]
    assert all(t["a_only"] == t["b_only"] == 0 for t in r["tasks"].values())


def test_difference_and_counts_are_exact():
    a = {"t": "1110", "u": "10"}
    b = {"t": "1000", "u": "11"}
    r = paired_difference(a, b, resamples=200)
    assert r["tasks"]["t"]["diff"] == pytest.approx(0.5)
    assert r["tasks"]["t"]["a_only"] == 2 and r["tasks"]["t"]["b_only"] == 0
    assert r["tasks"]["u"]["diff"] == pytest.approx(-0.5)
    assert r["diff"] == pytest.approx(0.0)  # tasks weigh equally


def test_pairing_narrows_the_interval_and_covers_the_truth():
    # B agrees with A except on 6% of documents, where it is wrong: a true difference
    # of about 0.06. Unpaired, two accuracies near 0.5 over 2000 documents carry ±0.03
    # each; paired, the interval is far narrower and excludes 0.
    rng = np.random.default_rng(1)
    n = 2000
    a = rng.random(n) < 0.5
    flip = rng.random(n) < 0.06
    b = a & ~flip
    r = paired_difference({"t": _bits(a)}, {"t": _bits(b)}, resamples=2000, seed=3)
    lo, hi = r["ci"]
    true = a.mean() - b.mean()
    assert lo <= true <= hi
    assert lo > 0
    unpaired_halfwidth = 1.96 * np.sqrt(2 * 0.25 / n)
    assert (hi - lo) / 2 < 0.5 * unpaired_halfwidth


def test_different_documents_are_refused():
    with pytest.raises(ValueError, match="same documents"):
        paired_difference({"t": "101"}, {"t": "10"})
    with pytest.raises(ValueError, match="different tasks"):
        paired_difference({"t": "1"}, {"u": "1"})


def test_task_scores_reads_a_report():
    report = {"tasks": {"piqa": {"acc": 0.5, "scores": "10"}, "boolq": {"acc": 1, "scores": "1"}}}
    assert task_scores(report, ["piqa"]) == {"piqa": "10"}
    with pytest.raises(ValueError, match="per-document"):
        task_scores({"tasks": {"piqa": {"acc": 0.5}}})
