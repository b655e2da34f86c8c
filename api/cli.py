"""Entry point of the ``distillery`` command: the core commands of ``service/cli.py``
plus the service commands (added here as they are built)."""

from __future__ import annotations

import sys

from service import cli as core


def main(argv: list[str] | None = None) -> int:
    parser, sub = core.build_parser()
    return core.main(argv, parser=parser)


if __name__ == "__main__":
    sys.exit(main())
