"""SDFT templates and filters, on hand-written generations (no model needed)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from service.datasets import Row, read_dataset
from service.teacher.base import Generation
from service.templates import (
    GENERAL_SYSTEM,
    LEAK_PHRASES,
    MATH_PREFILL,
    MATH_SYSTEM,
    build_request,
    clean_rewrite,
    judge,
    parse_final_answer,
    resolve_template,
)

ALPACA = Row(
    instruction="What is the capital of Italy?",
    response="The capital of Italy is Rome.",
    source={"instruction": "What is the capital of Italy?", "output": "Rome."},
)
GSM = Row(
    instruction="Tom has 3 apples and buys 2 more. How many apples does he have?",
    response="3 + 2 = <<3+2=5>>5\n#### 5",
    kind="math",
    source={"question": "q", "answer": "a"},
)


def gen(text: str, finish_reason: str = "stop") -> Generation:
    return Generation(text=text, tokens=len(text.split()) + 1, finish_reason=finish_reason)


def test_general_request_is_sdft_alpaca_distill_using():
    row = Row(
        instruction="Translate to French.", input="Good morning", response=" Bonjour \n", source={}
    )
    req = build_request(row, "general")
    assert req.messages == (
        ("system", GENERAL_SYSTEM),
        (
            "user",
            "### Instruction:\nTranslate to French.\n\nGood morning\n\n"
            "### Reference Answer:\nBonjour\n\n### Response:\n",
        ),
    )
    assert req.prefill == ""


def test_math_request_prefills_the_assistant_turn():
    req = build_request(GSM, "math")
    assert req.messages == (
        ("system", MATH_SYSTEM),
        ("user", f"{GSM.instruction}\n\n{GSM.response}"),
    )
    assert req.prefill == "Great! Let's think step by step. "


def test_auto_picks_math_for_gsm8k_rows(gsm8k_file, alpaca_file):
    assert all(resolve_template(r, "auto") == "math" for r in read_dataset(gsm8k_file))
    assert all(resolve_template(r, "auto") == "general" for r in read_dataset(alpaca_file))
    assert build_request(read_dataset(gsm8k_file)[0], "auto").prefill == MATH_PREFILL
    assert build_request(ALPACA, "auto").prefill == ""
    assert resolve_template(GSM, "general") == "general"  # an explicit choice wins


def test_chat_row_keeps_history_and_its_system_prompt():
    row = Row(
        instruction="And in French?",
        response="Bonjour",
        system="Be brief.",
        history=(("user", "Say hello"), ("assistant", "Hello")),
        source={},
    )
    roles = [r for r, _ in build_request(row, "general").messages]
    assert roles == ["system", "user", "assistant", "user"]
    system = build_request(row, "general").messages[0][1]
    assert system.startswith(GENERAL_SYSTEM) and system.endswith("Be brief.")


def test_good_rewrite_is_kept():
    assert judge(ALPACA, "general", gen("  Rome is the capital of Italy.\n")) == (
        "Rome is the capital of Italy.",
        True,
        "ok",
    )


@pytest.mark.parametrize(
    "text",
    [
        "### Response:\nRome.",
        "### Response: Rome.",
        "Response:\nRome.",
        "### Response:\n### Response:\nRome.",
    ],
)
def test_leading_response_marker_is_stripped(text):
    assert judge(ALPACA, "general", gen(text)) == ("Rome.", True, "ok")


@pytest.mark.parametrize("phrase", LEAK_PHRASES)
def test_each_leaked_phrase_falls_back(phrase):
    for text in (f"As the {phrase} says, Rome.", f"Rome. {phrase.upper()}!"):
        assert judge(ALPACA, "general", gen(text)) == (ALPACA.response, False, "leaked_template")


@pytest.mark.parametrize("text", ["Your turn: name a city.", "your turn now. Rome."])
def test_starting_with_your_turn_falls_back(text):
    assert judge(ALPACA, "general", gen(text))[2] == "leaked_template"


def test_your_turn_inside_the_text_is_allowed():
    assert judge(ALPACA, "general", gen("Rome. It is your turn to visit."))[2] == "ok"


@pytest.mark.parametrize(
    "text",
    [
        "### Instruction:\nWhat is the capital of Italy?\n\n### Reference Answer:\nRome.",
        "Rome is the capital.\n\n### Instruction:\nName a river.",
        "Rome.\n\n## Reference Answer: Rome",
        "Rome.\n### Response:\nRome again.",
    ],
)
def test_echoed_template_falls_back(text):
    assert judge(ALPACA, "general", gen(text)) == (ALPACA.response, False, "echoed_template")


@pytest.mark.parametrize("text", ["", "   \n", "### Response:\n  "])
def test_empty_rewrite_falls_back(text):
    assert judge(ALPACA, "general", gen(text)) == (ALPACA.response, False, "empty")


def test_truncated_rewrite_falls_back():
    assert judge(ALPACA, "general", gen("Rome is the", "length"))[1:] == (False, "truncated")


@pytest.mark.parametrize(
    "text",
    [
        "Tom has 3 + 2 = 5 apples.\n#### 5",
        "He has 3 + 2 apples. The answer is 5.",
        "3 plus 2 makes 5",
        "The final answer is: $5.00",
        "#### 5\nThat took 2 steps.",
        "The answer is **5** (from 3 and 2 in 1 step).",
    ],
)
def test_math_answer_that_matches_is_kept(text):
    response, distilled, reason = judge(GSM, "auto", gen(text))
    assert (distilled, reason) == (True, "ok")
    assert response == text.strip()
    assert not response.startswith(MATH_PREFILL.strip())  # SDFT stores the completion only


@pytest.mark.parametrize(
    "text,reason",
    [
        ("3 + 2 = 6\n#### 6", "answer_mismatch"),
        ("The answer is 6.", "answer_mismatch"),
        ("He ends with 5 + 1 = 6", "answer_mismatch"),
        ("He has some apples.", "no_answer"),
    ],
)
def test_math_answer_that_differs_falls_back(text, reason):
    assert judge(GSM, "math", gen(text)) == (GSM.response, False, reason)


def test_math_label_without_a_number_falls_back():
    row = Row(instruction="q", response="no idea", kind="math", source={})
    assert judge(row, "math", gen("The answer is 5."))[2] == "label_unparsed"


def test_general_template_does_not_check_answers():
    assert judge(GSM, "general", gen("The answer is 6."))[2] == "ok"


@pytest.mark.parametrize(
    "text,value",
    [
        ("#### 1,234", "1234"),
        ("The answer is $1,234.", "1234"),
        ("costs $18 in total", "18"),
        ("-3 degrees", "-3"),
        ("#### 7 then The answer is 9", "7"),
        ("The answer is 9, not #### 7", "7"),
        ("0.5 of 10 is 5.0", "5"),
        ("no number", None),
    ],
)
def test_parse_final_answer(text, value):
    got = parse_final_answer(text)
    assert got == (None if value is None else Decimal(value))


def test_clean_rewrite_leaves_ordinary_text_alone():
    assert clean_rewrite("  The response: is fine ") == "The response: is fine"
