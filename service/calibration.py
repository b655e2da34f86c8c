"""Calibration documents for block scoring: how each is shown to the model, and which
position's hidden state is read.

    docs = load_calibration("../shared/data/alpaca/alpaca_5000.json")   # rows or text
    scored, held_out = split_docs(docs, samples=128, held_out=16, seed=0)
    batches, positions = calibration_batches(scored, tokenizer, 256, 8, "text")

Gromov et al. (2024) read the last token of each sample and score C4 documents as plain
text; PruneMe (``compute_block_similarity/utils.py``, ``get_last_non_padded_tokens``)
reads the last non-padded token of raw text. A *chat-rendered* row ends on the
template's end-of-turn tokens (``<|im_end|>`` and a newline for SmolLM2), the same
tokens for every row: reading there measures the template, not the text. Measured on the
builtin model (issue 13): that cut blocks 4-9 and kept 68% of its accuracy on arc_easy and
piqa; the same rows as plain text cut 13-18 and kept 96%.

So every document carries the position of its last *content* token, a token that
overlaps the text of a message and is not a special token, for either presentation:

- ``text`` (default): system, earlier turns, instruction, input and response joined by
  blank lines; tokenised as PruneMe does (the tokenizer's own BOS, if any, is added).
- ``chat``: the chat template's rendering; template text (role headers, the default
  system prompt, end-of-turn markers) is never read.

Plain-text documents (a ``.txt`` file with one document per line, or rows holding a
``text`` field) are accepted for the ``text`` presentation.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import torch

from service.datasets import Row, dataset_path, read_dataset
from service.errors import DatasetError, ModelError, SpecError
from service.train_data import conversation

Doc = Row | str  # an instruction row or a plain-text document
PRESENTATIONS = ("text", "chat")


def load_calibration(ref: str) -> list[Doc]:
    """Documents of a calibration reference (path or dataset id): rows of any training
    shape, ``{"text": ...}`` rows, or a ``.txt`` file with one document per line."""
    path = dataset_path(ref)
    if path.suffix == ".txt":
        if not path.is_file():
            raise DatasetError([], summary=f"dataset file not found: {path}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise DatasetError([], summary=f"{path} is not valid UTF-8: {exc.reason}") from exc
        docs: list[Doc] = [line for line in lines if line.strip()]
        if not docs:
            raise DatasetError([], summary=f"{path} holds no documents")
        return docs
    return read_dataset(path, text=True)


def split_docs(
    docs: list[Doc], samples: int, held_out: int, seed: int
) -> tuple[list[Doc], list[Doc]]:
    """``samples`` documents to score (seeded, in file order; all when fewer) and up to
    ``held_out`` others for the check, drawn from the rest with ``seed + 1``."""
    if len(docs) <= samples:
        return list(docs), []
    picked = sorted(random.Random(seed).sample(range(len(docs)), samples))
    chosen = set(picked)
    rest = [i for i in range(len(docs)) if i not in chosen]
    extra = sorted(random.Random(seed + 1).sample(rest, min(held_out, len(rest))))
    return [docs[i] for i in picked], [docs[i] for i in extra]


def _messages(doc: Row) -> list[dict[str, str]]:
    return [*conversation(doc), {"role": "assistant", "content": doc.response}]


def plain_text(doc: Doc) -> str:
    """A row as plain text: its messages' contents separated by blank lines (the
    instruction's input follows it, as Alpaca formats the prompt)."""
    if isinstance(doc, str):
        return doc
    return "\n\n".join(m["content"] for m in _messages(doc) if m["content"].strip())


def _spans(text: str, contents: list[str]) -> list[tuple[int, int]]:
    """Character spans of each message's text inside the rendered ``text``, in order."""
    spans, cursor = [], 0
    for content in contents:
        for needle in (content, content.strip()):
            at = text.find(needle, cursor) if needle else -1
            if at >= 0:
                spans.append((at, at + len(needle)))
                cursor = at + len(needle)
                break
        else:
            if content.strip():
                raise ModelError(
                    "the chat template does not reproduce the message text verbatim, so its "
                    "content tokens cannot be told from template tokens; use presentation text"
                )
    return spans


def render(doc: Doc, tokenizer, presentation: str) -> tuple[str, list[tuple[int, int]], bool]:
    """(text, character spans of content, add special tokens when tokenising)."""
    if presentation == "text":
        text = plain_text(doc)
        return text, [(0, len(text))], True
    if presentation != "chat":
        raise SpecError(f"unknown presentation {presentation!r}: expected text or chat")
    if isinstance(doc, str):
        raise SpecError(
            "plain-text calibration documents have no chat turns; use presentation text"
        )
    messages = _messages(doc)
    contents = [m["content"] for m in messages]
    if not getattr(tokenizer, "chat_template", None):
        text = "\n\n".join(contents)
    else:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    # The chat template already holds the special tokens.
    return text, _spans(text, contents), False


def special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids |= {i for i, tok in added.items() if getattr(tok, "special", False)}
    return ids


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    read: int  # the position whose hidden state is scored: the last content token


def encode(doc: Doc, tokenizer, max_length: int, presentation: str) -> Encoded | None:
    """Token ids (truncated to ``max_length``) and the last content position, or None
    when no content token falls within ``max_length``."""
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError("block scoring needs a fast tokenizer (character offsets of tokens)")
    text, spans, add_special = render(doc, tokenizer, presentation)
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_length]
    offsets = enc["offset_mapping"][: len(ids)]
    special = special_ids(tokenizer)
    content = [
        i
        for i, (tok, (s, e)) in enumerate(zip(ids, offsets, strict=True))
        if tok not in special and e > s and any(s < b and e > a for a, b in spans)
    ]
    return Encoded(ids, content[-1]) if content else None


def read_summary(encoded: list[Encoded], tokenizer, skipped: int, presentation: str) -> dict:
    """What the scores rest on: the tokens read, most common first (for the report)."""
    counts = Counter(e.ids[e.read] for e in encoded)
    return {
        "presentation": presentation,
        "position": "last content token (overlaps message text; never a special or template token)",
        "distinct_tokens": len(counts),
        "most_common": [[tokenizer.decode([t]), n] for t, n in counts.most_common(5)],
        "rows_without_content": skipped,
    }


def calibration_batches(
    docs: list[Doc], tokenizer, max_length: int, batch_size: int, presentation: str = "text"
) -> tuple[list[dict[str, torch.Tensor]], dict]:
    """Right-padded batches (the last may be partial; none is dropped) with the read
    position of each row, and a summary of the tokens read.

    Rows are sorted by length so a batch pads little; padding never counts in the scores
    (the attention mask excludes it and right padding keeps real positions unchanged).
    """
    encoded = [encode(d, tokenizer, max_length, presentation) for d in docs]
    kept = [e for e in encoded if e is not None]
    if not kept:
        raise SpecError(
            f"no calibration row has a content token within its first {max_length} tokens; "
            "raise max_length"
        )
    summary = read_summary(kept, tokenizer, len(encoded) - len(kept), presentation)
    kept.sort(key=lambda e: len(e.ids), reverse=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(kept), batch_size):
        chunk = kept[start : start + batch_size]
        width = max(len(e.ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, e in enumerate(chunk):
            ids[i, : len(e.ids)] = torch.tensor(e.ids)
            mask[i, : len(e.ids)] = 1
        read = torch.tensor([e.read for e in chunk], dtype=torch.long)
        batches.append({"input_ids": ids, "attention_mask": mask, "read_index": read})
    return batches, summary
