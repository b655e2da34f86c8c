"""Distillery core: prune, self-distill, recover and evaluate layer-pruned LLMs.

This package knows nothing of HTTP or queues. Every capability is one ``run_*``
function taking a frozen pydantic spec (see ``service/specs.py``); the CLI
(``service/cli.py``), the RQ workers (``workers/``) and the tests all call them.
"""

__version__ = "0.1.0"
