"""The run report: what pruning removed, how training went, what recovery bought.

    distillery report runs/demo        # writes runs/demo/report.md, report.html, report_*.png

``run_report(run_dir)`` reads whatever the pipeline left in the run directory
(``service/pipeline.py``): ``pruned/prune_report.json``, ``recovered/train_log.json``,
``eval_<name>.json`` (baseline, pruned, recovered, and any other condition, each with
``agreement`` and ``speculative`` when evaluated with ``--teacher``), ``summary.json``,
``distill_summary.json`` and ``pipeline_spec.json``. It writes ``report.md`` (PNG figures
beside it) and ``report.html``, self-contained with the figures embedded as data URIs.
A part that is missing gets a "not available" line, never an error. Every section is
always present, in the order of ``SECTIONS``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from service.errors import DistilleryError
from service.evaluate import retention
from service.flops import DEFAULT_CONTEXT, compare_dir
from service.report_render import Block, to_html, to_markdown

SECTIONS = (
    "Summary",
    "Pruning: block distances and removed blocks",
    "Training loss",
    "Accuracy and retention",
    "Teacher agreement",
    "Speculative decoding",
    "FLOPs and size",
    "Specs",
)
EVAL_ORDER = ("baseline", "pruned", "recovered")
NA = "not available"

# Sections are lists of blocks; service/report_render.py lists the kinds.


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def collect(run_dir: Path) -> dict[str, Any]:
    """Every JSON the report can use, by role (None when absent or unreadable)."""
    evals = {}
    for path in sorted(run_dir.glob("eval_*.json")):
        data = _read(path)
        if data and isinstance(data.get("tasks"), dict):
            evals[path.stem.removeprefix("eval_")] = data
    order = [n for n in EVAL_ORDER if n in evals] + [n for n in evals if n not in EVAL_ORDER]
    return {
        "prune": _read(run_dir / "pruned" / "prune_report.json"),
        "train": _read(run_dir / "recovered" / "train_log.json"),
        "evals": {n: evals[n] for n in order},
        "summary": _read(run_dir / "summary.json"),
        "distill": _read(run_dir / "distill_summary.json"),
        "pipeline_spec": _read(run_dir / "pipeline_spec.json"),
    }


def _f(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _retention(model: dict, baseline: dict | None) -> tuple[dict, float | None]:
    """Per-task acc / baseline acc and their mean; the eval's own when it has one."""
    if baseline is None:
        r = model.get("retention") or {}
        return r.get("tasks") or {}, r.get("mean")
    r = retention(model["tasks"], baseline["tasks"])
    return r["tasks"], r["mean"]


def _flops(run_dir: Path, prune: dict | None) -> dict | None:
    if not prune or not (run_dir / "pruned" / "config.json").is_file():
        return None
    return compare_dir(run_dir / "pruned", prune["num_layers_before"], DEFAULT_CONTEXT)


def section_summary(d: dict, flops: dict | None) -> list[Block]:
    spec = d["pipeline_spec"] or {}
    items = []
    if spec:
        items.append(f"model `{spec.get('model')}`, fine-tuning set `{spec.get('dataset')}`")
    if d["prune"]:
        p = d["prune"]
        items.append(
            f"removed {len(p['removed_layers'])} of {p['num_layers_before']} blocks "
            f"({p['metric']}): layers {p['removed_layers']} (0-based)"
        )
    if d["distill"] and d["distill"].get("distilled_fraction") is not None:
        items.append(
            f"distilled {d['distill'].get('rows')} rows, "
            f"{_pct(d['distill']['distilled_fraction'], 0)} rewritten by the teacher"
            + (
                " (" + ", ".join(f"{k} {v}" for k, v in d["distill"]["reasons"].items()) + ")"
                if isinstance(d["distill"].get("reasons"), dict)
                else ""
            )
        )
    base = d["evals"].get("baseline")
    for name, e in d["evals"].items():
        if name != "baseline":
            _, mean = _retention(e, base)
            items.append(f"{name}: average accuracy {_f(e.get('average'))}, retention {_pct(mean)}")
        if e.get("agreement"):
            a, s = e["agreement"], e.get("speculative") or {}
            items.append(
                f"{name} vs teacher: KL {_f(a.get('kl_mean'), 4)}, top-1 {_pct(a.get('top1'))}, "
                f"draft acceptance {_pct(s.get('acceptance_rate'))}"
            )
    if flops:
        items.append(
            f"forward FLOPs per token -{flops['flops_saving_pct']:.1f}%, "
            f"parameters -{flops['params_saving_pct']:.1f}%"
        )
    seconds = (d["summary"] or {}).get("seconds")
    if seconds:
        items.append("step seconds: " + ", ".join(f"{k} {v}" for k, v in seconds.items()))
    return [("list", items)] if items else [("na", f"Run summary {NA}.")]


def section_pruning(d: dict, images: dict) -> list[Block]:
    p = d["prune"]
    if not p:
        return [("na", f"Pruning {NA} (no pruned/prune_report.json).")]
    blocks: list[Block] = [
        (
            "p",
            f"Metric **{p['metric']}** on {p.get('samples', '?')} calibration rows "
            f"({p.get('tokens', '?')} tokens) of `{p.get('calibration', '?')}`. "
            f"Removed blocks **{p['removed_layers']}** (0-based indices of the original "
            f"model), {p['num_layers_before']} → {p['num_layers_after']} blocks; "
            f"score of the removed run {_f(p.get('removed_score'), 4)}.",
        )
    ]
    read = p.get("read") or {}
    if read:
        common = ", ".join(f"`{t!r}` ×{n}" for t, n in read.get("most_common", [])[:3])
        blocks.append(
            (
                "p",
                f"Rows presented as **{read.get('presentation', '?')}**; the state read is "
                f"the {read.get('position', '?')}: {read.get('distinct_tokens', '?')} "
                f"distinct tokens, most common {common}.",
            )
        )
    if "distances" in images:
        blocks.append(("img", images["distances"], "block distances"))
    cands = p.get("candidates") or []
    if p.get("check") and cands:
        c = p["check"]
        where = "held-out" if c.get("held_out") else "scoring (no held-out left)"
        blocks.append(
            (
                "p",
                f"Candidates checked by {c['measure']} on {c['rows']} {where} calibration "
                f"rows ({c['tokens']} tokens); the smallest is removed:",
            )
        )
        rows = [
            [
                ", ".join(map(str, k["removed"])),
                k["by"],
                _f(k.get("distance"), 4),
                _f(k.get("kl"), 4),
                "removed" if k["removed"] == p["removed_layers"] else "",
            ]
            for k in cands
        ]
        blocks.append(("table", ["blocks", "by", "angular distance", "KL", ""], rows))
    dist = (p.get("distances") or {}).get(str(len(p["removed_layers"])))
    if p["metric"] == "angular" and dist and not p.get("check"):
        best = sorted(range(len(dist)), key=lambda i: dist[i])[:5]
        rows = [[str(i), f"{i}–{i + len(p['removed_layers']) - 1}", _f(dist[i], 4)] for i in best]
        blocks.append(("p", f"Closest runs of {len(p['removed_layers'])} blocks:"))
        blocks.append(("table", ["start", "blocks", "angular distance"], rows))
    return blocks


def section_loss(d: dict, images: dict) -> list[Block]:
    t = d["train"]
    if not t or not t.get("steps"):
        return [("na", f"Training loss {NA} (no recovered/train_log.json).")]
    spec = t.get("spec") or {}
    return [
        (
            "p",
            f"{len(t['steps'])} steps on {t.get('rows', '?')} rows, loss "
            f"{_f(t.get('first_loss'))} → {_f(t.get('final_loss'))}; "
            f"LoRA r{spec.get('lora_rank', '?')} on {','.join(spec.get('target_modules', []))}, "
            f"lr {spec.get('lr', '?')}, {_f(t.get('tokens_per_s'), 0)} tokens/s.",
        ),
        ("img", images["loss"], "training loss"),
    ]


def section_accuracy(d: dict, images: dict) -> list[Block]:
    evals = d["evals"]
    if not evals:
        return [("na", f"Accuracy {NA} (no eval_*.json).")]
    tasks = list(dict.fromkeys(t for e in evals.values() for t in e["tasks"]))
    base = evals.get("baseline")
    rows = []
    for name, e in evals.items():
        per, mean = _retention(e, base)
        cells = []
        for t in tasks:
            r = e["tasks"].get(t) or {}
            se = r.get("acc_stderr")
            cells.append(_f(r.get("acc")) + (f" ± {se:.3f}" if se else ""))
        rows.append([name, *cells, _f(e.get("average")), _pct(mean)])
    n = {e["tasks"][t].get("n") for e in evals.values() for t in e["tasks"]}
    blocks: list[Block] = [
        ("table", ["model", *tasks, "average", "retention"], rows),
        ("p", f"Retention = accuracy / baseline accuracy, mean over tasks. Documents per task: {sorted(x for x in n if x)}."),
    ]  # fmt: skip
    blocks.append(("img", images["accuracy"], "accuracy per task"))
    return blocks


def section_agreement(d: dict) -> list[Block]:
    rows = []
    for name, e in d["evals"].items():
        a = e.get("agreement")
        if a:
            rows.append([
                name, _f(a.get("kl_mean"), 4), _pct(a.get("top1")),
                _f(a.get("embedding_cosine"), 4), str(a.get("prompts")), str(a.get("tokens")),
            ])  # fmt: skip
    if not rows:
        return [("na", f"Teacher agreement {NA} (evaluate with --teacher).")]
    a = next(e["agreement"] for e in d["evals"].values() if e.get("agreement"))
    return [
        ("table", ["model", "KL(teacher‖model)", "top-1", "embedding cosine", "prompts", "tokens"], rows),
        ("p", f"Along the teacher `{a.get('teacher')}`'s greedy continuation ({a.get('max_new_tokens')} new tokens) "
              f"of held-out prompts from `{a.get('source')}`: mean per-token KL of the model's next-token "
              f"distribution from the teacher's, the share of positions where their argmax agrees, and the "
              f"cosine of the mean hidden state ({a.get('hidden_states')})."),
    ]  # fmt: skip


def section_speculative(d: dict) -> list[Block]:
    rows, notes = [], []
    for name, e in d["evals"].items():
        s = e.get("speculative")
        if not s:
            continue
        h = s.get("assisted") or {}
        speed = (
            f"{h['speedup']:.2f}x ({h.get('identical')}/{h.get('prompts')} identical)"
            if h.get("speedup")
            else "-"
        )
        rows.append([
            name, str(s.get("k")), _pct(s.get("acceptance_rate")), _f(s.get("mean_accepted"), 2),
            _f(s.get("tokens_per_round"), 2), speed,
        ])  # fmt: skip
        v = s.get("vllm")
        if v:
            notes.append(
                f"{name}, vLLM draft_model on GPU: acceptance {_pct(v.get('acceptance_rate'))}, "
                f"mean acceptance length {_f(v.get('mean_acceptance_length'), 2)}, "
                f"speed-up {_f(v.get('speedup'), 2)}x"
            )
    if not rows:
        return [("na", f"Speculative decoding {NA} (evaluate with --teacher).")]
    blocks: list[Block] = [
        ("table", ["draft", "k", "acceptance rate", "accepted / round", "tokens / teacher forward", "assisted speed-up"], rows),
        ("p", "The model drafts k tokens greedily for the teacher, which keeps the longest prefix that "
              "matches its own greedy choice plus one token of its own; exact replay of greedy decoding. "
              "Assisted speed-up: wall clock of transformers' plain greedy generation over "
              "generate(assistant_model=draft) on the same prompts and device."),
    ]  # fmt: skip
    if notes:
        blocks.append(("list", notes))
    return blocks


def section_flops(flops: dict | None) -> list[Block]:
    if not flops:
        return [("na", f"FLOPs and size {NA} (no pruned/config.json).")]
    b, a = flops["layers"]
    rows = [
        ["blocks", str(b), str(a), f"{100 * (1 - a / b):.1f}%"],
        ["parameters", f"{flops['params'][0]:,}", f"{flops['params'][1]:,}", f"{flops['params_saving_pct']:.1f}%"],
        ["non-embedding parameters", f"{flops['params_non_embedding'][0]:,}", f"{flops['params_non_embedding'][1]:,}",
         f"{100 * (1 - flops['params_non_embedding'][1] / flops['params_non_embedding'][0]):.1f}%"],
        ["forward FLOPs / token", f"{flops['flops_per_token'][0]:,}", f"{flops['flops_per_token'][1]:,}",
         f"{flops['flops_saving_pct']:.1f}%"],
    ]  # fmt: skip
    return [
        ("table", ["", "before", "after", "saving"], rows),
        ("p", f"FLOPs: 2 per multiply-add of every linear layer (q, k, v, o, gate, up, down; LM head), "
              f"attention over a context of {flops['context']} tokens, embedding lookup free "
              f"(service/flops.py). The 2 × parameters rule the paper's 16.3% matches would say "
              f"{flops['flops_2n_saving_pct']:.1f}%."),
    ]  # fmt: skip


def _step_specs(pipeline_spec: dict | None) -> dict:
    """The specs of the steps the pipeline ran (``service.steps``), by step name."""
    if not pipeline_spec:
        return {}
    from service.specs import PipelineSpec
    from service.steps import pipeline_steps, run_folder_ref

    try:
        # Paths relative to the run folder ("pruned", "distilled.jsonl"): the report sits
        # in it, and the service builds it in a temporary folder whose path means nothing
        # to the reader.
        steps = pipeline_steps(PipelineSpec(**pipeline_spec), run_folder_ref(Path(".")))
    except Exception:  # a spec of another version: show what the files say instead
        return {}
    return {s.name: s.spec.model_dump(mode="json") for s in steps if s.spec is not None}


def section_specs(run_dir: Path, d: dict) -> list[Block]:
    """Every spec used: the pipeline's, each step's (from the pipeline spec, else from the
    step's own output), and the teacher options an evaluation actually ran with."""
    specs: dict[str, Any] = {
        "pipeline": d["pipeline_spec"],
        **_step_specs(d["pipeline_spec"]),
    }
    if d["prune"] and "prune" not in specs:
        keep = ("model", "calibration", "metric", "samples")
        specs["prune"] = {k: d["prune"].get(k) for k in keep}
    if d["distill"] and "distill" not in specs:
        specs["distill"] = d["distill"].get("spec")
    if d["train"] and d["train"].get("spec"):
        specs["finetune"] = d["train"]["spec"]  # the one it trained with
    for name, e in d["evals"].items():
        ev = specs.get(f"evaluate {name}") or {
            "model": e.get("model"), "tasks": list(e["tasks"]), "limit": e.get("limit"),
        }  # fmt: skip
        if e.get("agreement"):
            a, s = e["agreement"], e.get("speculative") or {}
            ev = {**ev, "teacher": a.get("teacher"), "agreement_dataset": a.get("source"),
                  "agreement_prompts": a.get("prompts"), "agreement_max_new_tokens": a.get("max_new_tokens"),
                  "draft_k": s.get("k"), "speedup_prompts": (s.get("assisted") or {}).get("prompts", 0)}  # fmt: skip
        specs[f"evaluate {name}"] = ev
    blocks: list[Block] = []
    for name, spec in specs.items():
        if spec:
            blocks += [("p", f"**{name}**"), ("code", json.dumps(spec, indent=2))]
    return blocks or [("na", f"Specs {NA}.")]


def build_sections(run_dir: Path, d: dict) -> tuple[list[tuple[str, list[Block]]], dict]:
    """The sections (title, blocks) and the figure files written for them."""
    from service import report_plots as plots

    images: dict[str, str] = {}
    if d["prune"] and (d["prune"].get("distances") or d["prune"].get("block_influence")):
        images["distances"] = plots.plot_distances(
            d["prune"], run_dir / "report_distances.png"
        ).name
    if d["train"] and d["train"].get("steps"):
        images["loss"] = plots.plot_loss(d["train"], run_dir / "report_loss.png").name
    if d["evals"]:
        images["accuracy"] = plots.plot_accuracy(d["evals"], run_dir / "report_accuracy.png").name
    flops = _flops(run_dir, d["prune"])
    bodies = [
        section_summary(d, flops),
        section_pruning(d, images),
        section_loss(d, images),
        section_accuracy(d, images),
        section_agreement(d),
        section_speculative(d),
        section_flops(flops),
        section_specs(run_dir, d),
    ]
    return list(zip(SECTIONS, bodies, strict=True)), images


def run_report(run_dir: Path, name: str | None = None) -> dict:
    """Write report.md, report.html and the report_*.png figures into ``run_dir``.

    ``name`` titles the report (the job id or run name); by default the run folder's name.
    The service builds a report in a temporary folder, so it always passes the job's."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DistilleryError(f"no run directory at {run_dir}")
    d = collect(run_dir)
    sections, images = build_sections(run_dir, d)
    title = f"Distillery report: {name or run_dir.resolve().name}"
    md, page = run_dir / "report.md", run_dir / "report.html"
    for path, text in (
        (md, to_markdown(title, sections)),
        (page, to_html(title, sections, run_dir)),
    ):
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text(text)
        tmp.replace(path)
    return {
        "markdown": str(md),
        "html": str(page),
        "plots": [str(run_dir / name) for name in images.values()],
        "sections": list(SECTIONS),
        "missing": [name for name, blocks in sections if blocks[0][0] == "na"],
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_pipeline_report(
    store, run_id: str, pipeline: dict, results: dict, summary: dict, artifacts: dict
) -> str:
    """The service's pipeline report: a ``run`` artifact holding the run folder (laid out
    as ``run_pipeline`` lays it out, from the steps' results) and its report (HTML,
    markdown, plots), served at GET /v1/jobs/{id}/report. ``pipeline`` is its record."""
    import shutil

    parents = [a for a in artifacts.values() if a]
    with store.create("run", artifact_id=run_id, tenant=pipeline["tenant"],
                      job_id=pipeline["id"], parents=parents) as tmp:  # fmt: skip
        write_run_dir(tmp, pipeline["spec"], results, summary)
        recovered = artifacts.get("recovered")
        if recovered:
            log = store.path("model", recovered) / "model" / "train_log.json"
            if log.is_file():
                (tmp / "recovered").mkdir(exist_ok=True)
                shutil.copy(log, tmp / "recovered" / "train_log.json")
        run_report(tmp, name=pipeline["id"])
    return run_id


def write_run_dir(out: Path, spec: dict, results: dict[str, dict], summary: dict) -> None:
    """Lay out a run folder the way ``run_pipeline`` does (what ``run_report`` reads), from
    step results held elsewhere (the service keeps them in job records). The fine-tune's
    result is its training log, which the service copies from the model."""
    from service.specs import PipelineSpec
    from service.steps import pipeline_steps, run_folder_ref

    for step in pipeline_steps(PipelineSpec(**spec), run_folder_ref(out)):
        if step.done and step.type != "finetune" and step.name in results:
            (out / step.done).parent.mkdir(parents=True, exist_ok=True)
            (out / step.done).write_text(json.dumps(results[step.name], indent=2, default=str))
    for name, doc in (("pipeline_spec.json", spec), ("summary.json", summary)):
        (out / name).write_text(json.dumps(doc, indent=2, default=str))
