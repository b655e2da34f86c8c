"""Roofline of a generation workload: its exact FLOPs and bytes, and this machine's rates.

    .venv/bin/python -m bench.roofline          # prints the measured rates

Two bounds, both independent of the engine:

- ``workload_flops / rate`` (issue 4's roofline): the exact FLOPs over the best fp32
  matrix-product rate measured on the model's own shapes.
- ``memory_bound``: the same FLOPs scheduled as well as possible (every sequence in one
  batch, one decode step per generated position) where each decode step also has to
  stream the weights and read every live sequence's keys and values; a step takes
  ``max(flops / rate, bytes / bandwidth)``. On a CPU whose matrix units outrun its memory,
  decode steps at tens of sequences are bound by the bytes, not the FLOPs.
"""

from __future__ import annotations

import statistics
import time

import torch


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def layer_shapes(cfg) -> list[tuple[int, int]]:
    """(in, out) of every linear product in one decoder block."""
    h, d = cfg.hidden_size, head_dim(cfg)
    q, kv, inter = cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.intermediate_size
    return [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]


def _per_token(cfg) -> tuple[float, float, float]:
    """FLOPs of the linear products of all blocks, of the attention per key, of the LM head."""
    linear = 2 * sum(i * o for i, o in layer_shapes(cfg)) * cfg.num_hidden_layers
    attn_per_key = 4 * cfg.num_attention_heads * head_dim(cfg) * cfg.num_hidden_layers
    return linear, attn_per_key, 2 * cfg.hidden_size * cfg.vocab_size


def workload_flops(cfg, prompt_lens: list[int], gen_lens: list[int]) -> float:
    """Exact FLOPs (2 per multiply-add) of generating ``gen_lens`` tokens after prompts
    of ``prompt_lens`` tokens.

    A request with P prompt tokens and G generated ones runs the decoder on positions
    0..P+G-2 (the last generated token is never fed back) and the LM head G times (at
    the last prompt position and at each fed-back token). Per position p and block:
    the linear products, plus QK^T and AV over p+1 keys (4 * heads * head_dim * (p+1))."""
    linear, attn_per_key, head = _per_token(cfg)
    total = 0.0
    for p, g in zip(prompt_lens, gen_lens, strict=True):
        positions = p + max(g, 1) - 1
        total += positions * linear + attn_per_key * positions * (positions + 1) / 2 + g * head
    return total


def memory_bound(cfg, prompt_lens, gen_lens, rate_gflops: float, bw_gbs: float) -> float:
    """Seconds: prefill FLOPs at ``rate``, then each decode step at the slower of its FLOPs
    and its bytes (all weights once, plus the live sequences' keys and values)."""
    linear, attn_per_key, head = _per_token(cfg)
    rate, bw = rate_gflops * 1e9, bw_gbs * 1e9
    params = sum(i * o for i, o in layer_shapes(cfg)) * cfg.num_hidden_layers
    weight_bytes = 4 * (params + cfg.hidden_size * cfg.vocab_size)
    kv_bytes_per_pos = 4 * 2 * cfg.num_key_value_heads * head_dim(cfg) * cfg.num_hidden_layers
    prefill = sum(p * linear + attn_per_key * p * (p + 1) / 2 + head for p in prompt_lens)
    seconds = prefill / rate
    for step in range(1, max(gen_lens, default=1)):  # feeds generated token `step`
        live = [(p, g) for p, g in zip(prompt_lens, gen_lens, strict=True) if g > step]
        flops = sum(linear + head + attn_per_key * (p + step) for p, _ in live)
        nbytes = weight_bytes + sum(kv_bytes_per_pos * (p + step) for p, _ in live)
        seconds += max(flops / rate, nbytes / bw)
    return seconds


def matmul_rate(cfg, sizes=(64, 256, 1024), seconds: float = 1.0) -> float:
    """fp32 GFLOP/s of one decoder block's matrix products (``F.linear``) at M rows, best
    over M; the median of repeated timings at each M."""
    best = 0.0
    for m in sizes:
        mats = [(torch.randn(m, i), torch.randn(o, i)) for i, o in layer_shapes(cfg)]
        flops = 2 * m * sum(i * o for i, o in layer_shapes(cfg))

        def products(mats=mats):
            for x, w in mats:
                torch.nn.functional.linear(x, w)

        times = _time_repeated(products, seconds)
        best = max(best, flops / statistics.median(times) / 1e9)
    return best


def streamed_matmul_rate(cfg, m: int = 64, repeats: int = 3) -> float:
    """fp32 GFLOP/s of a decode step's block products at ``m`` rows when, as in a real
    step, every weight comes from memory: one pass over all the model's blocks (distinct
    weights), the best of ``repeats`` passes. Not the roofline (that is the best rate),
    but the reason decode steps stay below it: at tens of rows the products do not hide
    the weights' streaming."""
    x = {i: torch.randn(m, i) for i, _ in layer_shapes(cfg)}
    blocks = [
        [torch.randn(o, i) for i, o in layer_shapes(cfg)] for _ in range(cfg.num_hidden_layers)
    ]

    def one_pass():
        for block in blocks:
            for w in block:
                torch.nn.functional.linear(x[w.shape[1]], w)

    one_pass()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        one_pass()
        best = min(best, time.perf_counter() - t)
    flops = 2 * m * sum(i * o for i, o in layer_shapes(cfg)) * cfg.num_hidden_layers
    return flops / best / 1e9


def read_bandwidth(mib: int = 512, seconds: float = 1.0) -> float:
    """GB/s of reading a tensor much larger than the caches (a sum over it)."""
    x = torch.ones(mib * 2**20 // 4)
    times = _time_repeated(x.sum, seconds)
    return x.numel() * 4 / statistics.median(times) / 1e9


def _time_repeated(fn, seconds: float) -> list[float]:
    fn()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


class Machine:
    """The best rates seen so far. Other processes can slow any one measurement down on
    a shared machine, so the bench measures again between runs and keeps the maximum:
    the roofline is what the machine can do."""

    def __init__(self, cfg):
        self.cfg, self.rate, self.bandwidth = cfg, 0.0, 0.0

    def measure(self) -> None:
        self.rate = max(self.rate, matmul_rate(self.cfg))
        self.bandwidth = max(self.bandwidth, read_bandwidth())


if __name__ == "__main__":
    from service.models import load_model

    model, _tok = load_model("builtin:smollm2-135m-instruct", device="cpu")
    m = Machine(model.config)
    m.measure()
    print(f"threads {torch.get_num_threads()}: {m.rate:.0f} GFLOP/s, {m.bandwidth:.1f} GB/s read")
    streamed = streamed_matmul_rate(model.config)
    print(f"block products at 64 rows, weights streamed from memory: {streamed:.0f} GFLOP/s")
