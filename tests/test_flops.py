"""Parameter and FLOPs arithmetic against a hand count, against torch's own counters on a
real (tiny) model, and against the paper's Llama-3.1-8B numbers."""

from __future__ import annotations

import pytest
import torch

from service.flops import (
    LLAMA31_8B,
    compare,
    compare_dir,
    count_params,
    forward_flops_per_token,
    with_layers,
)
from tests.tiny_models import tiny_llama_config

# hidden 8, intermediate 16, 2 blocks, 2 heads of 4, 1 kv head, vocab 10, untied head.
SMALL = {
    "model_type": "llama",
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 10,
    "tie_word_embeddings": False,
}


def test_hand_count_small_config():
    # One block, by hand: q 8x8=64, k 8x4=32, v 32, o 64 -> 192; gate/up/down 3x8x16=384;
    # matmul weights 576; two norms 2x8=16 -> 592 params per block.
    # Model: embedding 10x8=80, head 80, 2 blocks 1184, final norm 8 -> 1352.
    p = count_params(SMALL)
    assert p["per_block"] == 592
    assert p["total"] == 1352
    assert p["non_embedding"] == 1352 - 80
    # FLOPs per token at context 5: linear 2x576=1152, attention 2x2x5x(2x4)=160 per
    # block -> 2x1312=2624; head 2x8x10=160; embedding 0 -> 2784.
    f = forward_flops_per_token(SMALL, context=5)
    assert f["per_block_linear"] == 1152
    assert f["per_block_attention"] == 160
    assert f["total"] == 2784


def test_saving_for_one_of_two_blocks():
    c = compare(SMALL, with_layers(SMALL, 1), context=5)
    assert c["params"] == [1352, 1352 - 592]
    assert c["flops_per_token"] == [2784, 2784 - 1312]
    assert c["flops_saving_pct"] == pytest.approx(100 * 1312 / 2784)


def test_tied_head_counted_once():
    tied = {**SMALL, "tie_word_embeddings": True}
    assert count_params(tied)["total"] == count_params(SMALL)["total"] - 80
    # Tying shares the weights, not the matmul: the head still costs 2 x hidden x vocab.
    assert forward_flops_per_token(tied, 5)["total"] == forward_flops_per_token(SMALL, 5)["total"]


def test_matches_a_real_model_and_torch_flop_counter():
    """Params equal the model's own count; FLOPs equal torch's FlopCounterMode over a
    forward of L tokens (eager attention, which scores all L x L pairs: context L)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config(1000, layers=3, intermediate_size=96, num_attention_heads=4,
                            num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    assert count_params(cfg)["total"] == sum(p.numel() for p in model.parameters())
    length = 13
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.randint(0, 1000, (1, length)))
    expected = length * forward_flops_per_token(cfg, context=length)["total"]
    assert counter.get_total_flops() == expected


def test_llama31_8b_matches_paper():
    c = compare(LLAMA31_8B, with_layers(LLAMA31_8B, 26))
    assert c["params"][0] / 1e9 == pytest.approx(8.03, abs=0.005)
    assert c["params"][1] / 1e9 == pytest.approx(6.72, abs=0.005)
    # The paper's 16.3% is the parameter (2N) saving; the lookup-aware count is higher.
    assert c["flops_2n_saving_pct"] == pytest.approx(16.3, abs=0.05)
    assert 16.3 < c["flops_saving_pct"] < 18.75  # below 6/32: the head is not cut


def test_compare_dir_of_a_pruned_model(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(with_layers(SMALL, 1)))
    c = compare_dir(tmp_path, layers_before=2, context=5)
    assert c["layers"] == [2, 1]
    assert c["params"] == [1352, 760]
