"""Teacher throughput: generated tokens/s of each engine on the same prompts, against
plain ``generate`` at batch 64 and against the workload's roofline (issue 4).

    DISTILLERY_HOME=/tmp/dhome .venv/bin/python -m bench.teacher_throughput \\
        --n 64 --n-batch1 8 --max-new-tokens 128 --sets gsm8k,distill

Prompt sets: ``gsm8k`` (GSM8K test questions as chat prompts, the template's default
system prompt) and ``distill`` (the SDFT general template on Alpaca rows, built with
``service.templates.build_request`` as the distillation loop does). Greedy decoding.

Engines (``--engines``): ``hf1`` and ``hf64`` (``HFEngine``: plain ``generate`` with left
padding at batch 1, on the first ``--n-batch1`` prompts, and at batch 64), ``fast`` (the
fast CPU engine), ``distill`` (``run_distill`` on the fast engine, i.e. the distillation
loop around it; ``distill`` set only), ``openai`` (``--openai-url``). On a GPU:
``vllm-offline`` (``vllm.LLM.generate`` on the same prompt tokens, nothing around it) and
``vllm`` (Distillery's ``VLLMEngine``); the last line gives their ratio.

Tokens/s counts generated tokens (EOS included, as every engine reports them) over the
whole wall time of the call, prefill included. The roofline is the workload's exact FLOPs
(``workload_flops``: linear layers per position, attention by position, the LM head only
where a token is picked) over the fp32 matrix-product rate the script measures on this
model's own matrix shapes; "% roofline" is how much of that rate an engine turned into
useful work. "same" is the share of outputs identical to ``hf64``'s (greedy exactness).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from service.teacher.base import GenParams, Request

DATA = Path(os.environ.get("DISTILLERY_DATA", Path(__file__).resolve().parents[2] / "shared/data"))


def gsm8k_requests(n: int) -> list[Request]:
    lines = (DATA / "gsm8k/test.jsonl").read_text().splitlines()[:n]
    return [Request((("user", json.loads(line)["question"]),)) for line in lines]


def distill_requests(n: int) -> list[Request]:
    from service.datasets import read_dataset
    from service.templates import build_request

    rows = read_dataset(DATA / "alpaca/alpaca_5000.json", limit=n)
    return [build_request(row, "general") for row in rows]


def layer_shapes(cfg) -> list[tuple[int, int]]:
    """(in, out) of every linear product in one decoder block."""
    h, d = (
        cfg.hidden_size,
        getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
    )
    q, kv, inter = cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.intermediate_size
    return [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]


def workload_flops(cfg, prompt_lens: list[int], gen_lens: list[int]) -> float:
    """Exact multiply-add FLOPs (2 per MAC) of greedy generation.

    A request with P prompt tokens and G generated ones runs the decoder on positions
    0..P+G-2 (the last generated token is never fed back) and the LM head G times (at
    the last prompt position and at each fed-back token). Per position p and block:
    the linear products, plus QK^T and AV over p+1 keys (4 * heads * head_dim * (p+1))."""
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    linear = 2 * sum(i * o for i, o in layer_shapes(cfg)) * cfg.num_hidden_layers
    attn_per_key = 4 * cfg.num_attention_heads * d * cfg.num_hidden_layers
    head = 2 * cfg.hidden_size * cfg.vocab_size
    total = 0.0
    for p, g in zip(prompt_lens, gen_lens, strict=True):
        positions = p + max(g, 1) - 1
        total += positions * linear + attn_per_key * positions * (positions + 1) / 2 + g * head
    return total


def matmul_rate(cfg, sizes=(64, 256, 1024), seconds: float = 1.0) -> float:
    """fp32 GFLOP/s of one decoder block's matrix products at M rows, best over M (median
    of repeated timings at each M): the rate this machine can reach on this model."""
    best = 0.0
    for m in sizes:
        mats = [(torch.randn(m, i), torch.randn(o, i)) for i, o in layer_shapes(cfg)]
        flops = 2 * m * sum(i * o for i, o in layer_shapes(cfg))
        for x, w in mats:
            torch.nn.functional.linear(x, w)
        times, t_end = [], time.perf_counter() + seconds
        while time.perf_counter() < t_end or len(times) < 5:
            t = time.perf_counter()
            for x, w in mats:
                torch.nn.functional.linear(x, w)
            times.append(time.perf_counter() - t)
        best = max(best, flops / statistics.median(times) / 1e9)
    return best


def timed(engine, requests, params) -> tuple[list, float]:
    t = time.perf_counter()
    gens = engine.generate(requests, params)
    return gens, time.perf_counter() - t


def run_vllm_offline(llm, tokenizer, requests, params) -> tuple[list[int], float]:
    from vllm import SamplingParams, TokensPrompt

    from service.teacher.hf_engine import render_prompt

    prompts = [TokensPrompt(prompt_token_ids=render_prompt(tokenizer, r)) for r in requests]
    sp = SamplingParams(temperature=0.0, max_tokens=params.max_new_tokens)
    t = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    return [len(o.outputs[0].token_ids) for o in outs], time.perf_counter() - t


def run_distill_loop(engine, n: int, params: GenParams, out_dir: Path) -> tuple[int, float]:
    from service.distill import run_distill
    from service.specs import DistillSpec

    spec = DistillSpec(
        dataset=str(DATA / "alpaca/alpaca_5000.json"),
        limit=n,
        template="general",
        max_new_tokens=params.max_new_tokens,
        batch_size=n,
        engine="fast",
    )
    out = out_dir / f"distill-{time.time_ns()}.jsonl"
    t = time.perf_counter()
    summary = run_distill(spec, out, engine=engine)
    return int(summary["generated_tokens"]), time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=64, help="prompts per set")
    ap.add_argument("--n-batch1", type=int, default=8, help="prompts for the batch-1 row")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--sets", default="gsm8k,distill")
    ap.add_argument("--engines", default="hf1,hf64,fast,distill")
    ap.add_argument("--slots", type=int, default=64, help="fast engine decode slots")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--openai-url", default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from service.models import load_model
    from service.teacher.fast_engine import FastEngine
    from service.teacher.hf_engine import HFEngine, render_prompt

    engines = args.engines.split(",")
    gpu = torch.cuda.is_available()
    if gpu and "vllm" not in engines:
        engines += ["vllm-offline", "vllm"]
    params = GenParams(max_new_tokens=args.max_new_tokens)
    model, tokenizer = load_model(args.model, device="cpu")
    cfg = model.config
    rate = matmul_rate(cfg)
    print(f"threads {torch.get_num_threads()}, fp32 matrix products: {rate:.0f} GFLOP/s")
    hf = (
        HFEngine(args.model, device="cpu", batch_size=64)
        if {"hf1", "hf64"} & set(engines)
        else None
    )
    built: dict = {}
    if {"fast", "distill"} & set(engines):
        built["fast"] = FastEngine(args.model, slots=args.slots, model=model, tokenizer=tokenizer)
    if "openai" in engines and args.openai_url:
        from service.teacher.openai_engine import OpenAIEngine

        built["openai"] = OpenAIEngine(args.openai_url)
    warm = [Request((("user", "Hi"),))] * 2
    for e in [hf, *built.values()]:
        if e is not None:
            e.generate(warm, GenParams(max_new_tokens=4))
    report: dict = {"rate_gflops": rate, "threads": torch.get_num_threads(), "sets": {}}
    for set_name in args.sets.split(","):
        requests = gsm8k_requests(args.n) if set_name == "gsm8k" else distill_requests(args.n)
        plens = [len(render_prompt(tokenizer, r)) for r in requests]
        print(
            f"\n== {set_name}: {len(requests)} prompts, {statistics.mean(plens):.0f} prompt tokens "
            f"on average, {args.max_new_tokens} new tokens, greedy"
        )
        rows, ref = {}, None
        for name in engines:
            subset, gens, secs, gen_lens = requests, None, None, None
            if name in ("hf1", "hf64"):
                hf.batch_size = 1 if name == "hf1" else 64
                subset = requests[: args.n_batch1] if name == "hf1" else requests
                gens, secs = timed(hf, subset, params)
            elif name in ("fast", "openai") and name in built:
                gens, secs = timed(built[name], subset, params)
            elif name == "distill" and set_name == "distill" and "fast" in built:
                tokens, secs = run_distill_loop(built["fast"], len(requests), params, Path("/tmp"))
                gen_lens = None
                rows[name] = {"tokens": tokens, "seconds": secs, "tok_s": tokens / secs}
            elif name == "vllm-offline" and gpu:
                from vllm import LLM

                from service.models import resolve_model

                # Both vLLM engines share the GPU: 0.4 of its memory each.
                built["vllm-offline"] = built.get("vllm-offline") or LLM(
                    model=str(resolve_model(args.model)), gpu_memory_utilization=0.4
                )
                gen_lens, secs = run_vllm_offline(built["vllm-offline"], tokenizer, subset, params)
            elif name == "vllm" and gpu:
                from service.teacher.vllm_engine import VLLMEngine

                built["vllm"] = built.get("vllm") or VLLMEngine(
                    args.model, gpu_memory_utilization=0.4
                )
                gens, secs = timed(built["vllm"], subset, params)
            if secs is None or name in rows:
                continue
            if gens is not None:
                gen_lens = [g.tokens for g in gens]
            sub_plens = [len(render_prompt(tokenizer, r)) for r in subset]
            flops = workload_flops(cfg, sub_plens, gen_lens)
            row = {
                "prompts": len(subset),
                "tokens": sum(gen_lens),
                "seconds": secs,
                "tok_s": sum(gen_lens) / secs,
                "roofline": flops / 1e9 / rate / secs,
            }
            if gens is not None:
                if name == "hf64":
                    ref = [g.text for g in gens]
                if ref is not None:
                    row["same_as_hf64"] = sum(a.text == b for a, b in zip(gens, ref, strict=False))
            rows[name] = row
        base = rows.get("hf64", {}).get("tok_s")
        print(
            f"{'engine':<14}{'prompts':>8}{'tokens':>8}{'s':>8}{'tok/s':>9}{'x hf64':>8}{'% roof':>8}{'same':>7}"
        )
        for name, r in rows.items():
            ratio = f"{r['tok_s'] / base:.2f}" if base else "-"
            roof = f"{100 * r['roofline']:.0f}" if "roofline" in r else "-"
            same = f"{r['same_as_hf64']}/{r['prompts']}" if "same_as_hf64" in r else "-"
            print(
                f"{name:<14}{r.get('prompts', len(requests)):>8}{r['tokens']:>8}{r['seconds']:>8.1f}"
                f"{r['tok_s']:>9.1f}{ratio:>8}{roof:>8}{same:>7}"
            )
        if "vllm" in rows and "vllm-offline" in rows:
            print(
                f"Distillery vLLM path / vLLM offline: {rows['vllm']['tok_s'] / rows['vllm-offline']['tok_s']:.3f}"
            )
        if "distill" in rows and "fast" in rows:
            print(
                f"distillation loop / fast engine direct: {rows['distill']['tok_s'] / rows['fast']['tok_s']:.3f}"
            )
        report["sets"][set_name] = rows
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
