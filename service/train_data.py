"""Training examples for LoRA recovery: chat-templated token ids with the prompt masked,
and length-grouped micro-batches.

    from service.train_data import tokenise_rows, plan_steps, collate

Each row becomes ``system? + history + user prompt`` rendered with the model's chat
template and ``add_generation_prompt=True`` (the prompt), then the same conversation
with the assistant response (the full text). The prompt must be a prefix of the full
text; the loss covers only what follows it: the response and the template's
end-of-turn token. The prompt and the completion are tokenised separately, which is
how the model meets them at inference (prompt ids given, completion generated).
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

import torch

from service.datasets import Row
from service.errors import ModelError

IGNORE = -100  # label of positions without loss (torch cross_entropy's ignore_index)
# Rows per length-sorted pool: HF's LengthGroupedSampler sorts "megabatches" of 50
# batches; 16 keeps the order well mixed on small sets while still grouping lengths.
POOL_BATCHES = 16


@dataclass(frozen=True)
class Example:
    """One tokenised row: ``ids[:prompt_len]`` carry no loss."""

    ids: tuple[int, ...]
    prompt_len: int
    row: int  # 1-based position of the row in the dataset

    @property
    def labels(self) -> list[int]:
        return [IGNORE] * self.prompt_len + list(self.ids[self.prompt_len :])


def conversation(row: Row) -> list[dict[str, str]]:
    """The row as chat messages, without the assistant response."""
    msgs = [{"role": "system", "content": row.system}] if row.system is not None else []
    msgs += [{"role": role, "content": content} for role, content in row.history]
    msgs.append({"role": "user", "content": row.prompt})
    return msgs


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts every text with its BOS token."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def render(tokenizer, row: Row) -> tuple[str, str]:
    """(prompt text, completion text); prompt + completion is the full conversation."""
    msgs = conversation(row)
    if tokenizer.chat_template is None:
        # A base model without a template: Alpaca-style plain text, ending in EOS, after
        # the BOS its tokenizer adds to any text (Gemma is lost without it).
        bos = tokenizer.bos_token if adds_bos(tokenizer) else ""
        return f"{bos}{row.prompt}\n\n", f"{row.response}{tokenizer.eos_token or ''}"
    prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*msgs, {"role": "assistant", "content": row.response}], tokenize=False
    )
    if not full.startswith(prompt):
        raise ModelError(
            "the chat template renders the prompt differently with and without the "
            f"assistant turn, so the response cannot be located (row prompt {row.prompt[:60]!r})"
        )
    return prompt, full[len(prompt) :]


def tokenise_row(tokenizer, row: Row, max_length: int, number: int = 0) -> Example | None:
    """Token ids and prompt length, cut to ``max_length``; None if no response token fits."""
    prompt, completion = render(tokenizer, row)
    # The template writes its own special tokens (BOS, <|im_start|>...), so none are added.
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = (p_ids + c_ids)[:max_length]
    if len(ids) <= len(p_ids):
        return None
    return Example(ids=tuple(ids), prompt_len=len(p_ids), row=number)


def tokenise_rows(tokenizer, rows: list[Row], max_length: int) -> tuple[list[Example], list[int]]:
    """(examples, 1-based numbers of the rows skipped because their response was cut away)."""
    examples, skipped = [], []
    for i, row in enumerate(rows, start=1):
        ex = tokenise_row(tokenizer, row, max_length, number=i)
        if ex is None:
            skipped.append(i)
        else:
            examples.append(ex)
    return examples, skipped


def fingerprint(examples: list[Example]) -> str:
    """sha256 of the token ids and masks: a resumed run must train on the same data."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(f"{ex.prompt_len}:{','.join(map(str, ex.ids))};".encode())
    return h.hexdigest()


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    return math.ceil(n_examples / batch_size)


def plan_epoch(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices of each optimiser step of one epoch, a pure function of its inputs.

    Shuffle, sort pools of ``POOL_BATCHES`` batches by length, cut them into batches, and
    shuffle the batch order: rows of similar length share a step, so micro-batches carry
    little padding. Every example is used once; the last batch may be smaller.
    """
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = batch_size * POOL_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: -lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def micro_batches(step: list[int], lengths: list[int], size: int) -> list[list[int]]:
    """Split one step's examples into micro-batches of similar length."""
    ordered = sorted(step, key=lambda i: -lengths[i])
    return [ordered[j : j + size] for j in range(0, len(ordered), size)]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (pads get no loss)."""
    width = max(len(ex.ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex.ids)
        ids[i, :n] = torch.tensor(ex.ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(ex.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
