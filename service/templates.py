"""SDFT prompt templates and the filters that decide whether a rewrite is kept.

Self-data distillation (step 3 of DESIGN.md) asks the unpruned teacher to rewrite each
response, conditioned on the instruction and the original ("reference") response, with
the templates of SDFT (sail-sg/sdft, ``src/llmtuner/data/template.py``:
``alpaca_distill_using`` and ``gsm8k_distill``). :func:`build_request` makes the chat
request, :func:`judge` decides which response a row keeps and why:

    from service.templates import build_request, judge
    req = build_request(row, "auto")          # Request(messages, prefill)
    response, distilled, reason = judge(row, "auto", generation)

Rules (checked in this order; the first failing one is the ``reason``):

1. a leading ``### Response:`` marker is stripped, then surrounding whitespace
   (SDFT strips every prediction: ``eval/utils.py: strip_dict``);
2. ``empty``: nothing left;
3. ``echoed_template``: the rewrite repeats the prompt's ``### Instruction:`` /
   ``### Reference Answer:`` / ``### Response:`` sections. The 135M builtin teacher
   does this in ~30% of rewrites (DESIGN.md, "Reference facts"), which SDFT's phrase
   filter alone lets through;
4. ``leaked_template``: SDFT's ban list (``eval/gen_distilled_data.py: verify``) —
   "reference answer", "your response", "my response", "your own response",
   "now it's your turn" anywhere, or a start with "Your turn" (case-insensitive here;
   SDFT matches the start case-sensitively);
5. ``truncated``: generation stopped at ``max_new_tokens`` (finish_reason "length").
   SDFT keeps such rewrites; we do not: training on a reply cut mid-sentence and
   followed by EOS teaches the student to stop mid-thought, while the original
   response is complete. A truncated math rewrite would mostly fail rule 6 anyway;
6. math only: ``label_unparsed`` (the label has no number), ``no_answer`` (the rewrite
   has none) or ``answer_mismatch`` (numerically different final answers), following
   SDFT's ``eval/eval_math.py: check_math``, which also falls back when either side
   does not parse.

A kept rewrite has reason ``ok``. For math the kept response is the completion
*without* the "Great! Let's think step by step. " prefill: SDFT's prefill is part of
the prompt (``gsm8k_distill``), LLaMA-Factory's ``predict_with_generate`` saves only the
generated tokens, and ``gen_distilled_data.py`` stores that ``predict`` as the answer.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Literal

from service.datasets import Row
from service.teacher.base import Generation, Request

TemplateName = Literal["auto", "general", "math"]

# sail-sg/sdft src/llmtuner/data/template.py, "alpaca_distill_using".
GENERAL_SYSTEM = (
    "Below are an instruction that describes a task along with a reference answer. "
    "Using the reference answer as a guide, write your own response."
)
GENERAL_USER = (
    "### Instruction:\n{instruction}\n\n### Reference Answer:\n{response}\n\n### Response:\n"
)

# sail-sg/sdft src/llmtuner/data/template.py, "gsm8k_distill".
MATH_SYSTEM = (
    "You are an expert in math. Below are a math question and its reference answer. "
    "Refer to the reference answer and write a response that appropriately answers the question."
)
MATH_USER = "{question}\n\n{answer}"
MATH_PREFILL = "Great! Let's think step by step. "

# sail-sg/sdft eval/gen_distilled_data.py: verify().
LEAK_PHRASES = (
    "reference answer",
    "your response",
    "my response",
    "your own response",
    "now it's your turn",
)
LEAK_PREFIX = "your turn"

# The general template's section markers; a rewrite repeating one echoes the prompt.
_RESPONSE_MARKER = re.compile(r"^\s*(?:#+\s*)?response\s*:\s*", re.IGNORECASE)
_ECHO_MARKER = re.compile(r"#+\s*(?:instruction|reference\s+answer|response)\s*:", re.IGNORECASE)

# A number as GSM8K writes it: optional sign and $, thousands commas, decimals.
_NUMBER = r"-?\$?\d+(?:,\d{3})*(?:\.\d+)?"
_HASH_ANSWER = re.compile(r"####\s*(" + _NUMBER + r")")
_SAID_ANSWER = re.compile(
    r"answer\s*(?:is\s*:?|:|=)\s*(?:\*\*)?\s*(" + _NUMBER + r")", re.IGNORECASE
)
_ANY_NUMBER = re.compile(_NUMBER)


def resolve_template(row: Row, template: str) -> Literal["general", "math"]:
    """``auto`` picks math for GSM8K-shaped rows (kind "math"), general otherwise."""
    if template == "auto":
        return "math" if row.kind == "math" else "general"
    if template not in ("general", "math"):
        raise ValueError(f"unknown template {template!r}")
    return template  # type: ignore[return-value]


def build_request(row: Row, template: str) -> Request:
    """The teacher's chat request for one row.

    SDFT strips the query and the reference before filling the template. A chat row's
    earlier turns stay before the final user turn; its own system prompt follows the
    SDFT instruction in the system turn, so the rewrite still honours it.
    """
    kind = resolve_template(row, template)
    if kind == "math":
        system = MATH_SYSTEM
        user = MATH_USER.format(question=row.prompt.strip(), answer=row.response.strip())
        prefill = MATH_PREFILL
    else:
        system = GENERAL_SYSTEM
        user = GENERAL_USER.format(instruction=row.prompt.strip(), response=row.response.strip())
        prefill = ""
    if row.system:
        system = f"{system}\n\n{row.system}"
    messages = (("system", system), *row.history, ("user", user))
    return Request(messages=tuple(messages), prefill=prefill)


def clean_rewrite(text: str) -> str:
    """Strip whitespace and any leading "### Response:" markers the teacher echoed."""
    text = text.strip()
    while True:
        stripped = _RESPONSE_MARKER.sub("", text, count=1).strip()
        if stripped == text:
            return text
        text = stripped


def to_number(text: str) -> Decimal | None:
    """'1,234' / '$5' / '5.00' -> Decimal; None if it is not a number."""
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def parse_final_answer(text: str) -> Decimal | None:
    """The final numeric answer of a solution: the last ``#### N``, else the last
    "The answer is N", else the last number in the text."""
    for pattern in (_HASH_ANSWER, _SAID_ANSWER):
        hits = pattern.findall(text)
        if hits:
            return to_number(hits[-1])
    hits = _ANY_NUMBER.findall(text)
    return to_number(hits[-1]) if hits else None


def parse_label_answer(label: str) -> Decimal | None:
    """GSM8K's answer follows ``####``; other labels fall back to their last number."""
    return parse_final_answer(label)


def leak_of(text: str) -> str | None:
    """The SDFT ban-list phrase a rewrite contains, if any."""
    lower = text.lower()
    for phrase in LEAK_PHRASES:
        if phrase in lower:
            return phrase
    return LEAK_PREFIX if lower.startswith(LEAK_PREFIX) else None


def judge(row: Row, template: str, generation: Generation) -> tuple[str, bool, str]:
    """(kept response, distilled?, reason). See the module docstring for the rules."""
    text = clean_rewrite(generation.text)
    reason = _reject_reason(row, resolve_template(row, template), text, generation)
    if reason is None:
        return text, True, "ok"
    return row.response, False, reason


def _reject_reason(row: Row, kind: str, text: str, generation: Generation) -> str | None:
    if not text:
        return "empty"
    if _ECHO_MARKER.search(text):
        return "echoed_template"
    if leak_of(text):
        return "leaked_template"
    if generation.finish_reason == "length":
        return "truncated"
    if kind == "math":
        label = parse_label_answer(row.response)
        if label is None:
            return "label_unparsed"
        answer = parse_final_answer(text)
        if answer is None:
            return "no_answer"
        if answer != label:
            return "answer_mismatch"
    return None
