"""The paper's experiment (arXiv 2410.09982, Table 1 and its ablations) at small scale on
the builtin SmolLM2-135M-Instruct: no fine-tuning vs SFT vs self-data distillation.

    .venv/bin/python -m bench.recovery --data-dir ../shared/data --out runs/recovery

Stages, in order of importance, each skipped when its output is already complete (so
rerunning the same command after an interruption resumes; distillation and fine-tuning
also resume inside their step). ``docs/results.md`` (``--results``) is rewritten after
every stage with what is done so far; cells still to run say "pending".

1. One calibration pass (128 Alpaca rows) scores every block; pruned models for
   angular 6 and 10 blocks (the main table) and angular vs Block Influence for 2, 4, 6
   blocks (the ablation) are cut from those scores.
2. The recovery set: a seeded, shuffled mix of Alpaca and GSM8K-train rows. The
   unpruned model rewrites it (SDFT templates; the math template, answer-checked, on
   GSM8K rows).
3. Evaluation of the unpruned model and the pruned ones without fine-tuning.
4. For 6 and 10 blocks: LoRA on the original responses (SFT) and on the self-distilled
   ones (SD), identical settings, rows, steps and seeds; evaluation with teacher
   agreement and speculative-decoding acceptance.
5. The ablation's remaining models (angular 2, 4; BI 2, 4, 6; no fine-tuning).
6. The data-size sweep: SFT vs SD on the first quarter and half of the recovery set
   (6 blocks).
7. Tried after, as the paper suggests: SD fine-tuned on the Alpaca and the GSM8K rows
   apart and SLERP-merged; twice the data (the recovery set plus as many new rows).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

from service.datasets import write_jsonl
from service.evaluate import retention
from service.models import DEFAULT_MODEL
from service.progress import ConsoleReporter, Reporter
from service.specs import DistillSpec, EvaluateSpec, FinetuneSpec, PruneSpec

TASKS = ["arc_easy", "arc_challenge", "piqa", "openbookqa", "winogrande", "boolq"]
MAIN_BLOCKS = (6, 10)
ABLATION = [(m, n) for n in (2, 4, 6) for m in ("angular", "bi")]
MERGED = "sd-6-merged"
PAPER = "91.2% (self-data distillation) vs 81.7% (SFT), Llama3.1-8B-Instruct, 6 of 32 blocks"


def pruned_name(metric: str, blocks: int) -> str:
    return f"pruned-{metric}{blocks}"


def ft_name(kind: str, blocks: int, rows: int) -> str:
    return f"{kind}-{blocks}-{rows}rows"


class Experiment:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.data = Path(args.data_dir)
        self.reporter: Reporter = ConsoleReporter("recovery")
        self.times: dict[str, float] = self._read("times.json") or {}
        self.config = {
            k: getattr(args, k)
            for k in (
                "model", "rows", "gsm8k_fraction", "max_new_tokens", "engine", "lr",
                "epochs", "lora_rank", "eval_limit", "agreement_prompts", "seed",
            )
        }  # fmt: skip

    # -- bookkeeping -------------------------------------------------------------------
    def _read(self, name: str) -> dict | None:
        path = self.out / name
        return json.loads(path.read_text()) if path.is_file() else None

    def _write(self, name: str, obj: dict) -> dict:
        path = self.out / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        tmp.replace(path)
        return obj

    def timed(self, key: str, fn):
        t0 = time.monotonic()
        result = fn()
        self.times[key] = round(self.times.get(key, 0.0) + time.monotonic() - t0, 1)
        self._write("times.json", self.times)
        return result

    def check_config(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        old = self._read("config.json")
        if old is not None and old != self.config:
            sys.exit(f"{self.out} holds a run with other settings ({old}); use a new --out")
        self._write("config.json", self.config)

    # -- data --------------------------------------------------------------------------
    def recovery_set(self) -> Path:
        """A seeded shuffle of Alpaca and GSM8K-train rows, written once; the sweep's
        quarter and half are its first rows, so they keep the same mix."""
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

        settings = list(dict.fromkeys([("angular", n) for n in MAIN_BLOCKS] + ABLATION))
        todo = [
            s for s in settings if not (self.out / pruned_name(*s) / "prune_report.json").is_file()
        ]
        if not todo:
            return
        base = PruneSpec(
            model=self.args.model,
            calibration=str(self.data / "alpaca" / "alpaca_5000.json"),
            blocks=1,
            samples=128,
            seed=self.args.seed,
        )

        def score():
            model, tokenizer = load_model(self.args.model)
            return score_calibration(base, model, tokenizer, self.reporter)

        scores = self.timed("prune: calibration pass", score)
        for metric, n in todo:
            spec = base.model_copy(update={"blocks": n, "metric": metric})
            report = run_prune(spec, self.out / pruned_name(metric, n), self.reporter, scores)
            self.reporter.event(f"{metric} {n}: removed {report['removed_layers']}")

    def distill_spec(self, dataset: Path) -> DistillSpec:
        """The teacher's rewrite of ``dataset``, the same for every set of this run."""
        return DistillSpec(
            teacher=self.args.model,
            dataset=str(dataset),
            max_new_tokens=self.args.max_new_tokens,
            batch_size=self.args.distill_batch,
            engine=self.args.engine,
            seed=self.args.seed,
        )

    def distill(self) -> dict:
        from service.distill import run_distill

        done = self._read("distill_summary.json")
        if done:
            return done
        spec = self.distill_spec(self.recovery_set())
        summary = self.timed(
            "distill", lambda: run_distill(spec, self.out / "distilled.jsonl", self.reporter)
        )
        return self._write("distill_summary.json", summary)

    def finetune(self, kind: str, blocks: int, rows: int) -> Path:
        data = self.out / "distilled.jsonl" if kind == "sd" else self.recovery_set()
        return self.train(ft_name(kind, blocks, rows), blocks, data, rows)

    def train(self, name: str, blocks: int, data: Path, rows: int | None = None) -> Path:
        """LoRA on the angular-pruned model, the same settings for every condition."""
        from service.finetune import run_finetune

        out = self.out / name
        if (out / "train_log.json").is_file():
            return out
        spec = FinetuneSpec(
            model=str(self.out / pruned_name("angular", blocks)),
            dataset=str(data),
            lora_rank=self.args.lora_rank,
            lora_alpha=2 * self.args.lora_rank,
            lr=self.args.lr,
            epochs=self.args.epochs,
            limit=rows,
            seed=self.args.seed,
        )
        self.timed(f"finetune {name}", lambda: run_finetune(spec, out, self.reporter, resume=True))
        return out

    def more_data(self) -> None:
        """SFT vs SD on twice the rows: the recovery set plus as many new rows of the same
        mix (another seed), the new ones distilled like the first."""
        from service.distill import run_distill

        n = 2 * self.args.rows
        orig, dist = self.out / f"recovery-{n}.jsonl", self.out / f"distilled-{n}.jsonl"
        if not dist.is_file():
            extra = self.out / "recovery-extra.jsonl"
            first = self.recovery_set().read_text()
            if not extra.is_file():
                seen = {json.dumps(json.loads(x), sort_keys=True) for x in first.splitlines()}
                pool = json.loads((self.data / "alpaca" / "alpaca_5000.json").read_text())
                gsm = (self.data / "gsm8k" / "train.jsonl").read_text().splitlines()
                pool += [json.loads(line) for line in gsm]
                pool = [r for r in pool if json.dumps(r, sort_keys=True) not in seen]
                rng = random.Random(self.args.seed + 2)
                n_gsm = round(self.args.rows * self.args.gsm8k_fraction)
                alpaca = [r for r in pool if "instruction" in r]
                rows = rng.sample(alpaca, self.args.rows - n_gsm)
                rows += rng.sample([r for r in pool if "question" in r], n_gsm)
                rng.shuffle(rows)
                write_jsonl(extra, rows)
            spec = self.distill_spec(extra)
            part = self.out / "distilled-extra.jsonl"
            if not part.is_file():
                self.timed("distill extra", lambda: run_distill(spec, part, self.reporter))
            orig.write_text(first + extra.read_text())
            dist.write_text((self.out / "distilled.jsonl").read_text() + part.read_text())
        for kind, data in (("sft", orig), ("sd", dist)):
            self.train(ft_name(kind, 6, n), 6, data)
            self.evaluate(ft_name(kind, 6, n))

    def merged_sd(self) -> None:
        """The paper's merge at this scale: SD on the Alpaca rows and SD on the GSM8K rows
        of the recovery set, fine-tuned apart, SLERP-merged (t = 0.5), 6 blocks."""
        from service.merge import run_merge
        from service.specs import MergeSpec

        out = self.out / MERGED
        if not (out / "merge_report.json").is_file():
            rows = [json.loads(line) for line in (self.out / "distilled.jsonl").open()]
            parts = []
            for source, key in (("alpaca", "instruction"), ("gsm8k", "question")):
                path = self.out / f"distilled-{source}.jsonl"
                write_jsonl(path, [r for r in rows if key in r])
                parts.append(self.train(f"sd-6-{source}", 6, path))
            spec = MergeSpec(models=[str(p) for p in parts], t=0.5)
            self.timed(f"merge {MERGED}", lambda: run_merge(spec, out, self.reporter))
        self.evaluate(MERGED, True)

    def evaluate(self, name: str, agreement: bool = False) -> dict:
        from service.evaluate import run_evaluate

        path = self.out / f"eval-{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        ref = self.args.model if name == "unpruned" else str(self.out / name)
        spec = EvaluateSpec(
            model=ref,
            tasks=TASKS,
            limit=self.args.eval_limit,
            teacher=self.args.model if agreement else None,
            agreement_dataset=str(self.heldout_prompts()) if agreement else None,
            agreement_prompts=self.args.agreement_prompts,
            agreement_max_new_tokens=64,
            speedup_prompts=0,
        )
        return self.timed(
            f"evaluate {name}",
            lambda: run_evaluate(spec, path, self.reporter, data_dir=self.data),
        )

    # -- the run -----------------------------------------------------------------------
    def stages(self):
        rows = self.args.rows
        yield "prune", self.prune_all
        yield "distill", self.distill
        yield "evaluate unpruned", lambda: self.evaluate("unpruned")
        for n in MAIN_BLOCKS:
            yield f"evaluate pruned {n}", lambda n=n: self.evaluate(pruned_name("angular", n), True)
        for n in MAIN_BLOCKS:
            for kind in ("sft", "sd"):
                yield (
                    f"{kind} {n}",
                    lambda kind=kind, n=n: (
                        self.finetune(kind, n, rows),
                        self.evaluate(ft_name(kind, n, rows), True),
                    ),
                )
        for metric, n in ABLATION:
            yield f"ablation {metric} {n}", lambda m=metric, n=n: self.evaluate(pruned_name(m, n))
        for part in (rows // 4, rows // 2):
            for kind in ("sft", "sd"):
                yield (
                    f"sweep {kind} {part}",
                    lambda kind=kind, part=part: (
                        self.finetune(kind, 6, part),
                        self.evaluate(ft_name(kind, 6, part)),
                    ),
                )

        yield "try merge", self.merged_sd
        yield "try more data", self.more_data

    def run(self) -> None:
        self.check_config()
        for label, fn in self.stages():
            if self.args.only and not any(label.startswith(s) for s in self.args.only):
                continue
            self.reporter.event(f"stage: {label}")
            fn()
            write_results(self.out, self.args, self.times, Path(self.args.results))
        write_results(self.out, self.args, self.times, Path(self.args.results))


# -- the results document --------------------------------------------------------------
def _load(out: Path, name: str) -> dict | None:
    path = out / f"eval-{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _avg_se(ev: dict) -> float | None:
    ses = [r.get("acc_stderr") for r in ev["tasks"].values()]
    if any(s is None for s in ses):
        return None
    return math.sqrt(sum(s * s for s in ses)) / len(ses)


def _row(label: str, ev: dict | None, base: dict | None, extra: list[str] | None = None) -> str:
    n_extra = len(extra) if extra is not None else 0
    if ev is None:
        return f"| {label} | " + " | ".join(["pending"] * (len(TASKS) + 3 + n_extra)) + " |"
    cells = []
    for t in TASKS:
        r = ev["tasks"][t]
        se = r.get("acc_stderr")
        cells.append(f"{r['acc']:.3f}" + (f" ± {se:.3f}" if se is not None else ""))
    se = _avg_se(ev)
    cells.append(f"{ev['average']:.3f}" + (f" ± {se:.3f}" if se is not None else ""))
    for tasks in (TASKS, above_chance(base)):
        ret = retention(_only(ev, tasks), _only(base, tasks))["mean"] if base else None
        cells.append(f"{100 * ret:.1f}%" if ret is not None else "-")
    return f"| {label} | " + " | ".join(cells + (extra or [])) + " |"


# Accuracy of guessing: uniform over the choices (boolq: yes/no).
CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "piqa": 0.5, "openbookqa": 0.25,
          "winogrande": 0.5, "boolq": 0.5}  # fmt: skip


def above_chance(base: dict | None) -> list[str]:
    """Tasks the unpruned model does clearly better than guessing on (acc > chance + 2 SE):
    on the others a "retention" measures noise around chance, not retained skill."""
    if base is None:
        return []
    return [
        t
        for t in TASKS
        if base["tasks"][t]["acc"] > CHANCE[t] + 2 * (base["tasks"][t].get("acc_stderr") or 0)
    ]


def _only(ev: dict | None, tasks: list[str]) -> dict:
    return {t: r for t, r in ((ev or {}).get("tasks") or {}).items() if t in tasks}


def _agreement_cells(ev: dict | None) -> list[str]:
    a = (ev or {}).get("agreement")
    s = (ev or {}).get("speculative") or {}
    if not a:
        return ["-", "-", "-"]
    rate = s.get("acceptance_rate")
    return [f"{a['kl_mean']:.3f}", f"{a['top1']:.3f}", f"{rate:.3f}" if rate is not None else "-"]


def _train_cells(out: Path, name: str) -> str:
    log = out / name / "train_log.json"
    if not log.is_file():
        return "pending"
    t = json.loads(log.read_text())
    return f"{t.get('rows')} rows, {t.get('tokens')} tokens, final loss {t.get('final_loss'):.3f}"


def write_results(out: Path, args: argparse.Namespace, times: dict, dest: Path) -> None:
    base = _load(out, "unpruned")
    sure = ", ".join(above_chance(base)) or "none yet"
    head = "| model | " + " | ".join(TASKS) + f" | average | retention | retention ({sure}) |"
    rule = "|" + "---|" * (len(TASKS) + 4)
    lines = [
        "# Results: recovering a pruned SmolLM2-135M-Instruct (the paper's experiment, small)",
        "",
        "Written by `bench/recovery.py`; rerun to resume or refresh:",
        "",
        "```",
        f".venv/bin/python -m bench.recovery --data-dir ../shared/data --out {args.out} "
        f"--rows {args.rows} --eval-limit {args.eval_limit} --epochs {args.epochs} "
        f"--lr {args.lr}",
        "```",
        "",
        f"Paper, for reference: average accuracy retention {PAPER}.",
        "",
        "## Setup",
        "",
        f"- Model: `{args.model}` (30 decoder blocks), fp32 on a 2-core CPU.",
        "- Pruning: angular distance (Gromov et al.) on 128 Alpaca rows (seeded sample, "
        "256 tokens each); one calibration pass, every prune cut from its scores.",
        f"- Recovery set: {args.rows} rows, a seeded shuffle of "
        f"{args.rows - round(args.rows * args.gsm8k_fraction)} Alpaca (alpaca_5000.json) "
        f"and {round(args.rows * args.gsm8k_fraction)} GSM8K-train rows (seed {args.seed}).",
        f"- Self-distillation: the unpruned model rewrites every response (SDFT templates, "
        f"math template with answer check on GSM8K rows), greedy, at most "
        f"{args.max_new_tokens} new tokens, `{args.engine}` engine.",
        f"- Fine-tuning (identical for SFT and SD): LoRA rank {args.lora_rank}, alpha "
        f"{2 * args.lora_rank}, q_proj/v_proj, lr {args.lr} cosine, batch 8, {args.epochs} "
        f"epochs, seed {args.seed}; the same rows in the same order, so the same steps.",
        f"- Evaluation: lm-evaluation-harness on the local task files, first {args.eval_limit} "
        "documents of each task (the same documents for every model), acc (not acc_norm) "
        "± standard error; average ± its "
        "standard error (tasks taken as independent); retention = mean over tasks of "
        "model acc / unpruned acc; the last column keeps only the tasks the unpruned model "
        "does clearly better than chance on (acc > chance + 2 SE), since on the others a "
        "ratio measures noise around chance.",
        f"- Teacher agreement on {args.agreement_prompts} held-out prompts (half Alpaca rows "
        "outside the recovery set, half GSM8K test questions), 64 greedy teacher tokens "
        "each: KL(teacher || model) per token, top-1 agreement, and the exact acceptance "
        "rate of the model as a 5-token speculative draft for the unpruned teacher.",
    ]
    ds = (
        json.loads((out / "distill_summary.json").read_text())
        if (out / "distill_summary.json").is_file()
        else None
    )
    if ds:
        lines.append(
            f"- Distilled: {ds['distilled']} of {ds['rows']} rows kept the rewrite "
            f"({100 * ds['distilled_fraction']:.0f}%); reasons {ds.get('reasons')}."
        )
    lines += ["", "## Main table", "", head + " KL | top-1 | draft acceptance |",
              rule + "---|---|---|"]  # fmt: skip
    lines.append(_row("unpruned (30 blocks)", base, base, ["-", "-", "-"]))
    for n in MAIN_BLOCKS:
        pr = _load(out, pruned_name("angular", n))
        report = out / pruned_name("angular", n) / "prune_report.json"
        removed = json.loads(report.read_text())["removed_layers"] if report.is_file() else "?"
        lines.append(
            _row(f"{n} blocks cut {removed}, no fine-tuning", pr, base, _agreement_cells(pr))
        )
        for kind, label in (("sft", "SFT"), ("sd", "self-data distillation")):
            ev = _load(out, ft_name(kind, n, args.rows))
            lines.append(_row(f"{n} blocks, {label}", ev, base, _agreement_cells(ev)))
    lines += ["", "Training per condition:", ""]
    for n in MAIN_BLOCKS:
        for kind in ("sft", "sd"):
            name = ft_name(kind, n, args.rows)
            lines.append(f"- `{name}`: {_train_cells(out, name)}")
    lines += [
        "",
        "## Ablation: angular distance vs Block Influence, no fine-tuning",
        "",
        head,
        rule,
    ]
    for metric, n in ABLATION:
        report = out / pruned_name(metric, n) / "prune_report.json"
        removed = json.loads(report.read_text())["removed_layers"] if report.is_file() else "?"
        lines.append(_row(f"{metric} {n} {removed}", _load(out, pruned_name(metric, n)), base))
    lines += ["", "## Data size: SFT vs self-data distillation, 6 blocks", "", head, rule]
    for part in (args.rows // 4, args.rows // 2, args.rows, 2 * args.rows):
        for kind, label in (("sft", "SFT"), ("sd", "SD")):
            lines.append(_row(f"{label}, {part} rows", _load(out, ft_name(kind, 6, part)), base))
    lines += ["", "## Tried after: SD fine-tuned per source and SLERP-merged, 6 blocks", "",
              head + " KL | top-1 | draft acceptance |", rule + "---|---|---|"]  # fmt: skip
    ev = _load(out, ft_name("sd", 6, args.rows))
    lines.append(_row("SD on the mix (main table)", ev, base, _agreement_cells(ev)))
    ev = _load(out, MERGED)
    lines.append(_row("SD Alpaca ⊕ SD GSM8K (SLERP 0.5)", ev, base, _agreement_cells(ev)))
    lines += ["", "## Wall times (seconds, this run, shared 2-core machine)", ""]
    lines += [f"- {k}: {v}" for k, v in times.items()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    notes = dest.with_name("results-notes.md")
    text = "\n".join(lines) + "\n"
    if notes.is_file():  # the hand-written discussion, kept across rewrites
        text += "\n" + notes.read_text()
    dest.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--out", default="runs/recovery")
    ap.add_argument("--results", default="docs/results.md")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--rows", type=int, default=128, help="recovery rows (Alpaca + GSM8K)")
    ap.add_argument("--gsm8k-fraction", type=float, default=0.25)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--engine", default="fast")
    ap.add_argument("--distill-batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--eval-limit", type=int, default=100)
    ap.add_argument("--agreement-prompts", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", help="run only stages whose label starts so")
    args = ap.parse_args(argv)
    if not (Path(args.data_dir) / "alpaca" / "alpaca_5000.json").is_file():
        sys.exit(
            f"{args.data_dir} lacks alpaca/alpaca_5000.json: this experiment needs ../shared/data"
        )
    Experiment(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
