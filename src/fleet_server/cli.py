"""``fleet-server``: the fleet operator's command line (registry, rollouts and serving arrive
with the fleet-server work; this entry point exists so the distribution's three roles install)."""

from __future__ import annotations

import click

from edge_agent import __version__
from edge_agent.cli_support import run_cli


@click.group()
@click.version_option(__version__, prog_name="fleet-server")
def cli() -> None:
    """edgefleet fleet server."""


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: the CLI behind the error boundary."""
    run_cli(cli, argv=argv)
