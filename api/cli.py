"""Entry point of the ``distillery`` command: the core commands of ``service/cli.py``
(prune, distill, finetune, evaluate, merge, run) plus the service commands of
``api/commands.py`` (up, worker, jobs, datasets, keys)."""

from __future__ import annotations

import sys

from service import cli as core


def main(argv: list[str] | None = None) -> int:
    from api.commands import add_commands

    parser, sub = core.build_parser()
    add_commands(sub)
    args = parser.parse_args(argv)
    if not getattr(args, "service", False):
        return core.main(argv, parser=parser)
    from api.client import ApiError

    try:
        return args.func(args)
    except ApiError as exc:
        print(f"error: {exc.status} {exc.code}: {exc.message}", file=sys.stderr)
        if exc.details:
            for d in exc.details if isinstance(exc.details, list) else [exc.details]:
                print(f"  {d}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as exc:  # connection refused, file not found
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
