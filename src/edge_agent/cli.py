"""``edge-agent``: the device command line.

The daemon, model store and local API commands arrive with the agent; today the device can check
a bundle exactly as it will before installing it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import click

from edge_agent import __version__
from edge_agent.bundle import read_bundle
from edge_agent.cli_support import run_cli
from edge_agent.device import detect_device_profile
from edge_agent.trust import TrustedRoot


@click.group()
@click.version_option(__version__, prog_name="edge-agent")
def cli() -> None:
    """edgefleet device agent."""


@cli.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--root",
    "root_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The root metadata this device was provisioned with.",
)
@click.option(
    "--root-update",
    "updates",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Newer root versions to walk, in order (repeatable).",
)
@click.option(
    "--installed-version",
    type=int,
    default=None,
    help="Version of this model already installed (rollback check).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
def verify(
    bundle: Path,
    root_path: Path,
    updates: tuple[Path, ...],
    installed_version: int | None,
    as_json: bool,
) -> None:
    """Verify BUNDLE as this device would before installing it."""
    root = TrustedRoot.from_chain(root_path.read_bytes(), [p.read_bytes() for p in updates])
    device = detect_device_profile()
    loaded = read_bundle(
        bundle, root, now=datetime.now(UTC), installed_version=installed_version, device=device
    )
    m = loaded.manifest
    verdict = {
        "trusted": True,
        "name": m.name,
        "version": m.version,
        "channel": m.channel,
        "signed_by": list(loaded.verified.signed_by),
        "expires": loaded.verified.expires.isoformat(),
        "root_version": root.version,
        "device": {"arch": device.arch, "runtimes": dict(device.runtimes)},
    }
    if as_json:
        click.echo(json.dumps(verdict, indent=2))
    else:
        click.echo(
            f"trusted: {m.name} v{m.version} ({m.channel}), signed by "
            f"{len(loaded.verified.signed_by)} key(s), expires {verdict['expires']}"
        )


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: the CLI behind the error boundary."""
    run_cli(cli, argv=argv)
