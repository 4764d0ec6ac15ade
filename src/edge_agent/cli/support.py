"""What every edgefleet CLI shares: the one error boundary, and the exit codes it leaves with.

Each error family maps to a stable exit code so scripts can react without parsing text; the
codes are the ``exit`` column of the one error table (``edge_agent.errors.ERRORS``, extended by
``fleet_server.errors.ERRORS`` and ``model_builder.errors.ERRORS`` for their families):

    0  success
    1  unexpected internal error (a bug: please report it with the traceback from --debug)
    2  usage error (click)
    3  bad input: data, contract, config or bundle file format
    4  untrusted: a signature, expiry, version or compatibility check refused a bundle
    5  accuracy gate failed
    6  key store problem
    7  model or runtime problem (load, quantize, run)
    8  model store problem (disk full, no good version to roll back to, corrupt state)
    9  the command needs an optional extra that is not installed (``edge_agent.cli.extras``)

The boundary prints one line, ``error[<code>]: <message>``, to stderr. This module does not
decide which family gets which code (the table does) nor define the codes: import the
``EXIT_*`` constants from ``edge_agent.errors``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import NoReturn

import click

from edge_agent.bundle import LoadedBundle
from edge_agent.contract import DeviceProfile
from edge_agent.errors import (
    ERRORS,
    EXIT_OK,
    EdgefleetError,
    ErrorTable,
)
from edge_agent.trust import TrustedRoot

__all__ = [
    "echo_verdict",
    "passphrase_from_env",
    "run_cli",
]


def run_cli(
    group: Callable[..., object],
    errors: ErrorTable = ERRORS,
    argv: list[str] | None = None,
) -> NoReturn:
    """Run a click group behind the error boundary and exit with the code ``errors`` gives.

    ``errors``: the package's error table (``edge_agent.errors.ERRORS`` or an extension).
    """
    debug = os.environ.get("EDGEFLEET_DEBUG") == "1"
    try:
        rc = group.main(args=argv, standalone_mode=False)  # type: ignore[attr-defined]
    except click.exceptions.Abort as exc:
        click.echo("aborted", err=True)
        sys.exit(errors.exit_code(exc))  # no row: EXIT_UNEXPECTED
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except EdgefleetError as exc:
        if debug:
            raise
        click.echo(f"error[{exc.code}]: {exc}", err=True)
        sys.exit(errors.exit_code(exc))
    except TimeoutError as exc:
        click.echo(f"error[locked]: {exc}", err=True)
        sys.exit(errors.exit_code(exc))
    except OSError as exc:
        if debug:
            raise
        click.echo(f"error[os]: {exc}", err=True)
        sys.exit(errors.exit_code(exc))
    sys.exit(rc if isinstance(rc, int) else EXIT_OK)


def passphrase_from_env(var: str = "EDGEFLEET_KEY_PASSPHRASE") -> bytes | None:
    """The key-store passphrase from the environment (read once, at the CLI boundary)."""
    value = os.environ.get(var)
    return value.encode() if value else None


def echo_verdict(
    loaded: LoadedBundle, root: TrustedRoot, device: DeviceProfile | None, as_json: bool
) -> None:
    """Print what ``verify`` concluded about a bundle (one line, or JSON with ``--json``)."""
    m = loaded.manifest
    verdict: dict[str, object] = {
        "trusted": True,
        "name": m.name,
        "version": m.version,
        "channel": m.channel,
        "signed_by": list(loaded.verified.signed_by),
        "expires": loaded.verified.expires.isoformat(),
        "root_version": root.version,
        "device": None
        if device is None
        else {"arch": device.arch, "runtimes": dict(device.runtimes)},
    }
    if as_json:
        click.echo(json.dumps(verdict, indent=2))
        return
    click.echo(
        f"trusted: {m.name} v{m.version} ({m.channel}), signed by "
        f"{len(loaded.verified.signed_by)} targets key(s) under root v{root.version}, "
        f"expires {verdict['expires']}"
    )
