"""The ``distillery`` command line for the core pipeline.

    distillery prune --model builtin:smollm2-135m-instruct --calibration data.jsonl --blocks 6 --out pruned/
    distillery distill --teacher builtin:smollm2-135m-instruct --dataset data.jsonl --out distilled.jsonl
    distillery finetune --model pruned/ --dataset distilled.jsonl --out recovered/
    distillery evaluate --model recovered/ --baseline builtin:smollm2-135m-instruct --tasks arc_easy,piqa --out eval.json
    distillery run --dataset data.jsonl --out runs/demo      # the whole pipeline
    distillery report runs/demo                              # report.md + report.html

Options are generated from the spec models in ``service/specs.py`` so the CLI help, the
API docs and the code share one description per field. Service commands (``up``,
``worker``, ``jobs``, ``datasets``) are added by ``api/cli.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from service.errors import DistilleryError
from service.progress import ConsoleReporter
from service.specs import (
    DistillSpec,
    EvaluateSpec,
    FinetuneSpec,
    MergeSpec,
    PipelineSpec,
    PruneSpec,
)


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional) for ``X | None``; Annotated is peeled."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        inner, _ = _unwrap(args[0])
        return inner, True
    return annotation, False


def add_spec_options(parser: argparse.ArgumentParser, spec_cls: type[BaseModel]) -> None:
    """One ``--option`` per spec field; lists are comma-separated."""
    for name, field in spec_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        inner, _ = _unwrap(field.annotation)
        kwargs: dict[str, Any] = {"dest": name, "help": field.description or ""}
        origin = typing.get_origin(inner)
        if origin is list:
            item, _ = _unwrap(typing.get_args(inner)[0])
            choices = typing.get_args(item) if typing.get_origin(item) is Literal else None
            if field.annotation and name == "models":
                kwargs.update(nargs="+")
            else:
                kwargs.update(type=lambda s: [x.strip() for x in s.split(",") if x.strip()])
            if choices:
                kwargs["help"] += f" (any of {','.join(choices)})"
        elif origin is Literal:
            kwargs["choices"] = typing.get_args(inner)
        elif inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif inner in (int, float):
            kwargs["type"] = inner
        if field.is_required():
            kwargs["required"] = True
        else:
            kwargs["default"] = argparse.SUPPRESS  # the spec's own default applies
            default = field.get_default(call_default_factory=True)
            if default is not None:
                shown = ",".join(map(str, default)) if isinstance(default, list) else default
                kwargs["help"] += f" [default: {shown}]"
        parser.add_argument(flag, **kwargs)


def spec_from_args(spec_cls: type[BaseModel], args: argparse.Namespace) -> Any:
    values = {k: getattr(args, k) for k in spec_cls.model_fields if hasattr(args, k)}
    return spec_cls(**values)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _cmd_prune(args: argparse.Namespace) -> Any:
    from service.prune import run_prune

    return run_prune(spec_from_args(PruneSpec, args), Path(args.out), ConsoleReporter("prune"))


def _cmd_distill(args: argparse.Namespace) -> Any:
    from service.distill import run_distill

    return run_distill(
        spec_from_args(DistillSpec, args), Path(args.out), ConsoleReporter("distill")
    )


def _cmd_finetune(args: argparse.Namespace) -> Any:
    from service.finetune import run_finetune

    spec = spec_from_args(FinetuneSpec, args)
    return run_finetune(spec, Path(args.out), ConsoleReporter("finetune"), resume=args.resume)


def _cmd_evaluate(args: argparse.Namespace) -> Any:
    from service.evaluate import run_evaluate

    spec = spec_from_args(EvaluateSpec, args)
    data_dir = Path(args.data_dir) if args.data_dir else None
    return run_evaluate(spec, Path(args.out), ConsoleReporter("evaluate"), data_dir=data_dir)


def _cmd_merge(args: argparse.Namespace) -> Any:
    from service.merge import run_merge

    return run_merge(spec_from_args(MergeSpec, args), Path(args.out), ConsoleReporter("merge"))


def _cmd_report(args: argparse.Namespace) -> Any:
    from service.report import run_report

    return run_report(Path(args.run_dir))


def _cmd_run(args: argparse.Namespace) -> Any:
    from service.pipeline import print_table, run_pipeline

    spec = spec_from_args(PipelineSpec, args)
    data_dir = Path(args.data_dir) if args.data_dir else None
    result = run_pipeline(spec, Path(args.out), ConsoleReporter("pipeline"), data_dir=data_dir)
    print_table(result)
    return None


COMMANDS: dict[str, tuple[str, type[BaseModel] | None, Callable[[argparse.Namespace], Any]]] = {
    "prune": ("Score decoder blocks and drop the most redundant ones.", PruneSpec, _cmd_prune),
    "distill": (
        "Have the teacher rewrite a dataset's responses (SDFT).",
        DistillSpec,
        _cmd_distill,
    ),
    "finetune": ("LoRA fine-tune and merge the adapter.", FinetuneSpec, _cmd_finetune),
    "evaluate": ("Accuracy on local tasks via lm-evaluation-harness.", EvaluateSpec, _cmd_evaluate),
    "merge": ("SLERP-merge two models of the same shape.", MergeSpec, _cmd_merge),
    "run": ("The whole pipeline: prune, distill, finetune, evaluate.", PipelineSpec, _cmd_run),
    "report": ("Write report.md and report.html for a run directory.", None, _cmd_report),
}


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(prog="distillery", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, spec_cls, func) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if spec_cls is not None:
            add_spec_options(p, spec_cls)
        if name == "report":  # reads and writes inside the run directory: no --out
            p.add_argument("run_dir", help="Run directory (the --out of `distillery run`).")
        else:
            p.add_argument("--out", required=True, help="Where to write the result.")
        if name == "finetune":
            p.add_argument(
                "--resume",
                action="store_true",
                help="Continue from the checkpoint <out>.ckpt that an interrupted run left.",
            )
        if name in ("evaluate", "run"):
            p.add_argument(
                "--data-dir",
                help="Folder of task files (default: DISTILLERY_EVAL_DATA or ../shared/data).",
            )
        p.set_defaults(func=func)
    return parser, sub


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    if parser is None:
        parser, _ = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except ValidationError as exc:
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "spec"
            print(f"error: --{loc.replace('_', '-')}: {err['msg']}", file=sys.stderr)
        return 2
    except DistilleryError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = " with --resume" if getattr(args, "command", "") == "finetune" else ""
        print(f"interrupted; rerun the same command{hint} to resume", file=sys.stderr)
        return 130
    if result is not None:
        _print_json(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
