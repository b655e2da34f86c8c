"""LoRA recovery fine-tuning (DESIGN.md step 4): train adapters on the pruned model with
the loss on response tokens only, then merge them so the result is a plain model.

    distillery finetune --model pruned/ --dataset distilled.jsonl --out recovered/
    distillery finetune --model pruned/ --dataset distilled.jsonl --out recovered/ --resume

A torchtune-style recipe: one class with ``setup / train / save_checkpoint /
save_model / cleanup`` and the loop in plain sight. Defaults (``FinetuneSpec``) follow
SDFT (sail-sg/sdft, LLaMA-Factory): rank 8, lr 1e-4 with cosine decay, effective batch 8;
the adapters go on every linear layer of the decoder blocks (peft's ``all-linear``, found
on the model: ``service/adapters.py``), where SDFT adapts ``q_proj,v_proj`` (still
selectable: ``--target-modules q_proj,v_proj``). The result lists what was adapted and
what was left out (``adapted_modules``). Every ``checkpoint_every`` steps (and when cancelled or
interrupted) the recipe writes ``<out>.ckpt``, one self-describing file (adapter,
optimizer, scheduler, RNG state, step, epoch and position, spec, loss log) in the
manner of nanoGPT; ``--resume`` continues from it to the same weights and loss log an
uninterrupted run gives. ``<out>/train_log.json`` holds the loss per step.

Logit distillation (Minitron's recovery of depth-pruned models) with ``--teacher``: the
unpruned model runs beside the student on the same batch, under ``no_grad``, and the
loss becomes ``(1 - w) * CE + w * T^2 * KL(teacher || student)`` over the response
tokens, as NVIDIA Model Optimizer's ``LogitsDistillationLoss`` (forward KL on softened
distributions, scaled by T^2 so its gradients keep their size as T changes). Nothing of
the teacher is stored beyond the current micro-batch.

    distillery finetune --model pruned/ --dataset rows.jsonl --teacher builtin:... --out recovered/

Data parallel across the GPUs of one machine (or CPU processes, gloo) under torchrun::

    torchrun --standalone --nproc-per-node 4 -m service.cli finetune --model pruned/ \
        --dataset distilled.jsonl --out recovered/

Every rank plans the same steps; each takes its share of every step's examples, the
gradients are summed across ranks once per step (``service/distributed.py``), so the
result equals a single-process run of the same batch size (up to float rounding; with
``lora_dropout`` > 0 the dropout masks differ). Rank 0 alone writes checkpoints and the
output and reports progress; it decides cancellation for all ranks.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from service import distributed
from service.adapters import (
    ALL_LINEAR,
    adapted_modules,
    check_targets,
    lora_targets,
    shape_of_model,
)
from service.datasets import load_rows
from service.errors import CancelledError, DatasetError, DistilleryError, SpecError
from service.models import load_model
from service.progress import Reporter
from service.specs import FinetuneSpec
from service.train_data import (
    IGNORE,
    collate,
    fingerprint,
    micro_batches,
    plan_epoch,
    steps_per_epoch,
    tokenise_rows,
)

CHECKPOINT_VERSION = 1
# Gradient-norm clipping at 1.0: the HF Trainer / LLaMA-Factory default SDFT trains with.
MAX_GRAD_NORM = 1.0
# Spec fields that may change between a run and its resumption (they do not change
# the result).
RESUMABLE_CHANGES = {"checkpoint_every"}


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based): linear warm-up, then
    cosine decay, as ``transformers.get_cosine_schedule_with_warmup`` but shifted so that
    no step runs at 0. HF's schedule gives step 0 the factor 0/warmup = 0, and since
    warmup = ceil(ratio * steps) is at least 1, the first step of every run was wasted and
    a one-step run trained nothing. Here step s of the warm-up gets (s + 1) / (warmup + 1),
    the decay starts at 1 and its last step stays above 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def checkpoint_path(out: Path) -> Path:
    """The checkpoint sits next to the output directory, which appears only when done."""
    return out.parent / (out.name + ".ckpt")


class FinetuneRecipe:
    """One fine-tuning run: ``setup``, ``train``, ``save_model``, ``cleanup``."""

    def __init__(self, spec: FinetuneSpec, out: Path, reporter: Reporter):
        self.spec = spec
        self.out = out
        self.ckpt = checkpoint_path(out)
        self.reporter = reporter
        self.step = 0  # optimiser steps completed
        self.log: list[dict[str, Any]] = []
        self.tokens = 0  # real (non-pad) tokens processed
        self.seconds = 0.0  # time spent in training steps
        self.resumed_from: int | None = None
        self._updating = False  # inside optimizer.step(): an interrupt leaves no clean state
        self._boundary_rng: torch.Tensor | None = None
        self.rank, self.world = 0, 1  # torchrun: set in setup()

    # -- setup --------------------------------------------------------------------

    def setup(self, resume: bool) -> None:
        from peft import LoraConfig, get_peft_model

        spec = self.spec
        self.rank, self.world = distributed.setup()
        if self.rank != 0:
            self.reporter = Reporter()  # progress and events come from rank 0 only
        if (
            self.out.exists()
            and any(self.out.iterdir())
            and not (self.out / "config.json").exists()
        ):
            raise SpecError(
                f"{self.out} exists and is not a model directory; refusing to replace it"
            )
        if self.ckpt.exists() and not resume:
            raise SpecError(
                f"{self.ckpt} holds an interrupted run: pass --resume to continue it, "
                "or delete it to start over"
            )
        rows = load_rows(spec.dataset, limit=spec.limit)
        model, self.tokenizer = load_model(spec.model)
        self.teacher = self.load_teacher(model) if spec.teacher else None
        self.n_rows = len(rows)
        self.examples, self.skipped = tokenise_rows(self.tokenizer, rows, spec.max_length)
        if not self.examples:
            raise DatasetError(
                [], summary=f"no row keeps a response token within max_length={spec.max_length}"
            )
        if self.skipped:
            self.reporter.event(
                f"{len(self.skipped)} rows skipped: their response lies beyond "
                f"max_length={spec.max_length} (rows {self.skipped[:20]})",
                level="warning",
            )
        self.lengths = [len(ex.ids) for ex in self.examples]
        self.data_sha = fingerprint(self.examples)
        self.steps_per_epoch = steps_per_epoch(len(self.examples), spec.batch_size)
        self.steps_total = math.ceil(spec.epochs * self.steps_per_epoch)

        # Every name must match (peft raises only when none does): checked on the model's
        # structure before the adapters go on, as at submission.
        shape = shape_of_model(model)
        check_targets(list(spec.target_modules), shape, spec.model)
        modules, parameters = lora_targets(spec.target_modules, shape)
        # peft adapts mixture-of-experts experts (parameters, not nn.Linear) through
        # lora.ParamWrapper, which has no dropout: such a model trains without.
        self.lora_dropout = spec.lora_dropout
        experts = parameters or (modules == ALL_LINEAR and shape.parameters)
        if experts and spec.lora_dropout:
            self.lora_dropout = 0.0
            self.reporter.event(
                f"lora_dropout {spec.lora_dropout} -> 0: peft adapts the experts of "
                f"{shape.architecture} without dropout",
                level="warning",
            )
        torch.manual_seed(spec.seed)  # LoRA A init, then dropout
        lora = LoraConfig(
            r=spec.lora_rank,
            lora_alpha=spec.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=modules,
            target_parameters=parameters or None,
            bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            self.model = get_peft_model(model, lora)
        except ValueError as exc:  # target modules missing from this architecture
            raise SpecError(f"cannot add LoRA adapters: {exc}") from exc
        self.adapted = adapted_modules(self.model, shape)
        if self.adapted["not_adapted"]:
            self.reporter.event(
                f"not adapted: {', '.join(self.adapted['not_adapted'])} (adapted: "
                f"{', '.join(self.adapted['modules'] + self.adapted['parameters'])})",
                level="warning" if list(spec.target_modules) == [ALL_LINEAR] else "info",
            )
        self.model.train()
        self.device = next(self.model.parameters()).device
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if self.world > 1:
            distributed.broadcast_(self.params.values())
        # AdamW without weight decay (HF Trainer and LLaMA-Factory default).
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=spec.lr, weight_decay=0.0)
        warmup = math.ceil(spec.warmup_ratio * self.steps_total)  # as HF's get_warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(lr_factor, warmup=warmup, total=self.steps_total)
        )
        if resume and self.ckpt.exists():
            self.load_checkpoint()
        elif resume:
            self.reporter.event(f"no checkpoint at {self.ckpt}; starting from step 0")
        self.reporter.event(
            f"training on {len(self.examples)} rows for {self.steps_total} steps "
            f"({self.steps_per_epoch} per epoch), starting at step {self.step}"
        )

    def load_teacher(self, student) -> torch.nn.Module:
        """The frozen teacher of logit distillation, on the student's device; its
        vocabulary must be the student's (the KL compares distributions token by token)."""
        teacher, tok = load_model(self.spec.teacher, device=str(student.device))
        if (
            teacher.get_output_embeddings().weight.shape[0]
            != (student.get_output_embeddings().weight.shape[0])
            or tok.get_vocab() != self.tokenizer.get_vocab()
        ):
            raise SpecError(
                f"teacher {self.spec.teacher!r} does not share the vocabulary of "
                f"{self.spec.model!r}: logit distillation needs the same tokenizer"
            )
        teacher.requires_grad_(False)
        return teacher

    # -- training -------------------------------------------------------------------

    def step_batch(self, step: int) -> list[int]:
        """Example indices of optimiser step ``step`` (0-based): derived, never stored."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if getattr(self, "_plan_epoch", None) != epoch:
            self._plan = plan_epoch(self.lengths, self.spec.batch_size, self.spec.seed, epoch)
            self._plan_epoch = epoch
        return self._plan[position]

    @staticmethod
    def response_logits(model, batch: dict[str, torch.Tensor], keep: torch.Tensor):
        """fp32 logits of ``model`` (a plain causal LM) at the positions that predict a
        response token only: the vocabulary projection of prompt and padding positions
        would be wasted work."""
        hidden = model.get_decoder()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state
        logits = model.get_output_embeddings()(hidden[:, :-1][keep]).float()
        scale = getattr(model.config, "logits_scaling", None)
        if scale and scale != 1:  # Granite divides its logits; its own forward does so
            logits = logits / scale
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:  # Gemma 2/3 cap their logits; the model's own forward does the same
            logits = torch.tanh(logits / cap) * cap
        return logits

    def response_loss(
        self, batch: dict[str, torch.Tensor], n_targets: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The micro-batch's share of the step loss, and its parts (``ce``, and ``kl``
        with a teacher): sums over the response tokens divided by the step's target
        count, so accumulated micro-batches give the step's token means."""
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE
        logits = self.response_logits(self.model.get_base_model(), batch, keep)
        ce = F.cross_entropy(logits, labels[keep], reduction="sum") / n_targets
        if self.teacher is None:
            return ce, {"ce": ce.item()}
        t, w = self.spec.kd_temperature, self.spec.kd_weight
        with torch.no_grad():
            target = F.log_softmax(self.response_logits(self.teacher, batch, keep) / t, dim=-1)
        kl = F.kl_div(
            F.log_softmax(logits / t, dim=-1), target, reduction="sum", log_target=True
        ) * (t * t / n_targets)
        return (1.0 - w) * ce + w * kl, {"ce": ce.item(), "kl": kl.item()}

    def train(self) -> None:
        try:
            while self.step < self.steps_total:
                self._boundary_rng = torch.get_rng_state()
                self.check()
                self.train_step()
                if self.step % self.spec.checkpoint_every == 0 or self.step == self.steps_total:
                    self.save_checkpoint()
        except (CancelledError, KeyboardInterrupt):
            # Parameters and optimiser are still those of the last completed step
            # unless the interrupt hit optimizer.step(); the RNG is rewound to that
            # step's end, so the saved state is exactly a step-boundary state.
            if (
                self.rank == 0
                and self.step > 0
                and not self._updating
                and self._boundary_rng is not None
            ):
                self.save_checkpoint(rng=self._boundary_rng)
                self.reporter.event(f"stopped at step {self.step}; checkpoint {self.ckpt}")
            raise

    def check(self) -> None:
        """Raise when the job is cancelled or out of time: on rank 0 the reporter says so,
        and every rank hears it in the same step (else the others would wait forever in
        the next all-reduce)."""
        if self.world == 1:
            self.reporter.check()
            return
        stop: BaseException | None = None
        if self.rank == 0:
            try:
                self.reporter.check()
            except (CancelledError, DistilleryError) as exc:
                stop = exc
        if distributed.agree(stop is not None, self.device):
            raise stop if stop is not None else CancelledError("stopped by rank 0")

    def train_step(self) -> None:
        start = time.perf_counter()
        batch_ids = self.step_batch(self.step)
        # This rank's share: every world-th example of the step in length order, so the
        # shares carry similar token counts.
        ordered = sorted(batch_ids, key=lambda i: -self.lengths[i])
        mine = ordered[self.rank :: self.world]
        examples = [self.examples[i] for i in batch_ids]
        n_targets = sum(len(ex.ids) - ex.prompt_len for ex in examples)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        # Every key on every rank, even one with no example this step: under torchrun the
        # ranks must make the same collective calls.
        parts = dict.fromkeys(("ce", "kl") if self.teacher is not None else ("ce",), 0.0)
        for micro in micro_batches(mine, self.lengths, self.spec.micro_batch_size):
            batch = collate([self.examples[i] for i in micro], self.tokenizer.pad_token_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            part, terms = self.response_loss(batch, n_targets)
            part.backward()
            loss += part.item()
            for k, v in terms.items():
                parts[k] = parts.get(k, 0.0) + v
        if self.world > 1:
            loss = distributed.sum_gradients(list(self.params.values()), loss)
            if self.teacher is not None:  # the parts are logged only then
                summed = distributed.sum_scalars(list(parts.values()), self.device)
                parts = dict(zip(parts, summed, strict=True))
        if not math.isfinite(loss):
            raise DistilleryError(f"loss is {loss} at step {self.step + 1}; try a lower --lr")
        tokens = sum(len(ex.ids) for ex in examples)
        self._updating = True
        torch.nn.utils.clip_grad_norm_(self.params.values(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.tokens += tokens
        self.seconds += time.perf_counter() - start
        entry = {"step": self.step, "loss": loss, "lr": lr, "tokens": tokens}
        if self.teacher is not None:  # the parts only where they differ from the loss
            entry.update(parts)
        self.log.append(entry)
        self._updating = False
        self.reporter.progress(
            step=self.step,
            steps_total=self.steps_total,
            loss=loss,
            lr=lr,
            tokens_per_s=self.tokens_per_s,
            **(parts if self.teacher is not None else {}),
        )

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    # -- checkpoints -----------------------------------------------------------------

    def save_checkpoint(self, rng: torch.Tensor | None = None) -> None:
        """Write everything a resumed run needs into one file, atomically (rank 0; the
        other ranks hold the same state)."""
        if self.rank != 0:
            return
        epoch, position = divmod(self.step, self.steps_per_epoch)
        state = {
            "version": CHECKPOINT_VERSION,
            "spec": self.spec.model_dump(mode="json"),
            "data_sha256": self.data_sha,
            "step": self.step,
            "steps_total": self.steps_total,
            "epoch": epoch,
            "position": position,
            "adapter": {n: p.detach().cpu() for n, p in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng if rng is not None else torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "log": self.log,
            "tokens": self.tokens,
            "seconds": self.seconds,
        }
        tmp = self.ckpt.with_name(f".{self.ckpt.name}.{uuid.uuid4().hex[:6]}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt)

    def load_checkpoint(self) -> None:
        try:
            state = torch.load(self.ckpt, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise SpecError(f"cannot read checkpoint {self.ckpt}: {exc}") from exc
        if state.get("version") != CHECKPOINT_VERSION:
            raise SpecError(f"{self.ckpt} has checkpoint version {state.get('version')}")
        ours = self.spec.model_dump(mode="json")
        diff = [
            f"{k}: {state['spec'].get(k)!r} -> {v!r}"
            for k, v in ours.items()
            if k not in RESUMABLE_CHANGES and state["spec"].get(k) != v
        ]
        if diff:
            raise SpecError(
                f"{self.ckpt} was written by a run with a different spec ({'; '.join(diff)}); "
                "rerun with the same options or delete the checkpoint"
            )
        if state["data_sha256"] != self.data_sha:
            raise SpecError(f"the training data changed since {self.ckpt} was written")
        missing = set(self.params) ^ set(state["adapter"])
        if missing:
            raise SpecError(f"{self.ckpt} does not match the adapter: {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state["adapter"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step, self.log = state["step"], list(state["log"])
        self.tokens, self.seconds = state["tokens"], state["seconds"]
        self.resumed_from = self.step
        self.reporter.event(f"resumed from {self.ckpt} at step {self.step}")

    # -- output ------------------------------------------------------------------------

    def save_model(self) -> dict[str, Any]:
        """Merge the adapter, write model + tokenizer + train_log.json to ``out`` atomically.
        Under torchrun only rank 0 writes; the others return their rank and step."""
        if self.rank != 0:
            return {"rank": self.rank, "world_size": self.world, "steps": self.step}
        merged = self.model.merge_and_unload()
        merged.eval()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(f".{self.out.name}.{uuid.uuid4().hex[:6]}.tmp")
        merged.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        summary = {
            "spec": self.spec.model_dump(mode="json"),
            "steps": self.log,
            "first_loss": self.log[0]["loss"] if self.log else None,
            "final_loss": self.log[-1]["loss"] if self.log else None,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens_per_s,
            "seconds": self.seconds,
            "rows": self.n_rows,  # rows read; rows - skipped_rows were trained on
            "skipped_rows": len(self.skipped),
            "skipped_row_numbers": self.skipped,
            "world_size": self.world,
            # Paths inside a decoder block: what got adapters, and what did not.
            "adapted_modules": self.adapted,
            "lora_dropout": self.lora_dropout,
        }
        (tmp / "train_log.json").write_text(json.dumps(summary, indent=1))
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.{uuid.uuid4().hex[:6]}.old")
            self.out.rename(old)
            tmp.rename(self.out)
            shutil.rmtree(old)
        else:
            tmp.rename(self.out)
        result = {k: v for k, v in summary.items() if k not in ("spec", "steps")}
        result.update(
            out=str(self.out),
            steps=self.step,
            resumed_from=self.resumed_from,
            skipped_row_numbers=self.skipped[:100],
        )
        return result

    def cleanup(self) -> None:
        distributed.barrier()  # rank 0 has written the output before anyone leaves
        if self.rank == 0:
            self.ckpt.unlink(missing_ok=True)
        distributed.teardown()


def run_finetune(
    spec: FinetuneSpec, out: Path, reporter: Reporter | None = None, resume: bool = False
) -> dict[str, Any]:
    """LoRA fine-tune ``spec.model`` on ``spec.dataset``, merge, save a plain model to ``out``.

    With ``resume``, continue from ``<out>.ckpt`` when it exists (same spec required).
    Returns the summary of ``out/train_log.json`` (losses, tokens/s, skipped rows).
    """
    recipe = FinetuneRecipe(spec, Path(out), reporter or Reporter())
    recipe.setup(resume)
    recipe.train()
    result = recipe.save_model()
    recipe.cleanup()
    return result
