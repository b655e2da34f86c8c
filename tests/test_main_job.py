"""The main job's shared options: the data it picks and the spec it builds."""

import argparse

from service import main_job_options as main_job
from service.specs import PipelineSpec


def _args(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    main_job.add_options(ap)
    return ap.parse_args(list(argv))


def test_uses_the_alpaca_sample_when_present(tmp_path):
    alpaca = tmp_path / "data" / "alpaca" / "alpaca_5000.json"
    alpaca.parent.mkdir(parents=True)
    alpaca.write_text('[{"instruction": "Say hi.", "input": "", "output": "Hi."}]')
    args = _args("--data-dir", str(tmp_path / "data"), "--tasks", "piqa", "--rows", "8")
    dataset, tasks, generated = main_job.dataset_and_tasks(args, tmp_path / "gen")
    assert (dataset, tasks, generated) == (alpaca, ["piqa"], False)
    spec = PipelineSpec(**main_job.pipeline_fields(args, str(dataset), tasks))
    assert (spec.limit, spec.blocks, spec.samples, spec.tasks) == (8, 6, 128, ["piqa"])
    assert not (tmp_path / "gen").exists()


def test_generates_arithmetic_data_without_the_data_folder(tmp_path):
    args = _args("--data-dir", str(tmp_path / "absent"), "--rows", "16")
    dataset, tasks, generated = main_job.dataset_and_tasks(args, tmp_path / "gen")
    assert generated and tasks == ["arith"]
    assert dataset.parent == tmp_path / "gen"
    assert len(dataset.read_text().splitlines()) == 16
    assert (tmp_path / "gen" / "arith" / "arith.jsonl").is_file()
