"""The run report over a run directory made by the real steps on the tiny Llama
(prune, fine-tune, teacher agreement); the accuracy files are written in
service/evaluate.py's format, since lm-eval on the tiny model would only measure noise.

    .venv/bin/python -m pytest -q tests/test_report.py
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from service.agreement import compare_models
from service.cli import main
from service.finetune import run_finetune
from service.prune import run_prune
from service.report import SECTIONS, run_report
from service.report_plots import distance_matrix
from service.specs import FinetuneSpec, PipelineSpec, PruneSpec
from tests.conftest import ALPACA_ROWS


def _eval(model: str, accs: dict[str, float], extra: dict | None = None) -> dict:
    tasks = {
        t: {"metric": "acc", "acc": a, "acc_stderr": 0.05, "acc_norm": a, "n": 40}
        for t, a in accs.items()
    }
    return {"model": model, "tasks": tasks, "average": sum(accs.values()) / len(accs),
            "limit": 40, "data_dir": "/data", **(extra or {})}  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_llama, session_home) -> Path:
    run = tmp_path_factory.mktemp("run")
    data = run / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ALPACA_ROWS))
    spec = PipelineSpec(model=str(tiny_llama), dataset=str(data), blocks=2, samples=8)
    (run / "pipeline_spec.json").write_text(json.dumps(spec.model_dump(mode="json")))
    run_prune(
        PruneSpec(model=str(tiny_llama), calibration=str(data), blocks=2, samples=8),
        run / "pruned",
    )
    run_finetune(
        FinetuneSpec(
            model=str(run / "pruned"),
            dataset=str(data),
            epochs=2,
            batch_size=2,
            micro_batch_size=2,
            lr=1e-3,
        ),  # fmt: skip
        run / "recovered",
    )
    evals = {
        "baseline": _eval(str(tiny_llama), {"arc_easy": 0.5, "piqa": 0.6}),
        "pruned": _eval(str(run / "pruned"), {"arc_easy": 0.3, "piqa": 0.5}),
        "recovered": _eval(str(run / "recovered"), {"arc_easy": 0.4, "piqa": 0.55}),
    }
    for name in ("pruned", "recovered"):
        evals[name].update(
            compare_models(
                str(run / name), str(tiny_llama), prompts=3, max_new_tokens=8, k=3,
                speedup_prompts=1 if name == "recovered" else 0, data_dir=session_home,
                use_vllm=False,
            )
        )  # fmt: skip
    for name, e in evals.items():
        (run / f"eval_{name}.json").write_text(json.dumps(e))
    (run / "distill_summary.json").write_text(
        json.dumps({"rows": 8, "distilled_fraction": 0.75, "tokens_per_s": 12.0})
    )
    return run


def test_report_has_every_section(run_dir):
    result = run_report(run_dir)
    assert result["missing"] == []
    page = Path(result["html"]).read_text()
    md = Path(result["markdown"]).read_text()
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page
        assert f"## {title}" in md
    assert "not available" not in page
    # Self-contained: three figures embedded, nothing loaded from elsewhere.
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 3 and all(len(i) > 5000 for i in images)
    assert not re.search(r"(src|href)=['\"](?!data:)", page)
    # The markdown points at PNGs beside it.
    for name in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (run_dir / name).read_bytes()[:4] == b"\x89PNG"
    assert sorted(Path(p).name for p in result["plots"]) == [
        "report_accuracy.png", "report_distances.png", "report_loss.png",
    ]  # fmt: skip


def test_report_content_matches_the_run(run_dir):
    run_report(run_dir)
    md = (run_dir / "report.md").read_text()
    prune = json.loads((run_dir / "pruned" / "prune_report.json").read_text())
    assert f"Removed blocks **{prune['removed_layers']}**" in md
    # Every checked candidate with its distance and check score; the tokens read.
    assert len(prune["candidates"]) > 1
    for c in prune["candidates"]:
        assert f"| {', '.join(map(str, c['removed']))} | angular | {c['distance']:.4f} | " in md
        assert f"{c['kl']:.4f}" in md
    assert f"presented as **{prune['read']['presentation']}**" in md
    # recovered retention: mean(0.4/0.5, 0.55/0.6) = mean(0.8, 0.9167) = 85.8%
    assert re.search(
        r"\| recovered \| 0\.400 ± 0\.050 \| 0\.550 ± 0\.050 \| 0\.475 \| 85\.8% \|", md
    )
    rec = json.loads((run_dir / "eval_recovered.json").read_text())
    assert f"{rec['agreement']['kl_mean']:.4f}" in md
    assert f"{100 * rec['speculative']['acceptance_rate']:.1f}%" in md
    # FLOPs of 6 -> 4 blocks of the tiny model are in the table.
    assert "| blocks | 6 | 4 | 33.3% |" in md
    assert '"lora_rank": 8' in md  # the fine-tuning spec


def test_empty_run_dir_reports_everything_missing(tmp_path):
    result = run_report(tmp_path)
    assert result["missing"] == list(SECTIONS)
    page = (tmp_path / "report.html").read_text()
    assert all(f"<h2>{t}</h2>" in page for t in SECTIONS)
    assert page.count("not available") == len(SECTIONS)
    assert result["plots"] == []


def test_block_influence_run_and_partial_dir(tmp_path):
    (tmp_path / "pruned").mkdir()
    report = {"metric": "bi", "num_layers_before": 4, "num_layers_after": 3,
              "removed_layers": [2], "distances": {"1": [0.3, 0.2, 0.05, 0.4]}}  # fmt: skip
    (tmp_path / "pruned" / "prune_report.json").write_text(json.dumps(report))
    result = run_report(tmp_path)
    assert "Pruning: block distances and removed blocks" not in result["missing"]
    assert "Training loss" in result["missing"]
    assert (tmp_path / "report_distances.png").is_file()


def test_distance_matrix_layout():
    m, sizes = distance_matrix({"1": [0.1, 0.2, 0.3], "2": [0.4, 0.5]}, depth=3)
    assert sizes == [1, 2] and m.shape == (3, 2)
    assert m[1, 1] == 0.5 and math.isnan(m[2, 1])


def test_cli_report(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["html"].endswith("report.html")
    assert main(["report", str(run_dir / "nope")]) == 1
