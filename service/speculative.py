"""The recovered model as a speculative-decoding draft for its teacher (DESIGN.md step 6).

    distillery evaluate --model recovered/ --teacher builtin:smollm2-135m-instruct \\
        --draft-k 5 --out eval.json        # "speculative" in eval.json

Three measurements:

- ``acceptance``: exact draft-k acceptance for greedy decoding, from one forward of each
  model along the teacher's greedy continuation (see ``service/agreement.py``). With
  greedy decoding on both sides, a round that starts after the teacher's prefix y_<i
  proposes the draft's greedy tokens; while they match, the draft is conditioned on the
  teacher's own prefix, so the accepted length is the run of consecutive positions
  j >= i where argmax draft(y_<j) == y_j, capped at k. The teacher then emits one token
  of its own (the correction, or the bonus token when all k are accepted), so a round
  advances accepted + 1 tokens for one teacher forward (Leviathan et al. 2023, Alg. 1).
- ``assisted_speedup``: wall clock of ``teacher.generate(..., assistant_model=draft)``
  against plain greedy generation (transformers assisted generation, k fixed), with a
  check that the outputs are identical.
- ``vllm_speculative``: vLLM's draft-model speculative decoding on a GPU
  (``speculative_config={"model", "num_speculative_tokens", "method": "draft_model"}``),
  acceptance from ``llm.get_metrics()``. Each engine runs in its own spawned process,
  because vLLM frees GPU memory only when its process ends (vLLM #1908, #6544).
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import time
from typing import Any

import torch


def acceptance(matches: list[list[bool]], k: int) -> dict:
    """Draft-k speculative decoding replayed over per-position matches.

    ``matches[p][j]`` says whether the draft's greedy token at position j of prompt p's
    teacher continuation equals the teacher's. Near the end a round proposes only the
    tokens left (min(k, remaining)); when it accepts all of them the sequence is done.
    """
    rounds = proposed = accepted = emitted = 0
    hist = [0] * (k + 1)  # rounds that accepted 0..k tokens
    for m in matches:
        i, n = 0, len(m)
        while i < n:
            prop = min(k, n - i)
            a = 0
            while a < prop and m[i + a]:
                a += 1
            step = a + 1 if i + a < n else a  # + the teacher's own token, if any is left
            rounds += 1
            proposed += prop
            accepted += a
            emitted += step
            hist[a] += 1
            i += step
    return {
        "k": k,
        "rounds": rounds,
        "proposed": proposed,
        "accepted": accepted,
        # accepted / proposed draft tokens (vLLM's "draft acceptance rate").
        "acceptance_rate": accepted / proposed if proposed else None,
        # Accepted draft tokens per round, 0..k.
        "mean_accepted": accepted / rounds if rounds else None,
        # Tokens per teacher forward = mean accepted + 1 (vLLM's "mean acceptance length").
        "tokens_per_round": emitted / rounds if rounds else None,
        "accepted_hist": hist,
        "method": "exact replay of greedy draft-k decoding",
    }


def _greedy(model, ids: torch.Tensor, max_new_tokens: int, pad_id: int, **kw) -> torch.Tensor:
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        **kw,
    )


def assisted_speedup(
    teacher, draft, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, k: int
) -> dict:
    """Seconds of plain vs assisted greedy generation over the prompts (one at a time:
    transformers' assisted generation takes batch size 1), and whether outputs match."""
    gen = draft.generation_config
    saved = (gen.num_assistant_tokens, gen.num_assistant_tokens_schedule)
    saved_threshold = getattr(gen, "assistant_confidence_threshold", None)
    # A constant k, and no confidence-based early stop of the draft (transformers'
    # default threshold 0.4 would draft fewer than k tokens).
    gen.num_assistant_tokens, gen.num_assistant_tokens_schedule = k, "constant"
    gen.assistant_confidence_threshold = 0.0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    plain_s = assisted_s = 0.0
    identical = tokens = 0
    try:
        with torch.no_grad():
            warm = torch.tensor([prompt_ids[0]], device=teacher.device)
            _greedy(teacher, warm, 4, pad)
            _greedy(teacher, warm, 4, pad, assistant_model=draft)
            for ids in prompt_ids:
                x = torch.tensor([ids], device=teacher.device)
                t0 = time.perf_counter()
                plain = _greedy(teacher, x, max_new_tokens, pad)
                t1 = time.perf_counter()
                assisted = _greedy(teacher, x, max_new_tokens, pad, assistant_model=draft)
                t2 = time.perf_counter()
                plain_s += t1 - t0
                assisted_s += t2 - t1
                tokens += plain.shape[1] - x.shape[1]
                identical += int(torch.equal(plain, assisted))
    finally:
        gen.num_assistant_tokens, gen.num_assistant_tokens_schedule = saved
        gen.assistant_confidence_threshold = saved_threshold
    return {
        "prompts": len(prompt_ids),
        "tokens": tokens,
        "plain_s": round(plain_s, 3),
        "assisted_s": round(assisted_s, 3),
        "speedup": plain_s / assisted_s if assisted_s else None,
        "identical": identical,
        "device": str(teacher.device),
        "k": k,
    }


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def _vllm_generate(
    model: str, draft: str | None, prompts: list[list[dict]], k: int, max_tokens: int
) -> dict:
    """One vLLM engine in this (spawned) process: greedy chat over the prompts."""
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = {"disable_log_stats": False, "gpu_memory_utilization": 0.4}
    if draft:
        kwargs["speculative_config"] = {
            "model": draft,
            "num_speculative_tokens": k,
            "method": "draft_model",
        }
    llm = LLM(model=model, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    llm.chat(prompts[:2], params)  # warm-up (compilation, CUDA graphs)
    t0 = time.perf_counter()
    outputs = llm.chat(prompts, params)
    seconds = time.perf_counter() - t0
    counters = {"drafts": 0.0, "draft_tokens": 0.0, "accepted": 0.0}
    per_pos = [0.0] * k
    names = {
        "vllm:spec_decode_num_drafts": "drafts",
        "vllm:spec_decode_num_draft_tokens": "draft_tokens",
        "vllm:spec_decode_num_accepted_tokens": "accepted",
    }
    for metric in llm.get_metrics():
        if metric.name in names:
            counters[names[metric.name]] += metric.value
        elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            for pos, val in enumerate(metric.values[:k]):
                per_pos[pos] += val
    return {
        "seconds": seconds,
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "counters": counters,
        "per_pos": per_pos,
    }


def _in_child(*args) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_vllm_generate, args)


def vllm_speculative(
    teacher: str, draft: str, prompts: list[list[dict]], k: int, max_tokens: int
) -> dict:
    """vLLM draft-model speculative decoding vs plain decoding, greedy, on the GPU.

    ``teacher`` and ``draft`` are local model directories with the same vocabulary;
    ``prompts`` are chat conversations. The counters cover the warm-up too (two prompts),
    which the warm-up's share of drafts barely moves."""
    plain = _in_child(teacher, None, prompts, k, max_tokens)
    spec = _in_child(teacher, draft, prompts, k, max_tokens)
    c = spec["counters"]
    drafts = c["drafts"]
    return {
        "k": k,
        "prompts": len(prompts),
        "acceptance_rate": c["accepted"] / c["draft_tokens"] if c["draft_tokens"] else None,
        "mean_acceptance_length": 1 + c["accepted"] / drafts if drafts else None,
        "acceptance_per_position": [v / drafts for v in spec["per_pos"]] if drafts else [],
        "plain_s": round(plain["seconds"], 3),
        "speculative_s": round(spec["seconds"], 3),
        "speedup": plain["seconds"] / spec["seconds"] if spec["seconds"] else None,
        "identical": sum(
            a == b for a, b in zip(plain["token_ids"], spec["token_ids"], strict=True)
        ),
        "counters": c,
    }
