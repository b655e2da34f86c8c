"""Recovery of a pruned SmolLM2-135M-Instruct, measured with power: no fine-tuning vs SFT
vs self-data distillation (SD, arXiv 2410.09982) vs logit distillation (KD, Minitron)
vs SD + KD, on the default (checked) prune at 6 and 10 of 30 blocks.

    .venv/bin/python -m bench.recovery --data-dir ../shared/data --out runs/recovery

Stages run in order of importance and each is skipped when its output is complete, so
rerunning the same command resumes (distillation and fine-tuning also resume inside
their step); ``--only`` runs the stages whose label starts so. ``docs/results.md``
(``--results``) is rewritten after every stage; cells still to run say "pending".

What a finished stage measured (the prune reports, the distillation summary, every
evaluation with its per-document scores, the training logs, the wall times) goes to
``--record`` (``docs/results-data/recovery``), small JSON files kept in the repository:
the run takes longer than one session of a 2-core machine, and the record lets a later
session, on a fresh clone, continue from the first unmeasured condition. The heavy
artifacts (pruned models, adapters, the rewrite) stay under ``--out`` and are rebuilt
when missing; a rebuilt prune must remove the recorded blocks.

1. One calibration pass scores every block; each size is cut with ``distillery prune``'s
   defaults (angular distance on plain text, checked by KL among the best candidates).
2. The recovery set (``--rows``, a seeded shuffle of Alpaca and GSM8K-train rows) and the
   unpruned model's rewrite of it (SDFT templates; math template, answer-checked, on
   the GSM8K rows).
3. Evaluation of the unpruned model, then of each condition: the same LoRA settings,
   rows, steps and seeds for SFT (original responses), SD (rewritten responses), KD
   (original responses, loss = KL to the unpruned model) and SD + KD. Every evaluation
   scores the full task sets, keeps every document's score, and measures teacher KL,
   top-1 agreement and speculative acceptance on held-out prompts.
4. The adapter probe: SD with a stronger adapter than rank 8 on q/v, at each size after
   its main conditions.

Comparisons are paired: the accuracy difference of two conditions over the same
documents with a bootstrap interval (``service/stats.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

from service.datasets import write_jsonl
from service.models import DEFAULT_MODEL
from service.progress import ConsoleReporter, Reporter
from service.specs import (
    LLAMA_PROJECTIONS,
    DistillSpec,
    EvaluateSpec,
    FinetuneSpec,
    PruneSpec,
)
from service.stats import paired_difference, task_scores

PAPER = "91.2% (self-data distillation) vs 81.7% (SFT), Llama3.1-8B-Instruct, 6 of 32 blocks"
CONDITIONS = {  # name -> (label, data, logit distillation)
    "sft": ("SFT", "recovery", False),
    "sd": ("self-data distillation (SD)", "distilled", False),
    "kd": ("logit distillation (KD)", "recovery", True),
    "sdkd": ("SD + KD", "distilled", True),
}
PAIRS = [
    ("sd", "sft"), ("kd", "sft"), ("kd", "sd"), ("sdkd", "sd"), ("sdkd", "kd"),
    ("sft", "none"), ("sd", "none"), ("kd", "none"), ("sdkd", "none"),
]  # fmt: skip
# The stronger adapter tried on one condition first (SD, 6 blocks): every projection of
# attention and MLP at rank 16, as QLoRA and LLaMA-Factory's "all" target; the pipeline's
# default since it won (service/specs.py), so one list serves both.
PROBE_TARGETS = list(LLAMA_PROJECTIONS)  # Gemma 3's blocks have the same seven
MODEL_NAMES = {
    DEFAULT_MODEL: "SmolLM2-135M-Instruct",
    "builtin:gemma3-270m": "Gemma-3-270M (base)",
}


def cpu_name() -> str:
    """The CPU's model name and its widest vector and matrix units, for the wall times."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                  if ln.startswith("model name")), "unknown CPU")  # fmt: skip
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines()
                      if ln.startswith("flags")), []))  # fmt: skip
    units = [u for u, f in (("AMX", "amx_bf16"), ("AVX512-BF16", "avx512_bf16"),
                            ("AVX-512", "avx512f"), ("AVX2", "avx2")) if f in flags]  # fmt: skip
    return f"{model}, {os.cpu_count()} cores, {', '.join(units) or 'no AVX'}"


class Experiment:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.record = Path(args.record)
        self.data = Path(args.data_dir)
        self.reporter: Reporter = ConsoleReporter("recovery")
        self.times: dict[str, float] = self._read("times.json") or {}
        self.blocks = [int(b) for b in args.blocks.split(",")]
        self.tasks = args.tasks.split(",")
        self.config = {
            k: getattr(args, k)
            for k in (
                "model", "rows", "gsm8k_fraction", "max_new_tokens", "engine", "lr",
                "epochs", "lora_rank", "targets", "kd_weight", "kd_temperature",
                "eval_limit", "tasks", "agreement_prompts", "blocks", "seed",
            )
        }  # fmt: skip
        # Sizes pruned and evaluated without fine-tuning (the checked prune's retention);
        # recorded only when set, so an older record's settings still compare.
        self.prune_blocks = [int(b) for b in args.prune_blocks.split(",") if b.strip()]
        if self.prune_blocks:
            self.config["prune_blocks"] = args.prune_blocks

    # -- bookkeeping -------------------------------------------------------------------
    def _read(self, name: str) -> dict | None:
        path = self.record / name
        return json.loads(path.read_text()) if path.is_file() else None

    def _write(self, name: str, obj: dict) -> dict:
        path = self.record / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        tmp.replace(path)
        return obj

    def timed(self, key: str, fn):
        t0 = time.monotonic()
        result = fn()
        self.times[key] = round(self.times.get(key, 0.0) + time.monotonic() - t0, 1)
        self._write("times.json", self.times)
        # sessions may run on different machines: say which ran each stage
        self._write("cpus.json", {**(self._read("cpus.json") or {}), key: cpu_name()})
        return result

    def check_config(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        old = self._read("config.json")
        if old is not None and old != self.config:
            sys.exit(
                f"{self.record} records a run with other settings ({old}); "
                "use a new --record and --out"
            )
        self._write("config.json", self.config)

    # -- data --------------------------------------------------------------------------
    def recovery_set(self) -> Path:
        """A seeded shuffle of Alpaca and GSM8K-train rows, written once."""
        path = self.out / "recovery.jsonl"
        if path.is_file():
            return path
        rng = random.Random(self.args.seed)
        n_gsm = round(self.args.rows * self.args.gsm8k_fraction)
        alpaca = json.loads((self.data / "alpaca" / "alpaca_5000.json").read_text())
        # The calibration pass samples the same file, so a few rows may be in both, as in
        # the paper's setup (calibration and recovery data both Alpaca).
        rows = rng.sample(alpaca, self.args.rows - n_gsm)
        gsm = (self.data / "gsm8k" / "train.jsonl").read_text().splitlines()
        rows += [json.loads(line) for line in rng.sample(gsm, n_gsm)]
        rng.shuffle(rows)
        write_jsonl(path, rows)
        return path

    def heldout_prompts(self) -> Path:
        """Agreement prompts never trained on: Alpaca rows outside the recovery set and
        GSM8K *test* questions, half each."""
        path = self.out / "heldout.jsonl"
        if path.is_file():
            return path
        train = {json.dumps(r, sort_keys=True) for r in map(json.loads, self.recovery_set().open())}
        alpaca = json.loads((self.data / "alpaca" / "alpaca_5000.json").read_text())
        rng = random.Random(self.args.seed + 1)
        n = self.args.agreement_prompts
        spare = [r for r in alpaca if json.dumps(r, sort_keys=True) not in train]
        rows = rng.sample(spare, n - n // 2)
        test = (self.data / "gsm8k" / "test.jsonl").read_text().splitlines()
        rows += [json.loads(line) for line in test[: n // 2]]
        write_jsonl(path, rows)
        return path

    # -- steps -------------------------------------------------------------------------
    def prune_all(self) -> None:
        from service.models import load_model
        from service.prune import run_prune, score_calibration

        sizes = list(dict.fromkeys(self.blocks + self.prune_blocks))
        todo = [n for n in sizes if not (self.pruned(n) / "prune_report.json").is_file()]
        if not todo:
            return
        base = PruneSpec(
            model=self.args.model,
            calibration=str(self.data / "alpaca" / "alpaca_5000.json"),
            blocks=todo[0],
            seed=self.args.seed,
        )

        def score():
            model, tokenizer = load_model(self.args.model)
            return score_calibration(base, model, tokenizer, self.reporter)

        scores = self.timed("prune: calibration pass", score)
        for n in todo:
            spec = base.model_copy(update={"blocks": n})
            report = self.timed(
                f"prune {n}",
                lambda s=spec, n=n: run_prune(s, self.pruned(n), self.reporter, scores),
            )
            recorded = self._read(f"prune-{n}.json")
            if recorded and recorded["removed_layers"] != report["removed_layers"]:
                sys.exit(
                    f"the rebuilt {n}-block prune removes {report['removed_layers']}, the "
                    f"record says {recorded['removed_layers']}: the record's conditions were "
                    "measured on another model; use a new --record"
                )
            self._write(f"prune-{n}.json", report)
            self.reporter.event(f"{n} blocks: removed {report['removed_layers']}")

    def pruned(self, blocks: int) -> Path:
        return self.out / f"pruned-{blocks}"

    def distill(self) -> dict:
        """The unpruned model's rewrite of the recovery set, recorded once; rebuilt under
        ``--out`` when a later session still has SD conditions to train."""
        from service.distill import run_distill

        recorded = self._read("distill_summary.json")
        if recorded and (self.out / "distilled.jsonl").is_file():  # written once complete
            return recorded
        spec = DistillSpec(
            teacher=self.args.model,
            dataset=str(self.recovery_set()),
            max_new_tokens=self.args.max_new_tokens,
            batch_size=self.args.distill_batch,
            engine=self.args.engine,
            # The record was made in fp32 (the retired fast engine): pin it, so a rebuild
            # compares with the record whatever auto picks on this machine.
            dtype="float32",
            seed=self.args.seed,
        )
        summary = self.timed(
            "distill", lambda: run_distill(spec, self.out / "distilled.jsonl", self.reporter)
        )
        if recorded is None:
            return self._write("distill_summary.json", summary)
        if summary["distilled"] != recorded["distilled"]:  # a rebuild on another machine
            self._write("distill_summary_rebuilt.json", summary)
            self.reporter.event(
                f"the rebuilt rewrite kept {summary['distilled']} rows, the record "
                f"{recorded['distilled']}; later SD conditions train on the rebuilt one"
            )
        return recorded

    def train(self, cond: str, blocks: int, name: str | None = None, **adapter) -> str:
        """LoRA on the pruned model; the same settings for every condition."""
        from service.finetune import run_finetune

        _, data, kd = CONDITIONS[cond]
        name = name or f"{cond}-{blocks}"
        out = self.out / name
        if (out / "train_log.json").is_file():
            return name
        rank = adapter.get("rank", self.args.lora_rank)
        spec = FinetuneSpec(
            model=str(self.pruned(blocks)),
            dataset=str(self.recovery_set() if data == "recovery" else self.distilled()),
            lora_rank=rank,
            lora_alpha=2 * rank,
            target_modules=adapter.get("targets", self.args.targets.split(",")),
            lr=self.args.lr,
            epochs=self.args.epochs,
            seed=self.args.seed,
            teacher=self.args.model if kd else None,
            kd_weight=self.args.kd_weight,
            kd_temperature=self.args.kd_temperature,
        )
        self.timed(f"finetune {name}", lambda: run_finetune(spec, out, self.reporter, resume=True))
        self._write(f"train-{name}.json", json.loads((out / "train_log.json").read_text()))
        return name

    def distilled(self) -> Path:
        self.distill()
        return self.out / "distilled.jsonl"

    def condition(self, cond: str, blocks: int, name: str | None = None, **adapter) -> None:
        """Train and evaluate one condition, unless the record already holds its scores."""
        if self._read(f"eval-{name or f'{cond}-{blocks}'}.json") is None:
            self.evaluate(self.train(cond, blocks, name, **adapter))

    def evaluate(self, name: str, agreement: bool = True) -> dict:
        from service.evaluate import run_evaluate

        path = self.record / f"eval-{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        ref = self.args.model if name == "unpruned" else str(self.out / name)
        spec = EvaluateSpec(
            model=ref,
            tasks=self.tasks,
            limit=self.args.eval_limit,
            teacher=self.args.model if agreement else None,
            agreement_dataset=str(self.heldout_prompts()) if agreement else None,
            agreement_prompts=self.args.agreement_prompts,
            agreement_max_new_tokens=64,
            speedup_prompts=0,
        )
        result = self.timed(
            f"evaluate {name}",
            lambda: run_evaluate(spec, self.out / path.name, self.reporter, data_dir=self.data),
        )
        # the record is committed: the data directory as given (relative), not this
        # machine's absolute path
        return self._write(path.name, {**result, "data_dir": str(self.data)})

    # -- the run -----------------------------------------------------------------------
    def stages(self):
        yield "prune", self.prune_all
        # recorded already: rebuilt only when an SD condition still needs the rows
        yield "distill", lambda: self._read("distill_summary.json") or self.distill()
        yield "evaluate unpruned", lambda: self.evaluate("unpruned", agreement=False)
        for n in self.prune_blocks:
            if n not in self.blocks:
                yield f"evaluate pruned {n}", lambda n=n: self.evaluate(f"pruned-{n}")
        for n in self.blocks:
            yield f"evaluate pruned {n}", lambda n=n: self.evaluate(f"pruned-{n}")
            for cond in CONDITIONS:
                yield f"{cond} {n}", lambda c=cond, n=n: self.condition(c, n)
            # the probe runs after the main conditions of its size
            yield (
                f"probe {n}",
                lambda n=n: self.condition(
                    "sd", n, f"sd-{n}-all16", rank=16, targets=PROBE_TARGETS
                ),
            )

    def run(self) -> None:
        self.check_config()
        for label, fn in self.stages():
            if self.args.only and not any(label.startswith(s) for s in self.args.only):
                continue
            self.reporter.event(f"stage: {label}")
            fn()
            write_results(self, Path(self.args.results))
        write_results(self, Path(self.args.results))


# -- the results document --------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:+.1f}"


def model_row(label: str, ev: dict | None, base: dict | None, tasks: list[str]) -> str:
    if ev is None:
        return f"| {label} | " + " | ".join(["pending"] * (len(tasks) + 5)) + " |"
    cells = [f"{ev['tasks'][t]['acc']:.3f}" for t in tasks]
    cells.append(f"{sum(ev['tasks'][t]['acc'] for t in tasks) / len(tasks):.3f}")
    if base:
        ret = [ev["tasks"][t]["acc"] / base["tasks"][t]["acc"] for t in tasks]
        cells.append(f"{100 * sum(ret) / len(ret):.1f}%")
    else:
        cells.append("-")
    a, s = ev.get("agreement"), ev.get("speculative") or {}
    rate = s.get("acceptance_rate")
    cells += [f"{a['kl_mean']:.3f}", f"{a['top1']:.3f}"] if a else ["-", "-"]
    cells.append(f"{rate:.3f}" if rate is not None else "-")
    return f"| {label} | " + " | ".join(cells) + " |"


def pair_row(label: str, a: dict | None, b: dict | None, tasks: list[str]) -> str:
    if a is None or b is None:
        return f"| {label} | " + " | ".join(["pending"] * (len(tasks) + 2)) + " |"
    r = paired_difference(task_scores(a, tasks), task_scores(b, tasks))
    cells = []
    for t in tasks:
        x = r["tasks"][t]
        lo, hi = x["ci"]
        cells.append(f"{_pct(x['diff'])} [{_pct(lo)}, {_pct(hi)}] ({x['a_only']}/{x['b_only']})")
    lo, hi = r["ci"]
    verdict = "A better" if lo > 0 else "B better" if hi < 0 else "no difference shown"
    cells += [f"**{_pct(r['diff'])}** [{_pct(lo)}, {_pct(hi)}]", verdict]
    return f"| {label} | " + " | ".join(cells) + " |"


def write_results(exp: Experiment, dest: Path) -> None:
    args, tasks = exp.args, exp.tasks

    def ev(name: str) -> dict | None:
        return exp._read(f"eval-{name}.json")

    base = ev("unpruned")
    n_gsm = round(args.rows * args.gsm8k_fraction)
    limit = "the full sets" if args.eval_limit is None else f"the first {args.eval_limit}"
    cmd = (
        f".venv/bin/python -m bench.recovery --data-dir ../shared/data --out {args.out} "
        f"--rows {args.rows} --epochs {args.epochs} --lr {args.lr} --blocks {args.blocks}"
    )
    if args.model != DEFAULT_MODEL:
        cmd += f" --model {args.model} --record {args.record} --results {args.results}"
    if exp.prune_blocks:
        cmd += f" --prune-blocks {args.prune_blocks}"
    from service.models import model_depth

    depth = model_depth(args.model)
    lines = [
        f"# Results: recovering a pruned {MODEL_NAMES.get(args.model, args.model)}",
        "",
        "Written by `bench/recovery.py`; rerun to resume or refresh:",
        "",
        "```",
        cmd,
        "```",
        "",
        f"Paper, for reference: average accuracy retention {PAPER}.",
        "",
        "## Setup",
        "",
        f"- Model: `{args.model}` ({depth} decoder blocks), fp32 on a 2-core CPU.",
        "- Pruning: `distillery prune` defaults (angular distance on 128 Alpaca rows as "
        "plain text, read at the last content token, the choice checked by KL among the "
        "best candidates); one calibration pass, every size cut from its scores.",
        f"- Recovery set: {args.rows} rows, a seeded shuffle of {args.rows - n_gsm} Alpaca "
        f"(alpaca_5000.json) and {n_gsm} GSM8K-train rows (seed {args.seed}).",
        f"- SD: the unpruned model rewrites every response (SDFT templates, math template "
        f"with answer check on GSM8K rows), greedy, at most {args.max_new_tokens} new "
        f"tokens, `{args.engine}` engine; a rewrite that fails its checks keeps the "
        "original response.",
        f"- KD: loss = {1 - args.kd_weight:g}·CE + {args.kd_weight:g}·T²·KL(teacher ‖ "
        f"student), T = {args.kd_temperature:g}, on the response tokens, the unpruned "
        "model as teacher (Minitron; Model Optimizer's LogitsDistillationLoss).",
        f"- Fine-tuning, identical for every condition: LoRA rank {args.lora_rank}, alpha "
        f"{2 * args.lora_rank}, on {args.targets}, lr {args.lr} cosine, batch 8, "
        f"{args.epochs} epochs, seed {args.seed}: the same rows in the same order.",
        f"- Evaluation: lm-evaluation-harness on the local task files, {limit} documents "
        f"of {', '.join(tasks)} (the same documents for every model), acc. Retention = "
        "mean over tasks of acc / unpruned acc.",
        f"- Teacher agreement on {args.agreement_prompts} held-out prompts (half Alpaca rows "
        "outside the recovery set, half GSM8K test questions), 64 greedy teacher tokens "
        "each: KL(teacher ‖ model) per token, top-1 agreement, and the acceptance rate of "
        "the model as a 5-token speculative draft for the unpruned teacher.",
    ]
    ds = exp._read("distill_summary.json")
    if ds:
        lines.append(
            f"- Distilled: {ds['distilled']} of {ds['rows']} rows kept the rewrite "
            f"({100 * ds['distilled_fraction']:.0f}%); reasons {ds.get('reasons')}."
        )
    head = "| model | " + " | ".join(tasks) + " | average | retention | KL | top-1 | acceptance |"
    rule = "|" + "---|" * (len(tasks) + 6)
    lines += ["", "## Main table", "", head, rule]
    lines.append(model_row(f"unpruned ({depth} blocks)", base, base, tasks))
    for n in sorted(set(exp.prune_blocks) - set(exp.blocks)):
        removed = (exp._read(f"prune-{n}.json") or {}).get("removed_layers", "?")
        lines.append(
            model_row(f"{n} blocks {removed}, no fine-tuning", ev(f"pruned-{n}"), base, tasks)
        )
    for n in exp.blocks:
        report = exp._read(f"prune-{n}.json") or {}
        removed = report.get("removed_layers", "?")
        lines.append(
            model_row(f"{n} blocks {removed}, no fine-tuning", ev(f"pruned-{n}"), base, tasks)
        )
        for cond, (label, _, _) in CONDITIONS.items():
            lines.append(model_row(f"{n} blocks, {label}", ev(f"{cond}-{n}"), base, tasks))
        lines.append(
            model_row(
                f"{n} blocks, SD, rank 16 on every projection", ev(f"sd-{n}-all16"), base, tasks
            )
        )
    lines += [
        "",
        "## Paired differences",
        "",
        "Accuracy of A minus accuracy of B in points over the same documents, with a 95% "
        "bootstrap interval (10,000 resamples of the documents, `service/stats.py`); in "
        "parentheses, the documents only A / only B gets right. The average weighs tasks "
        "equally.",
        "",
        "| A vs B | " + " | ".join(tasks) + " | average | verdict |",
        "|" + "---|" * (len(tasks) + 3),
    ]
    for n in exp.blocks:
        for a, b in PAIRS:
            a_ev = ev(f"{a}-{n}")
            b_ev = ev(f"pruned-{n}" if b == "none" else f"{b}-{n}")
            label_b = "no fine-tuning" if b == "none" else CONDITIONS[b][0]
            lines.append(
                pair_row(f"{n} blocks: {CONDITIONS[a][0]} vs {label_b}", a_ev, b_ev, tasks)
            )
        # the probe against its own condition, the best, and none
        for b, label_b in (("sd", f"SD rank {args.lora_rank}"), ("kd", "KD"),
                           ("pruned", "no fine-tuning")):  # fmt: skip
            lines.append(
                pair_row(f"{n} blocks: SD rank 16 all vs {label_b}",
                         ev(f"sd-{n}-all16"), ev(f"{b}-{n}"), tasks)
            )  # fmt: skip
    lines += ["", "## Training per condition", ""]
    for path in sorted(exp.record.glob("train-*.json")):
        name, t = path.stem.removeprefix("train-"), json.loads(path.read_text())
        steps = t["steps"] if isinstance(t["steps"], list) else []
        kl = [s["kl"] for s in steps if "kl" in s]
        kl_txt = f", KL {kl[0]:.3f} -> {kl[-1]:.3f}" if kl else ""
        lines.append(
            f"- `{name}`: {t.get('rows')} rows, {len(steps)} steps, {t.get('tokens')} tokens, "
            f"loss {t.get('first_loss'):.3f} -> {t.get('final_loss'):.3f}{kl_txt}, "
            f"{t.get('seconds', 0):.0f} s"
        )
    lines += ["", "## Wall times (seconds; the machine that ran each stage)", ""]
    cpus = exp._read("cpus.json") or {}
    lines += [f"- {k}: {v} ({cpus.get(k, 'machine not recorded')})" for k, v in exp.times.items()]
    notes = dest.with_name("results-notes.md")
    text = "\n".join(lines) + "\n"
    if notes.is_file():  # the hand-written discussion, kept across rewrites
        text += "\n" + notes.read_text()
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--out", default="runs/recovery")
    ap.add_argument("--results", default="docs/results.md")
    ap.add_argument(
        "--record",
        default="docs/results-data/recovery",
        help="where finished stages' measurements are kept (in the repository)",
    )
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--blocks", default="6,10", help="prune sizes, in order of importance")
    ap.add_argument(
        "--prune-blocks",
        default="",
        help="more prune sizes, evaluated without fine-tuning (e.g. 2,4 beside --blocks 6)",
    )
    ap.add_argument("--rows", type=int, default=512, help="recovery rows (Alpaca + GSM8K)")
    ap.add_argument("--gsm8k-fraction", type=float, default=0.25)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--distill-batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--kd-weight", type=float, default=1.0)
    ap.add_argument("--kd-temperature", type=float, default=1.0)
    ap.add_argument("--tasks", default="arc_easy,piqa")
    ap.add_argument("--eval-limit", type=int, default=None, help="default: full task sets")
    ap.add_argument("--agreement-prompts", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", help="run only stages whose label starts so")
    ap.add_argument("--render", action="store_true", help="only rewrite --results from the record")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        write_results(Experiment(args), Path(args.results))
        return 0
    if not (Path(args.data_dir) / "alpaca" / "alpaca_5000.json").is_file():
        sys.exit(
            f"{args.data_dir} lacks alpaca/alpaca_5000.json: this experiment needs ../shared/data"
        )
    Experiment(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
