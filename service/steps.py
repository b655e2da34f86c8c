"""The pipeline's step graph, defined once::

    prune ──┬──────────────▶ evaluate pruned ─────┐
    distill ┴▶ finetune ───▶ evaluate recovered ──┼▶ report
    evaluate baseline ────────────────────────────┘

Everything that runs, queues or reports a pipeline reads this list: ``run_pipeline``
(in-process, ``distillery run``) runs the steps in order, the service makes one job per
step chained by RQ dependencies on ``needs`` (``workers/lifecycle.py``), the report step
gathers the results by step name (``workers/execute.py``), and the report shows every
step's spec (``service/report.py``).

A step names an earlier step's product through ``ref(name)``: ``run_pipeline`` passes the
path of that product in the run folder, the service the step's job id (a worker turns it
into the artifact when the step starts), the report the path relative to the run folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from service.specs import DistillSpec, EvaluateSpec, FinetuneSpec, PipelineSpec, PruneSpec

# The models a pipeline evaluates, and the step that made each (None: the pipeline's
# own model).
EVALUATED = {"baseline": None, "pruned": "prune", "recovered": "finetune"}
# The pipeline's products: name -> (step, artifact kind).
PRODUCTS = {"pruned": ("prune", "model"), "distilled": ("distill", "dataset"),
            "recovered": ("finetune", "model")}  # fmt: skip


@dataclass(frozen=True)
class Step:
    name: str  # "prune", "distill", "finetune", "evaluate <model>", "report"
    type: str  # the job type that runs it
    spec: BaseModel | None  # None for the report, which reads the other steps' results
    needs: tuple[str, ...] = ()  # steps whose products or results it reads
    evaluates: str | None = None  # for an evaluate step: which model

    @property
    def output(self) -> str:
        """Its product in a run folder (``run_pipeline``, the report)."""
        return OUTPUTS.get(self.name, "")

    @property
    def done(self) -> str:
        """The file in a run folder that holds its result (and says it finished)."""
        return DONE.get(self.name, "")


def evaluate_step(model: str) -> str:
    return f"evaluate {model}"


def run_folder_ref(out: Path) -> Callable[[str], str]:
    """Products named by their place in the run folder ``out``."""
    return lambda name: str(out / OUTPUTS[name])


OUTPUTS = {"prune": "pruned", "distill": "distilled.jsonl", "finetune": "recovered",
           **{evaluate_step(m): f"eval_{m}.json" for m in EVALUATED}}  # fmt: skip
DONE = {"prune": "pruned/prune_report.json", "distill": "distill_summary.json",
        "finetune": "recovered/train_log.json",
        **{evaluate_step(m): f"eval_{m}.json" for m in EVALUATED}}  # fmt: skip
NAMES = ("prune", "distill", "finetune", *(evaluate_step(m) for m in EVALUATED), "report")


def pipeline_steps(spec: PipelineSpec, ref: Callable[[str], str]) -> list[Step]:
    """The steps of ``spec`` in an order that runs each after the steps it needs."""
    steps = [
        Step(
            "prune",
            "prune",
            PruneSpec(
                model=spec.model,
                calibration=spec.calibration or spec.dataset,
                blocks=spec.blocks,
                metric=spec.metric,
                samples=spec.samples,
                seed=spec.seed,
            ),
        ),
        Step(
            "distill",
            "distill",
            DistillSpec(
                teacher=spec.model,
                dataset=spec.dataset,
                template=spec.template,
                limit=spec.limit,
                max_new_tokens=spec.max_new_tokens,
                engine=spec.engine,
                dtype=spec.dtype,
                seed=spec.seed,
            ),
        ),
        Step(
            "finetune",
            "finetune",
            FinetuneSpec(
                model=ref("prune"),
                dataset=ref("distill"),
                lora_rank=spec.lora_rank,
                lora_alpha=spec.lora_alpha,
                target_modules=spec.lora_targets,
                lr=spec.lr,
                epochs=spec.epochs,
                seed=spec.seed,
                # Logit distillation from the unpruned model, when asked (bench/recovery.py).
                **({"teacher": spec.model, "kd_weight": spec.kd_weight} if spec.kd_weight else {}),
            ),
            needs=("prune", "distill"),
        ),
    ]
    for model, made_by in EVALUATED.items():
        espec = EvaluateSpec(
            model=ref(made_by) if made_by else spec.model,
            tasks=spec.tasks,
            limit=spec.eval_limit,
            # Agreement with the unpruned teacher, for the pruned and recovered models.
            teacher=spec.model if made_by and spec.agreement_prompts else None,
            agreement_prompts=max(spec.agreement_prompts, 1),
            agreement_max_new_tokens=spec.agreement_max_new_tokens,
            speedup_prompts=0,
        )
        steps.append(Step(evaluate_step(model), "evaluate", espec,
                          needs=(made_by,) if made_by else (), evaluates=model))  # fmt: skip
    steps.append(Step("report", "report", None, needs=tuple(evaluate_step(m) for m in EVALUATED)))
    return steps
