"""What every edgefleet CLI shares: the exit-code table and the one error boundary.

Each error family maps to a stable exit code so scripts can react without parsing text:

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

The boundary prints one line, ``error[<code>]: <message>``, to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import NoReturn

import click

from edge_agent.bundle import LoadedBundle
from edge_agent.contract import DeviceProfile
from edge_agent.errors import (
    BundleFormatError,
    BundleVerificationError,
    ConfigError,
    ContractError,
    EdgefleetError,
    InputValidationError,
    ModelStoreError,
    RuntimeAdapterError,
)
from edge_agent.trust import TrustedRoot

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_UNTRUSTED = 4
EXIT_GATE = 5
EXIT_KEYS = 6
EXIT_RUNTIME = 7
EXIT_STORE = 8
EXIT_MISSING_EXTRA = 9

BASE_EXIT_CODES: Mapping[type[EdgefleetError], int] = {
    BundleVerificationError: EXIT_UNTRUSTED,
    BundleFormatError: EXIT_BAD_INPUT,
    ContractError: EXIT_BAD_INPUT,
    ConfigError: EXIT_BAD_INPUT,
    InputValidationError: EXIT_BAD_INPUT,
    RuntimeAdapterError: EXIT_RUNTIME,
    ModelStoreError: EXIT_STORE,
}


def exit_code_for(exc: EdgefleetError, table: Mapping[type[EdgefleetError], int]) -> int:
    """The exit code of the most specific family ``exc`` belongs to."""
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    return EXIT_UNEXPECTED


def run_cli(
    group: Callable[..., object],
    extra_codes: Mapping[type[EdgefleetError], int] | None = None,
    argv: list[str] | None = None,
) -> NoReturn:
    """Run a click group behind the error boundary and exit with the mapped code."""
    table = {**BASE_EXIT_CODES, **(extra_codes or {})}
    debug = os.environ.get("EDGEFLEET_DEBUG") == "1"
    try:
        rc = group.main(args=argv, standalone_mode=False)  # type: ignore[attr-defined]
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(EXIT_UNEXPECTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except EdgefleetError as exc:
        if debug:
            raise
        click.echo(f"error[{exc.code}]: {exc}", err=True)
        sys.exit(exit_code_for(exc, table))
    except TimeoutError as exc:
        click.echo(f"error[locked]: {exc}", err=True)
        sys.exit(EXIT_STORE)
    except OSError as exc:
        if debug:
            raise
        click.echo(f"error[os]: {exc}", err=True)
        sys.exit(EXIT_BAD_INPUT)
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
