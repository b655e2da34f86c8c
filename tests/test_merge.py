"""SLERP merge through mergekit, checked against the formula on real tiny models."""

import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from service.errors import ModelError
from service.merge import run_merge
from service.specs import MergeSpec
from tests.conftest import build_tiny_llama


def _slerp(t, a, b):
    """Reference SLERP of two whole tensors (Shoemake 1985), lerp when nearly parallel."""
    x, y = a.double().flatten(), b.double().flatten()
    cos = float(torch.dot(x / x.norm(), y / y.norm()).clamp(-1, 1))
    if abs(cos) > 0.9995:
        r = (1 - t) * x + t * y
    else:
        th = math.acos(cos)
        r = (math.sin((1 - t) * th) * x + math.sin(t * th) * y) / math.sin(th)
    return r.reshape(a.shape).float()


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tokenizer_dir):
    a = build_tiny_llama(tmp_path_factory.mktemp("a"), tokenizer_dir, layers=2, hidden=32, seed=1)
    b = build_tiny_llama(tmp_path_factory.mktemp("b"), tokenizer_dir, layers=2, hidden=32, seed=2)
    return a, b


def test_merge_with_itself_is_itself(two_models, tmp_path):
    a, _ = two_models
    copy = shutil.copytree(a, tmp_path / "copy")  # mergekit refuses the same path twice
    run_merge(MergeSpec(models=[str(a), str(copy)], t=0.3), tmp_path / "m")
    sa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    sm = AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    assert sa.keys() == sm.keys()
    for k in sa:
        torch.testing.assert_close(sm[k], sa[k], rtol=1e-5, atol=1e-6)


def test_merge_matches_formula(two_models, tmp_path):
    a, b = two_models
    report = run_merge(MergeSpec(models=[str(a), str(b)], t=0.5), tmp_path / "m")
    assert report["t"] == 0.5
    sa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    sb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    sm = merged.state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(sm[key], sa[key])
    torch.testing.assert_close(sm[key], _slerp(0.5, sa[key], sb[key]), rtol=1e-4, atol=1e-5)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(merged(ids).logits).all()


def test_merge_refuses_other_shapes(two_models, tmp_path, tokenizer_dir):
    a, _ = two_models
    c = build_tiny_llama(tmp_path / "c", tokenizer_dir, layers=3, hidden=32)
    with pytest.raises(ModelError, match="differ in shape"):
        run_merge(MergeSpec(models=[str(a), str(c)]), tmp_path / "m")
