"""``fleet-server root`` commands: show the fleet's root, rotate it with signed new versions.

They talk to ``fleet-server serve``'s admin API (``--url``/``--token`` like every admin command).
``rotate`` takes the root version files ``model-builder keys rotate`` writes
(``<keystore>/roots/<N>.root.json``): the server checks them exactly as a device will, stores
them, verifies bundles with the newest from then on, and sends every device a new desired state
carrying the chain. Errors are ``AdminApiError``s for the CLI's error boundary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edge_agent.strict_json import loads as strict_loads
from edge_agent.trust.root import MAX_METADATA_BYTES
from fleet_server.admin.client import AdminClient
from fleet_server.cli.admin import admin_options, emit_json, json_option
from fleet_server.errors import ServerConfigError

__all__ = ["register_root_commands"]


def _read(path: Path) -> Any:
    """A root metadata file as a JSON value (the server judges it).

    Raises:
        ServerConfigError: unreadable or not JSON.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ServerConfigError(f"cannot read root file {path.name}: {exc.strerror}") from exc
    return strict_loads(
        data, max_bytes=MAX_METADATA_BYTES, what=f"root file {path.name}", error=ServerConfigError
    )


def register_root_commands(cli: click.Group) -> None:
    """Add the ``root`` group to the ``fleet-server`` group."""

    @cli.group()
    def root() -> None:
        """The fleet's root of trust: show it, rotate it (e.g. revoke a stolen builder key)."""

    @root.command("show")
    @admin_options
    @json_option
    def root_show(url: str, token: str, as_json: bool) -> None:
        """The current root: version, expiry, the chain shipped to devices, keys per role."""
        with AdminClient(url, token) as client:
            r = client.root()
        if as_json:
            emit_json(r)
            return
        chain = ", ".join(f"v{v}" for v in r.get("chain", [])) or "none"
        click.echo(f"root v{r['version']}, expires {r['expires']}; chain shipped: {chain}")
        for role, d in sorted(r.get("roles", {}).items()):
            ids = ", ".join(k[:16] for k in d.get("keyids", []))
            click.echo(f"  {role:<10} threshold {d.get('threshold')}: {ids}")

    @root.command("rotate")
    @admin_options
    @json_option
    @click.argument(
        "files",
        nargs=-1,
        required=True,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
    )
    def root_rotate(url: str, token: str, as_json: bool, files: tuple[Path, ...]) -> None:
        """Rotate the fleet to the root versions FILES (in version order) and ship them."""
        roots = [_read(p) for p in files]
        with AdminClient(url, token) as client:
            r = client.rotate_root(roots)
        if as_json:
            emit_json(r)
            return
        devices = r.get("devices", [])
        published = sum(1 for d in devices if d.get("published"))
        if r.get("previous") == r.get("version"):
            click.echo(f"root stays v{r['version']} (nothing newer in the files)")
        else:
            click.echo(
                f"root v{r.get('previous')} -> v{r['version']}; new desired state for "
                f"{len(devices)} device(s), {published} published now (the rest on reconnect)"
            )
