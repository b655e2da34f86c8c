"""Tiny random decoder models of the architectures users bring, one builder for all.

    from tests.tiny_models import FAMILIES, build_tiny
    build_tiny("gemma3", out_dir, tokenizer_dir)      # 6 blocks, hidden 64, head size 32

Every family gets hidden 64, two query heads of size 32 (vLLM's CPU attention refuses a
head size of 16), an intermediate size of 128 and the builtin's tokenizer, so one
vocabulary serves as student and teacher. Where an architecture has something pruning
must carry (per-layer ``layer_types`` with a sliding window shorter than the tests'
prompts, Qwen3-MoE's dense layers among sparse ones, tied embeddings, Granite's logit
scaling, Gemma's soft-capping), the tiny config has it too, so the architecture matrix
(tests/test_architectures.py) exercises it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Family -> (config class name, causal LM class name, config fields beyond the shared ones).
# A sliding window of 16 tokens: the tests' prompts are longer, so a wrong layer_types
# after pruning changes the output.
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 16}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"head_dim": 32, "sliding_window": 16, "query_pre_attn_scalar": 32},
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        # Gemma 3's 5:1 pattern, shortened to 2:1 so six blocks hold two full layers.
        {
            "head_dim": 32,
            "sliding_window": 16,
            "query_pre_attn_scalar": 32,
            "sliding_window_pattern": 3,
        },
    ),  # fmt: skip
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        {"logits_scaling": 4.0, "residual_multiplier": 0.5, "embedding_multiplier": 2.0},
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        # Blocks 1 and 4 dense, the others sparse: pruning must renumber mlp_only_layers.
        {
            "head_dim": 32,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "mlp_only_layers": [1, 4],
        },
    ),  # fmt: skip
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {"rotary_pct": 0.25, "use_parallel_residual": True},
    ),
}


def shared_fields(vocab_size: int, layers: int, hidden: int) -> dict[str, Any]:
    """The config fields every family's tiny model shares (two query heads of 32)."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 2048,
    }


def build_tiny(
    family: str,
    out: Path,
    tokenizer_dir: Path,
    layers: int = 6,
    hidden: int = 64,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Save a tiny random model of ``family`` with the tokenizer at ``tokenizer_dir`` into
    ``out``; ``overrides`` are config fields (e.g. ``initializer_range``)."""
    import transformers
    from transformers import AutoTokenizer

    cfg_name, model_name, extra = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    fields: dict[str, Any] = {
        **shared_fields(len(tok), layers, hidden),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": pad,
    }
    if family == "gpt_neox":  # no grouped-query attention
        del fields["num_key_value_heads"]
    fields.update(extra)
    fields.update(overrides)
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_name)(**fields)
    model = getattr(transformers, model_name)(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_llama_config(vocab_size: int, layers: int = 6, hidden: int = 64, **overrides: Any):
    """The tiny Llama's config alone (no tokenizer, no weights), for tests that build the
    model in memory (tests/test_flops.py); ``overrides`` change any field."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**shared_fields(vocab_size, layers, hidden), **FAMILIES["llama"][2],
                          **overrides})  # fmt: skip
