"""The depth of every kind of model reference is known at submission, so ``blocks`` at
or above it is a 422 before anything is queued, on a cold home as on a warm one: a
builtin's from its GGUF's metadata (never converted for this), a store model's from its
manifest (``tests/test_trust.py``), a hub model's and a local directory's from their
``config.json``. Hostile configs and GGUF files get a clear error.

    .venv/bin/python -m pytest tests/test_model_depth.py -q
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import ALPACA_ROWS
from tests.test_trust import error, upload

pytest_plugins = ["tests.redis_fixture"]


def hub_cache(root, repo: str, config: bytes | None) -> None:
    """A Hugging Face cache holding ``repo``'s config.json (huggingface_hub's layout)."""
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snap = folder / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    if config is not None:
        (snap / "config.json").write_bytes(config)


@pytest.mark.integration
def test_blocks_at_the_depth_of_every_kind_of_model_is_refused_before_queueing(
    api, tmp_path, monkeypatch, session_home
):
    """The depth of a builtin (its GGUF's metadata: no conversion, so a cold home answers
    like a warm one), a store model (covered above), a hub model (its config.json) and a
    local directory (the CLI's) is known at submission: ``blocks`` at or above it is a 422
    and nothing is queued."""
    from huggingface_hub import constants

    ds = upload(api, ALPACA_ROWS[:2])
    builtin = "builtin:smollm2-135m-instruct"
    converted = (session_home / "builtin").exists()
    for blocks in (30, 31, 1024):  # the builtin has 30
        for body in (
            {"type": "prune", "model": builtin, "calibration": ds, "blocks": blocks},
            {"type": "pipeline", "model": builtin, "dataset": ds, "blocks": blocks},
            {"type": "pipeline", "dataset": ds, "blocks": blocks},  # the default model
        ):
            err = error(api.post("/v1/jobs", json=body), 422)
            assert (
                err["details"]["num_hidden_layers"] == 30 and "between 1 and 29" in err["message"]
            )
    assert (session_home / "builtin").exists() == converted  # read without converting

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never the network in a test
    hub_cache(cache, "org/four", json.dumps({"num_hidden_layers": 4}).encode())
    hub_cache(cache, "org/vlm", json.dumps({"text_config": {"num_hidden_layers": 3}}).encode())
    for ref, depth in (("org/four", 4), ("hf:org/four", 4), ("org/vlm", 3)):
        body = {"type": "prune", "model": ref, "calibration": ds, "blocks": depth}
        err = error(api.post("/v1/jobs", json=body), 422)
        assert err["details"]["num_hidden_layers"] == depth, err
    hostile = {
        "org/text": b'{"num_hidden_layers": "4"}',
        "org/bool": b'{"num_hidden_layers": true}',
        "org/negative": b'{"num_hidden_layers": -1}',
        "org/absent": b'{"hidden_size": 64}',
        "org/list": b"[4]",
        "org/garbage": b"\xff\xfe not json",
        "org/huge": b'{"pad": "' + b"x" * (2 << 20) + b'", "num_hidden_layers": 4}',
        "org/noconfig": None,
    }
    for repo, config in hostile.items():
        hub_cache(cache, repo, config)
    for repo in [*hostile, "org/uncached"]:
        body = {"type": "prune", "model": repo, "calibration": ds, "blocks": 1}
        err = error(api.post("/v1/jobs", json=body), 422)
        assert err["code"] == "invalid_spec" and f"'{repo}'" in err["message"], err
        assert str(cache) not in json.dumps(err)  # no server path in the answer
    assert api.get("/v1/jobs").json()["data"] == []  # nothing was queued


def test_model_depth_of_local_directories_and_gguf_files(tiny_llama, tmp_path):
    """The CLI's local directories, and the GGUF reader against the gguf package's."""
    from gguf import GGUFReader

    from service.errors import ModelError
    from service.models import _builtin_gguf, gguf_block_count, model_depth

    assert model_depth(str(tiny_llama)) == 6
    assert model_depth("job_" + "0" * 20) is None  # an earlier step's product
    path = _builtin_gguf("smollm2-135m-instruct")
    field = GGUFReader(path).fields["llama.block_count"]
    assert gguf_block_count(path) == int(field.parts[field.data[0]][0]) == 30
    bad = tmp_path / "bad"
    bad.mkdir()
    for config in (b"{}", b'{"num_hidden_layers": 0}', b"nope", b'{"num_layers": 1e9}'):
        (bad / "config.json").write_bytes(config)
        with pytest.raises(ModelError, match="config.json"):
            model_depth(str(bad))
    for head in (b"", b"GGUF", path.read_bytes()[:200], b"NOPE" + b"\0" * 100):
        (tmp_path / "x.gguf").write_bytes(head)
        with pytest.raises(ModelError, match="block count"):
            gguf_block_count(tmp_path / "x.gguf")
    with pytest.raises(ModelError, match="unknown builtin"):
        model_depth("builtin:nope")
