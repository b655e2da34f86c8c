"""Calibration documents and the position read, and the check of the choice of blocks.

.venv/bin/python -m pytest -q tests/test_calibration.py
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from service.blocks import BlockScores, drop_blocks, score_blocks
from service.calibration import (
    calibration_batches,
    encode,
    load_calibration,
    plain_text,
    special_ids,
    split_docs,
)
from service.datasets import normalise, read_dataset
from service.errors import DatasetError, SpecError
from service.models import load_model
from service.prune import check_choice
from service.prune_check import check_candidates, without_blocks
from service.specs import PruneSpec
from tests.conftest import ALPACA_ROWS, build_tiny_llama
from tests.recorder import Recorder

OTHER_ROWS = [
    {"instruction": "Name a fruit.", "input": "", "output": "An apple is a fruit."},
    {"instruction": "Count to three.", "input": "", "output": "One, two, three."},
    {"instruction": "Say hello in Spanish.", "input": "", "output": "Hola."},
    {"instruction": "What colour is the sky?", "input": "", "output": "The sky is blue."},
    {"instruction": "Give a synonym.", "input": "happy", "output": "Glad."},
    {"instruction": "Describe a dog.", "input": "", "output": "A loyal animal with fur."},
]


@pytest.fixture(scope="module")
def per_token(tmp_path_factory, tokenizer_dir):
    """A tiny Llama with every attention output zeroed: the state at a position depends
    on its token alone, so scores say exactly which tokens were read."""
    path = build_tiny_llama(tmp_path_factory.mktemp("per-token"), tokenizer_dir, seed=2)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    model.save_pretrained(path)
    return load_model(str(path))


def _rows(items: list[dict]) -> list:
    return [normalise(obj, i)[0] for i, obj in enumerate(items, start=1)]


@pytest.mark.parametrize("presentation", ["text", "chat"])
def test_the_token_read_is_the_last_content_token(tiny_llama, presentation):
    """Every row ends on the same template tokens when chat-rendered; the position read
    must still be the end of the row's own text, never a special or template token."""
    _, tok = load_model(str(tiny_llama))
    special = special_ids(tok)
    for row in _rows(ALPACA_ROWS):
        enc = encode(row, tok, 256, presentation)
        assert enc is not None
        token = enc.ids[enc.read]
        assert token not in special
        # The text up to and including the read token ends with the response.
        assert tok.decode(enc.ids[: enc.read + 1]).rstrip().endswith(row.response.strip())
        if presentation == "chat":
            assert enc.read < len(enc.ids) - 1  # the template's end-of-turn follows
        else:
            assert enc.read == len(enc.ids) - 1


def test_truncated_rows_read_their_last_content_token_in_range(tiny_llama):
    _, tok = load_model(str(tiny_llama))
    row = _rows(ALPACA_ROWS)[5]  # the haiku: long enough to cut
    for presentation in ("text", "chat"):
        full = encode(row, tok, 256, presentation)
        cut = encode(row, tok, full.read - 3, presentation)
        assert cut.read == len(cut.ids) - 1 == full.read - 4
        assert cut.ids == full.ids[: full.read - 3]
    # A chat prefix longer than max_length holds no content: the row is skipped, and a
    # set of only such rows is an error rather than scores of template tokens.
    assert encode(row, tok, 8, "chat") is None
    with pytest.raises(SpecError, match="no calibration row has a content token"):
        calibration_batches([row], tok, 8, 1, "chat")


def test_rows_ending_in_the_same_token_are_scored_by_their_content(per_token):
    """Chat-rendered rows all end on ``<|im_end|>\\n``. Scored there, two sets with
    different text would get the same scores (that token's, in a model without
    attention) and the choice would be the template's. Read at the content, the scores
    follow the text, and both presentations read the same (content) tokens."""
    model, tok = per_token
    a, b = _rows(ALPACA_ROWS), _rows(OTHER_ROWS)

    def scores(rows, presentation, last_real=False):
        batches, read = calibration_batches(rows, tok, 256, 4, presentation)
        if last_real:  # the old rule: the last real token of the rendered row
            batches = [{k: v for k, v in x.items() if k != "read_index"} for x in batches]
        return score_blocks(model, batches), read

    chat_a, read_a = scores(a, "chat")
    chat_b, _ = scores(b, "chat")
    text_a, _ = scores(a, "text")
    old_a, _ = scores(a, "chat", last_real=True)
    old_b, _ = scores(b, "chat", last_real=True)
    mean = lambda s: s.angular_sum / s.samples  # noqa: E731
    # The old rule read one template token for every row: the sets are indistinguishable.
    torch.testing.assert_close(mean(old_a), mean(old_b), atol=1e-9, rtol=0)
    # Read at the content: the sets differ, and chat reads what plain text reads.
    assert (mean(chat_a) - mean(chat_b)).abs().max() > 1e-3
    torch.testing.assert_close(mean(chat_a), mean(text_a), atol=1e-6, rtol=0)
    assert read_a["distinct_tokens"] > 1 and read_a["rows_without_content"] == 0


def test_plain_text_calibration_sets(tmp_path, tiny_llama):
    lines = tmp_path / "c4.txt"
    lines.write_text("The first document.\n\nA second one, after a blank line.\n")
    assert load_calibration(str(lines)) == [
        "The first document.",
        "A second one, after a blank line.",
    ]
    jsonl = tmp_path / "c4.jsonl"
    jsonl.write_text(json.dumps({"text": "Some web text."}) + "\n")
    assert load_calibration(str(jsonl)) == ["Some web text."]
    _, tok = load_model(str(tiny_llama))
    enc = encode("Some web text.", tok, 64, "text")
    assert tok.decode(enc.ids[: enc.read + 1]).endswith("web text.")
    with pytest.raises(SpecError, match="no chat turns"):
        encode("Some web text.", tok, 64, "chat")
    # Text rows are for calibration: a training set of them is refused, naming the shape.
    with pytest.raises(DatasetError) as err:
        read_dataset(jsonl)
    assert "calibration only" in err.value.errors[0].message
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": 3}) + "\n")
    with pytest.raises(DatasetError) as err:
        load_calibration(str(bad))
    assert [(e.line, e.field) for e in err.value.errors] == [(1, "text"), (2, "text")]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DatasetError, match="holds no documents"):
        load_calibration(str(empty))


def test_plain_text_of_a_row_keeps_its_input():
    row = _rows(ALPACA_ROWS)[1]
    assert plain_text(row) == "Translate to French.\n\nGood morning\n\nBonjour"


def test_held_out_rows_are_disjoint_and_seeded():
    docs = [f"doc {i}" for i in range(20)]
    scored, held = split_docs(docs, 8, 4, seed=0)
    assert len(scored) == 8 and len(held) == 4 and not set(scored) & set(held)
    assert (scored, held) == split_docs(docs, 8, 4, seed=0)
    assert split_docs(docs, 30, 4, seed=0) == (docs, [])


def test_check_matches_a_really_pruned_model(tiny_llama, alpaca_file):
    """The KL the check measures with blocks taken out equals that of the model really
    cut by drop_blocks, and the model is whole again afterwards."""
    model, tok = load_model(str(tiny_llama))
    rows = read_dataset(alpaca_file)
    batches, _ = calibration_batches(rows, tok, 64, 4, "text")
    before = model(**{k: batches[0][k] for k in ("input_ids", "attention_mask")}).logits
    kls, tokens = check_candidates(model, batches, [[1, 2], [3, 4]])
    after = model(**{k: batches[0][k] for k in ("input_ids", "attention_mask")}).logits
    torch.testing.assert_close(before, after)
    assert tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    for removed, kl in zip([[1, 2], [3, 4]], kls, strict=True):
        cut, _ = load_model(str(tiny_llama))
        drop_blocks(cut, removed)
        total = 0.0
        for b in batches:
            mask = b["attention_mask"].bool()
            with torch.no_grad():
                p = torch.log_softmax(model(b["input_ids"], b["attention_mask"]).logits, -1)
                q = torch.log_softmax(cut(b["input_ids"], b["attention_mask"]).logits, -1)
            total += float((p.exp() * (p - q)).sum(-1)[mask].sum())
        assert kl > 0 and kl == pytest.approx(total / tokens, rel=1e-4)
    with without_blocks(model, [0]):
        assert len(model.model.layers) == 5
    assert len(model.model.layers) == 6


def test_check_overrides_a_misleading_distance(tiny_llama, tmp_path, tokenizer_dir):
    """Distances that favour blocks 0-2 of a model whose blocks 3-5 are identities: the
    check keeps the run that leaves the output unchanged, and reports every candidate."""
    path = build_tiny_llama(tmp_path / "m", tokenizer_dir, layers=8, seed=1)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for i in (3, 4, 5):
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    _, tok = load_model(str(path))
    ang = torch.ones(9, 9, dtype=torch.float64)
    for start, d in enumerate([0.1, 0.3, 0.4, 0.2, 0.5, 0.6]):
        ang[start, start + 3] = d  # the (misleading) 3-block distances, summed over 1 row
    cos = torch.tensor([0, 0, 0, 10, 10, 10, 0, 0], dtype=torch.float64)  # BI: 3-5 lowest
    scores = BlockScores(8, 1, 10, ang, cos)
    docs = _rows(ALPACA_ROWS)
    spec = PruneSpec(model=str(path), calibration="unused", blocks=3, candidates=2)
    removed, cands, check = check_choice(spec, model, tok, scores, docs, [], Recorder())
    assert [c["removed"] for c in cands] == [[0, 1, 2], [3, 4, 5]]
    assert removed == [3, 4, 5] and check["chosen"] == 1 and not check["held_out"]
    assert cands[1]["kl"] < 1e-6 < cands[0]["kl"]
    one = spec.model_copy(update={"candidates": 1})
    assert check_choice(one, model, tok, scores, docs, [], Recorder())[0] == [0, 1, 2]
    with_bi = one.model_copy(update={"check_bi": True})
    removed, cands, _ = check_choice(with_bi, model, tok, scores, docs, [], Recorder())
    assert [(c["removed"], c["by"]) for c in cands] == [([0, 1, 2], "angular"), ([3, 4, 5], "bi")]
    assert removed == [3, 4, 5]
