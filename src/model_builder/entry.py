"""The ``model-builder`` console script: the builder CLI, or one line naming the [builder] extra.

Imports nothing of the builder until it runs, so a device install (no extras) gets a clear
message instead of a traceback; see ``edge_agent.cli.extras``.
"""

from __future__ import annotations

from collections.abc import Callable

from edge_agent.cli.extras import run_role


def _load() -> Callable[[], object]:
    from model_builder.cli import main

    return main


def main() -> None:
    """Run ``model-builder``; exit 9 with one line if the [builder] extra is missing."""
    run_role("model-builder", "builder", _load)
