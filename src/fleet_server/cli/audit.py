"""``fleet-server audit`` commands: list and export the admin API's audit log.

``audit list [--since T] [--until T] [--actor A] [--action A] [--object O] [--limit N]
[--after-id N] [--json]`` prints entries, newest first (with ``--after-id``: the entries after
that id, oldest first, for paging). ``audit export --format csv|json [--output FILE]`` streams
every matching entry, oldest first, to FILE (written to a temporary file beside it and renamed
when complete) or to stdout. Text that came from requests is shown escaped in tables; the CSV
is escaped by the server against formula injection. Errors are ``AdminApiError``s for the CLI's
error boundary.
"""

from __future__ import annotations

import os
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from fleet_server.admin.client import AdminClient
from fleet_server.cli.admin import admin_options, echo_table, emit_json, json_option, shown

__all__ = ["register_audit_commands"]

_HEADERS = ("ID", "AT", "PHASE", "ACTOR", "CLIENT", "ACTION", "OBJECT", "STATUS", "CODE")


def _row(e: dict[str, Any]) -> tuple[Any, ...]:
    return (
        e["id"],
        str(e["at"])[:19],
        e["phase"],
        shown(e["actor"], 24),
        shown(e["client"], 40),
        shown(e["action"], 48),
        shown(e["object"], 48),
        e["status"],
        shown(e["code"], 24) or None,
    )


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    # click's DateTime gives naive values: they are meant as UTC.
    return value.isoformat() if value.tzinfo else value.isoformat() + "+00:00"


_TIME = click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"])


def _filters(func: Any) -> Any:
    for option in (
        click.option("--since", type=_TIME, default=None, help="Entries at or after (UTC)."),
        click.option("--until", type=_TIME, default=None, help="Entries before (UTC)."),
        click.option("--actor", default=None, help="Only this actor (e.g. token:alice)."),
        click.option("--action", default=None, help="Only this action (e.g. 'POST /v1/assign')."),
        click.option("--object", "obj", default=None, help="Only this object (e.g. device:cam-1)."),
    ):
        func = option(func)
    return func


def register_audit_commands(cli: click.Group) -> None:
    """Add the ``audit`` group to ``cli``."""

    @cli.group("audit")
    def audit() -> None:
        """The audit log of every state-changing admin action (append-only)."""

    @audit.command("list")
    @admin_options
    @json_option
    @_filters
    @click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
    @click.option("--after-id", type=click.IntRange(0), default=None, help="Page forward.")
    def list_entries(
        url: str,
        token: str,
        as_json: bool,
        since: datetime | None,
        until: datetime | None,
        actor: str | None,
        action: str | None,
        obj: str | None,
        limit: int,
        after_id: int | None,
    ) -> None:
        """List audit entries, newest first (--after-id: the ones after it, oldest first)."""
        with AdminClient(url, token) as client:
            rows = client.audit(
                since=_iso(since),
                until=_iso(until),
                actor=actor,
                action=action,
                object=obj,
                limit=limit,
                after_id=after_id,
            )
        if as_json:
            emit_json(rows)
            return
        echo_table([_row(e) for e in rows], _HEADERS)

    @audit.command("export")
    @admin_options
    @_filters
    @click.option("--format", "fmt", type=click.Choice(["csv", "json"]), required=True)
    @click.option(
        "--output",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Write to FILE (complete or not at all) instead of stdout.",
    )
    def export(
        url: str,
        token: str,
        since: datetime | None,
        until: datetime | None,
        actor: str | None,
        action: str | None,
        obj: str | None,
        fmt: str,
        output: Path | None,
    ) -> None:
        """Export every matching entry, oldest first, as CSV or JSON."""
        filters = {
            "since": _iso(since),
            "until": _iso(until),
            "actor": actor,
            "action": action,
            "object": obj,
        }
        with AdminClient(url, token) as client:
            if output is None:
                client.audit_export(fmt, sys.stdout.buffer, **filters)
                return
            target = output.resolve()
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    n = client.audit_export(fmt, fh, **filters)
                    fh.flush()
                    os.fsync(fh.fileno())
                Path(tmp).replace(target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        click.echo(f"wrote {n} bytes to {output}", err=True)
