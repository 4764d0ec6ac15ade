"""The ``fleet-server`` console script: the server CLI, or one line naming the [server] extra.

Imports nothing of the server until it runs, so a device install (no extras) gets a clear
message instead of a traceback; see ``edge_agent.cli.extras``.
"""

from __future__ import annotations

from collections.abc import Callable

from edge_agent.cli.extras import run_role


def _load() -> Callable[[], object]:
    from fleet_server.cli.main import main

    return main


def main() -> None:
    """Run ``fleet-server``; exit 9 with one line if the [server] extra is missing."""
    run_role("fleet-server", "server", _load)
