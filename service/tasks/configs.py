"""lm-evaluation-harness task configs for the local task files, all in one table.

The files are those of ``../shared/data`` (see its README): mosaicml/llm-foundry's
local eval data (``{"query","choices","gold"}`` multiple choice, winogrande's
``{"context_options","continuation","gold"}``) and openai/grade-school-math
(``{"question","answer"}``). lm-eval reads them through ``dataset_path: json`` with
``data_files``, so the absolute path is only known at run time: ``write_task_configs``
renders each entry below as ``<folder>/distillery_<task>.yaml`` for
``TaskManager(include_path=folder)``.

Each entry cites the lm-eval config it is adapted from (paths inside the installed
``lm_eval/tasks/``). Prompts follow lm-eval where the data allows; the separator
between question and answer follows llm-foundry's ``scripts/eval/yamls/tasks_v0.3.yaml``
(``continuation_delimiter: "\\nAnswer: "`` for arc, piqa and boolq; a plain space for
copa, openbookqa and winogrande), which is the same text lm-eval produces
(``"Question: ...\\nAnswer:"`` + target_delimiter ``" "``). All multiple-choice tasks
are zero-shot, as in lm-eval's defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PREFIX = "distillery_"

MC_METRICS = [
    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
    # acc_norm divides each choice's log-likelihood by its length in characters.
    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
]


def _multiple_choice(doc_to_text: str) -> dict[str, Any]:
    # {"query","choices","gold"}: gold is the index of the right choice.
    return {
        "output_type": "multiple_choice",
        "doc_to_text": doc_to_text,
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": " ",
        "metric_list": MC_METRICS,
    }


# The queries of arc, piqa and boolq already start with "Question: " (boolq: "Passage:
# ...\nQuestion: ...?"); piqa's end in a newline, hence strip().
WITH_ANSWER = "{{query.strip()}}\nAnswer:"

# task -> (data files relative to the data dir: split -> path, lm-eval config fields)
TASKS: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    # lm_eval/tasks/arc/arc_easy.yaml: "Question: {{question}}\nAnswer:", choices.text
    "arc_easy": ({"test": "arc_easy/arc_easy.jsonl"}, _multiple_choice(WITH_ANSWER)),
    # lm_eval/tasks/arc/arc_challenge.yaml (includes arc_easy.yaml)
    "arc_challenge": (
        {"test": "arc_challenge/arc_challenge.jsonl"},
        _multiple_choice(WITH_ANSWER),
    ),
    # lm_eval/tasks/piqa/piqa.yaml: "Question: {{goal}}\nAnswer:", [sol1, sol2]
    "piqa": ({"test": "piqa/piqa.jsonl"}, _multiple_choice(WITH_ANSWER)),
    # lm_eval/tasks/openbookqa/openbookqa.yaml: the bare question_stem, choices.text
    "openbookqa": ({"test": "openbookqa/openbook_qa.jsonl"}, _multiple_choice("{{query}}")),
    # lm_eval/tasks/super_glue/copa/default.yaml: premise + " because"/" therefore", the
    # choice with its first letter lower-cased; the file's query and choices are that.
    "copa": ({"test": "copa/copa.jsonl"}, _multiple_choice("{{query}}")),
    # lm_eval/tasks/super_glue/boolq/default.yaml: "{{passage}}\nQuestion: {{question}}?
    # \nAnswer:", choices ["no", "yes"]
    "boolq": ({"test": "boolq/boolq.jsonl"}, _multiple_choice(WITH_ANSWER)),
    # lm_eval/tasks/winogrande/default.yaml + preprocess_winogrande.py: partial
    # evaluation. doc_to_text returns the gold *index* (lm-eval then treats the task as
    # multiple-input), doc_to_choice the contexts (sentence up to the blank, each option
    # filled in) and doc_to_target the shared continuation, so each choice scores
    # log P(continuation | context_i). Here those are plain fields of the file.
    "winogrande": (
        {"test": "winogrande/winogrande.jsonl"},
        {
            "output_type": "multiple_choice",
            "doc_to_text": "gold",
            "doc_to_choice": "context_options",
            "doc_to_target": "continuation",
            "target_delimiter": " ",
            # The continuation is the same for every choice, so acc_norm equals acc.
            "metric_list": MC_METRICS,
        },
    ),
    # lm_eval/tasks/gsm8k/gsm8k.yaml, unchanged but for the data: 5-shot from the train
    # file (the OpenLLM v1 setting the paper reports), greedy, exact match on the number
    # after "#### " (strict-match) or on the last number in the output (flexible-extract).
    "gsm8k": (
        {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
        {
            "output_type": "generate_until",
            "fewshot_split": "train",
            "num_fewshot": 5,
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_target": "{{answer}}",
            "target_delimiter": " ",
            "metric_list": [
                {
                    "metric": "exact_match",
                    "aggregation": "mean",
                    "higher_is_better": True,
                    "ignore_case": True,
                    "ignore_punctuation": False,
                    "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
                }
            ],
            "generation_kwargs": {
                "until": ["Question:", "</s>", "<|im_end|>"],
                "do_sample": False,
                "temperature": 0.0,
                "max_gen_toks": 256,  # lm-eval's default for generate_until
            },
            "filter_list": [
                {
                    "name": "strict-match",
                    "filter": [
                        {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                        {"function": "take_first"},
                    ],
                },
                {
                    "name": "flexible-extract",
                    "filter": [
                        {
                            "function": "regex",
                            "group_select": -1,
                            "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)",
                        },
                        {"function": "take_first"},
                    ],
                },
            ],
        },
    ),
}

# Which lm-eval result key is each task's main metric ("acc" in our reports).
MAIN_METRIC = {task: ("acc", "none") for task in TASKS} | {"gsm8k": ("exact_match", "strict-match")}


def task_name(task: str) -> str:
    """The lm-eval task name of one of our tasks."""
    return PREFIX + task


def data_files(task: str, data_dir: Path) -> dict[str, Path]:
    """split -> absolute path of the files a task reads."""
    files, _ = TASKS[task]
    return {split: (data_dir / rel).resolve() for split, rel in files.items()}


def task_config(task: str, data_dir: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """The full lm-eval config of one task, reading its files under ``data_dir``."""
    files, fields = TASKS[task]
    kwargs: dict[str, Any] = {
        "data_files": {split: str(p) for split, p in data_files(task, data_dir).items()}
    }
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    return {
        "task": task_name(task),
        "dataset_path": "json",
        "dataset_kwargs": kwargs,
        "test_split": "test",
        **fields,
        "metadata": {"version": 1.0},
    }


def write_task_configs(
    tasks: list[str], data_dir: Path, folder: Path, cache_dir: Path | None = None
) -> dict[str, Path]:
    """Write ``folder/distillery_<task>.yaml`` for each task; return task -> file."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for task in tasks:
        path = folder / f"{task_name(task)}.yaml"
        path.write_text(yaml.safe_dump(task_config(task, data_dir, cache_dir), sort_keys=False))
        written[task] = path
    return written
