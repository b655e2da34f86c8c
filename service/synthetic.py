"""Data the project can produce itself, for machines without the public data sets:
arithmetic word problems in the GSM8K shape (``question``, ``answer`` with the final
answer after ``####``) and an arithmetic multiple-choice task in the llm-foundry shape
(``query``, ``choices``, ``gold``) that the ``arith`` evaluation task reads.

    .venv/bin/python -c "from service.synthetic import write_synthetic; write_synthetic('gen')"

Seeded, so every machine generates the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ana", "Ben", "Chloe", "Dev", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade"]
THINGS = ["apples", "pencils", "stickers", "books", "marbles", "cookies", "stamps", "shells"]


def _problem(rng: random.Random) -> tuple[str, str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        q = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
        c, expr = a + b, f"{a} + {b}"
    elif kind == "sub":
        a, b = max(a, b), min(a, b)
        q = f"{name} had {a} {thing} and gave away {b}. How many {thing} are left?"
        c, expr = a - b, f"{a} - {b}"
    else:
        b = rng.randint(2, 9)
        q = f"{name} buys {b} packs of {thing} with {a} {thing} in each pack. How many {thing} is that?"
        c, expr = a * b, f"{a} * {b}"
    return q, f"{name} ends with {expr} = <<{expr}={c}>>{c} {thing}.\n#### {c}", c


def write_synthetic(folder: str | Path, rows: int = 128, mc_docs: int = 200, seed: int = 0) -> Path:
    """Write ``folder/arith_rows.jsonl`` (training rows) and ``folder/arith/arith.jsonl``
    (evaluation task); return the training file."""
    folder = Path(folder)
    (folder / "arith").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train = folder / "arith_rows.jsonl"
    with train.open("w") as fh:
        for _ in range(rows):
            q, a, _ = _problem(rng)
            fh.write(json.dumps({"question": q, "answer": a}) + "\n")
    with (folder / "arith" / "arith.jsonl").open("w") as fh:
        for _ in range(mc_docs):
            q, _, c = _problem(rng)
            wrong = {c + d for d in (-10, -2, -1, 1, 2, 10) if c + d >= 0} - {c}
            choices = [str(c)] + [str(w) for w in rng.sample(sorted(wrong), 3)]
            rng.shuffle(choices)
            doc = {"query": f"Question: {q}", "choices": choices, "gold": choices.index(str(c))}
            fh.write(json.dumps(doc) + "\n")
    return train
