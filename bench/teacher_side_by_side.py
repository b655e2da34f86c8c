"""Every CPU teacher engine side by side in one process, alternating so drift hits all
(issue 14), then the start-up of ``distillery distill`` per engine.

    DISTILLERY_HOME=/tmp/dhome .venv/bin/python -m bench.teacher_side_by_side \\
        --n 64 --max-new-tokens 128 --rounds 2 --json side_by_side.json

Prompt sets: ``gsm8k`` and ``distill`` (``bench.teacher_throughput``'s: GSM8K test questions
as chat prompts; the SDFT general template on Alpaca rows). Greedy. Each round runs every
row of both sets in turn, the next round in reverse order. Rows:

- ``hf64``: ``HFEngine`` at batch 64 (plain ``generate``), the reference of "same";
- ``vllm-direct-<dtype>``: ``LLM.generate`` on the prompt token ids of ``render_prompt``,
  nothing around it (the same ``LLM`` the next row wraps);
- ``vllm-<dtype>``: Distillery's ``VLLMEngine.generate`` on the same requests;
- ``distill-vllm-<dtype>`` (distill set, ``--distill-dtypes``): ``run_distill`` on the
  same Alpaca rows, one engine call, judging and the output file included.

Tokens/s: generated tokens (EOS included) over the wall time of the call, summed over the
rounds. "same": outputs whose text equals ``hf64``'s. ``--quality``: ``run_distill`` on the
first n GSM8K train rows (math template: the answer is checked against the label) under
each dtype, so bf16's cost shows as distilled fraction and reasons. ``--startup``:
``distillery distill`` of the first n GSM8K train rows, from process start to exit, per
engine (hf at batch n is plain ``generate(B=n)``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.teacher_throughput import DATA, distill_requests, gsm8k_requests, run_distill_loop
from service.teacher.base import GenParams, render_prompt


def vllm_direct(llm, tokenizer, requests, params) -> tuple[list[str], int]:
    from vllm import SamplingParams, TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=render_prompt(tokenizer, r)) for r in requests]
    sp = SamplingParams(temperature=0.0, max_tokens=params.max_new_tokens)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    return [o.outputs[0].text for o in outs], sum(len(o.outputs[0].token_ids) for o in outs)


class SideBySide:
    def __init__(self, args):
        from service.teacher.hf_engine import HFEngine
        from service.teacher.vllm_engine import VLLMEngine

        self.args = args
        self.params = GenParams(max_new_tokens=args.max_new_tokens)
        self.hf = HFEngine(args.model, device="cpu", batch_size=64)
        self.tokenizer = self.hf.tokenizer
        self.vllm = {d: VLLMEngine(args.model, dtype=d) for d in args.dtypes.split(",")}
        warm = gsm8k_requests(2)
        for e in (self.hf, *self.vllm.values()):
            e.generate(warm, GenParams(max_new_tokens=4))

    def names(self, set_name: str) -> list[str]:
        out = ["hf64"]
        for d in self.vllm:
            out += [f"vllm-direct-{d}", f"vllm-{d}"]
            if set_name == "distill" and d in self.args.distill_dtypes.split(","):
                out.append(f"distill-vllm-{d}")
        return out

    def run(self, name: str, requests) -> tuple[list[str] | None, int, float]:
        """(texts or None, generated tokens, seconds) of one row."""
        t = time.perf_counter()
        texts = None
        if name == "hf64":
            gens = self.hf.generate(requests, self.params)
        elif name.startswith("vllm-direct-"):
            engine = self.vllm[name.removeprefix("vllm-direct-")]
            texts, tokens = vllm_direct(engine.llm, self.tokenizer, requests, self.params)
            return texts, tokens, time.perf_counter() - t
        elif name.startswith("vllm-"):
            gens = self.vllm[name.removeprefix("vllm-")].generate(requests, self.params)
        else:  # distill-vllm-<dtype>
            engine = self.vllm[name.removeprefix("distill-vllm-")]
            tokens, secs = run_distill_loop(engine, len(requests), self.params, None)
            return None, tokens, secs
        texts = [g.text for g in gens]
        return texts, sum(g.tokens for g in gens), time.perf_counter() - t


def quality(engines: dict, n: int, max_new_tokens: int) -> dict:
    """run_distill on the first n GSM8K train rows under each vLLM dtype."""
    from service.distill import run_distill
    from service.specs import DistillSpec

    out = {}
    for dtype, engine in engines.items():
        spec = DistillSpec(
            dataset=str(DATA / "gsm8k/train.jsonl"),
            limit=n,
            template="math",
            max_new_tokens=max_new_tokens,
            engine="vllm",
            dtype=dtype,
        )
        with tempfile.TemporaryDirectory() as tmp:
            s = run_distill(spec, Path(tmp) / "rows.jsonl", engine=engine)
        out[dtype] = {k: s[k] for k in ("rows", "distilled_fraction", "reasons", "tokens_per_s")}
    return out


def startup(n: int, max_new_tokens: int, engines: list[str]) -> dict:
    """Seconds of ``distillery distill`` from process start to exit, per engine."""
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in engines:
            engine, _, batch = name.partition("@")
            cmd = [str(Path(sys.executable).parent / "distillery"), "distill", "--dataset",
                   str(DATA / "gsm8k/train.jsonl"), "--limit", str(n), "--template", "math",
                   "--max-new-tokens", str(max_new_tokens), "--engine", engine,
                   "--out", f"{tmp}/{name}.jsonl"]  # fmt: skip
            if batch:
                cmd += ["--batch-size", batch]
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            secs = time.perf_counter() - t
            if proc.returncode != 0:
                raise RuntimeError(f"{name}: {proc.stderr[-2000:]}")
            out[name] = round(secs, 1)
            print(f"startup {name}: {secs:.1f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sets", default="gsm8k,distill")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--distill-dtypes", default="float32", help="dtypes of the run_distill row")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--startup", default="", help="engines, e.g. hf@64,vllm (empty: skip)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict = {"load_before": os.getloadavg(), "threads": torch.get_num_threads()}
    bench = SideBySide(args)
    sets = {s: gsm8k_requests(args.n) if s == "gsm8k" else distill_requests(args.n)
            for s in args.sets.split(",")}  # fmt: skip
    rows: dict = {s: {} for s in sets}
    for rnd in range(args.rounds):
        order = [(s, name) for s in sets for name in bench.names(s)]
        for s, name in order if rnd % 2 == 0 else order[::-1]:
            texts, tokens, secs = bench.run(name, sets[s])
            row = rows[s].setdefault(name, {"tokens": 0, "seconds": 0.0, "rounds": []})
            row["tokens"] += tokens
            row["seconds"] += secs
            row["rounds"].append(round(tokens / secs, 1))
            if texts is not None:
                row["texts"] = texts
            print(f"round {rnd} {s} {name}: {tokens} tokens in {secs:.1f} s", flush=True)
    for s, table in rows.items():
        ref = table["hf64"].get("texts")
        print(f"\n== {s}: {args.n} prompts, {args.max_new_tokens} new tokens, greedy")
        print(f"{'engine':<24}{'tok/s':>8}{'x hf64':>8}{'same':>8}  rounds")
        for r in table.values():
            r["tok_s"] = round(r["tokens"] / r["seconds"], 1)
        for name, r in table.items():
            r["x_hf64"] = round(r["tok_s"] / table["hf64"]["tok_s"], 2)
            texts = r.pop("texts", None)
            same = "-"
            if texts is not None and ref is not None:
                r["same_as_hf64"] = sum(a == b for a, b in zip(texts, ref, strict=True))
                same = f"{r['same_as_hf64']}/{len(ref)}"
            print(f"{name:<24}{r['tok_s']:>8}{r['x_hf64']:>8}{same:>8}  {r['rounds']}")
        for d in bench.vllm:
            if f"vllm-{d}" in table:
                path = table[f"vllm-{d}"]["tok_s"] / table[f"vllm-direct-{d}"]["tok_s"]
                print(f"Distillery vLLM path / vLLM direct ({d}): {path:.3f}")
    report["sets"] = rows
    if args.quality:
        report["quality"] = quality(bench.vllm, args.n, args.max_new_tokens)
        print("\nquality (GSM8K train rows, math template):", json.dumps(report["quality"]))
    del bench
    if args.startup:
        report["startup"] = startup(args.n, args.max_new_tokens, args.startup.split(","))
    report["load_after"] = os.getloadavg()
    print(f"\nload average before {report['load_before']}, after {report['load_after']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
