"""``fleet-server devices ping|logs|support-bundle|restart|health-check|commands``: remote
diagnostics through a running server's admin API.

Each command asks the server to sign and send one command (to DEVICE_ID, or with ``--group`` to
every active device of a group), then waits up to ``--timeout`` seconds for the answer (polling
``GET /v1/commands/{id}``; ``--no-wait`` returns at once). A device that is offline gets the
command when it reconnects, until the command expires (``--ttl``); ``devices commands`` shows
what is pending, answered, refused or expired. ``support-bundle`` waits for the upload and
writes the verified tar.gz to ``--output``. Device-supplied text is printed with control
characters escaped.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final

import click

from edge_agent.trust.command import LOG_LEVELS
from fleet_server.admin.client import AdminClient
from fleet_server.cli.admin import admin_options, echo_table, emit_json, json_option

__all__ = ["register_diagnostics_commands"]

_FINAL: Final = frozenset({"answered", "refused", "expired", "uploaded", "upload_failed"})
_POLL_SECONDS: Final = 0.5


def safe(text: object, limit: int = 2000) -> str:
    """``text`` cut to ``limit`` characters with every non-printable character escaped."""
    s = str(text)[:limit]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def _wait(client: AdminClient, command_id: str, timeout: float, states: frozenset[str]) -> Any:
    deadline = time.monotonic() + timeout
    record = client.command(command_id)
    while record["state"] not in states and time.monotonic() < deadline:
        time.sleep(_POLL_SECONDS)
        record = client.command(command_id)
    return record


def _describe(record: dict[str, Any]) -> str:
    state = record["state"]
    answer = record.get("answer") or {}
    if state == "refused":
        error = answer.get("error") or {}
        return f"refused: {safe(error.get('code'))}: {safe(error.get('message'))}"
    if state == "pending":
        return "pending (sent; the device runs it when it is connected, until it expires)"
    return str(state)


@dataclass(frozen=True)
class _Target:
    """Where a command goes and how the CLI waits for it: the options every targeted command
    shares, packed once by ``_targeted``."""

    url: str
    token: str
    as_json: bool
    device_id: str | None
    group: str | None
    ttl: int
    wait: bool
    timeout: float

    def run(self, name: str, args: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Issue command ``name`` and wait for its answers; with ``--json`` print them and
        return None (the caller prints nothing more)."""
        if (self.device_id is None) == (self.group is None):
            raise click.UsageError("give a DEVICE_ID or --group")
        with AdminClient(self.url, self.token) as client:
            issued = client.issue_command(
                name, args, device_id=self.device_id, group=self.group, ttl_seconds=self.ttl
            )
            for dev, why in sorted(issued.get("errors", {}).items()):
                click.echo(f"{dev}: not sent: {safe(why)}", err=True)
            records = list(issued["commands"])
            if self.wait:
                deadline = time.monotonic() + self.timeout
                records = [
                    _wait(client, r["id"], max(0.0, deadline - time.monotonic()), _FINAL)
                    for r in records
                ]
        if self.as_json:
            emit_json(records)
            return None
        return records


_TARGET_KEYS: Final = tuple(f.name for f in fields(_Target))


def _targeted(func: Callable[..., None]) -> Callable[..., None]:
    """The admin, ``--json`` and target options (DEVICE_ID or ``--group``, ``--ttl``,
    ``--wait/--no-wait``, ``--timeout``), handed to ``func`` as one ``_Target`` first."""

    @functools.wraps(func)
    def command(**kwargs: Any) -> None:
        target = _Target(**{key: kwargs.pop(key) for key in _TARGET_KEYS})
        func(target, **kwargs)

    wrapped: Callable[..., None] = command
    wrapped = click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait.")(
        wrapped
    )
    wrapped = click.option("--wait/--no-wait", default=True, help="Wait for the answer.")(wrapped)
    wrapped = click.option(
        "--ttl", default=3600, show_default=True, help="Seconds the command stays valid."
    )(wrapped)
    wrapped = click.option("--group", help="Every active device of this group instead.")(wrapped)
    wrapped = click.argument("device_id", required=False)(wrapped)
    return admin_options(json_option(wrapped))


def register_diagnostics_commands(devices: click.Group) -> None:
    """Add the remote diagnostics commands to the ``devices`` group."""

    @devices.command("ping")
    @_targeted
    def ping(target: _Target) -> None:
        """Check that DEVICE_ID (or every device of --group) answers a signed command."""
        records = target.run("ping", {})
        if records is None:
            return
        rows = []
        for r in records:
            result = (r.get("answer") or {}).get("result") or {}
            version = safe(result.get("agent_version", ""), 40) if r["state"] == "answered" else ""
            rows.append((r["device_id"], _describe(r), version, r["id"]))
        echo_table(rows, ("DEVICE", "STATE", "AGENT", "COMMAND"))

    @devices.command("logs")
    @click.option("--level", type=click.Choice(LOG_LEVELS), default="info", show_default=True)
    @click.option("--since", type=int, default=0, help="Only records of the last N seconds.")
    @click.option("--lines", type=int, default=500, show_default=True)
    @click.option("--max-bytes", type=int, default=64 * 1024, show_default=True)
    @_targeted
    def logs(target: _Target, level: str, since: int, lines: int, max_bytes: int) -> None:
        """Recent agent log records of DEVICE_ID at or above --level."""
        args = {
            "level": level,
            "since": int(time.time()) - since if since > 0 else 0,
            "max_lines": lines,
            "max_bytes": max_bytes,
        }
        records = target.run("logs", args)
        for r in records or ():
            if r["state"] != "answered":
                click.echo(f"{r['device_id']}: {_describe(r)}")
                continue
            result = r["answer"]["result"]
            for rec in result.get("records", []):
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(float(rec.get("ts", 0))))
                click.echo(
                    f"{r['device_id']} {stamp} {safe(rec.get('level'), 10):<8} "
                    f"{safe(rec.get('logger'), 128)}: {safe(rec.get('msg'))}"
                )
            if result.get("truncated"):
                click.echo(f"{r['device_id']}: older records left out (--lines/--max-bytes)")

    @devices.command("health-check")
    @click.option("--model", required=True, help="The model whose golden samples to re-run.")
    @_targeted
    def health_check(target: _Target, model: str) -> None:
        """Re-run MODEL's golden samples on DEVICE_ID (the serving version)."""
        for r in target.run("health-check", {"model": model}) or ():
            if r["state"] != "answered":
                click.echo(f"{r['device_id']}: {_describe(r)}")
                continue
            res = r["answer"]["result"]
            verdict = "ok" if res.get("ok") else "FAILED"
            click.echo(
                f"{r['device_id']}: {safe(res.get('model'))} v{res.get('version')} {verdict} "
                f"({res.get('passed')}/{res.get('total')} golden samples)"
            )
            for failure in res.get("failures", []):
                click.echo(f"  {safe(failure, 200)}")

    @devices.command("restart")
    @_targeted
    def restart(target: _Target) -> None:
        """Restart the agent on DEVICE_ID: it drains like on SIGTERM and exits 75, and its
        service manager starts it again."""
        for r in target.run("restart", {}) or ():
            click.echo(f"{r['device_id']}: {_describe(r)}")

    @devices.command("support-bundle")
    @admin_options
    @json_option
    @click.argument("device_id")
    @click.option(
        "--output",
        "-o",
        required=True,
        type=click.Path(dir_okay=False, path_type=Path),
        help="Where to write the tar.gz.",
    )
    @click.option("--max-bytes", type=int, default=4 * 1024 * 1024, show_default=True)
    @click.option("--ttl", default=3600, show_default=True, help="Seconds the command is valid.")
    @click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait.")
    def support_bundle(
        url: str,
        token: str,
        as_json: bool,
        device_id: str,
        output: Path,
        max_bytes: int,
        ttl: int,
        timeout: float,
    ) -> None:
        """Have DEVICE_ID build a support bundle (logs, status, store state, redacted config,
        recent events), pull it in blocks, and write the verified tar.gz to --output."""
        with AdminClient(url, token) as client:
            issued = client.issue_command(
                "support-bundle", {"max_bytes": max_bytes}, device_id=device_id, ttl_seconds=ttl
            )
            (record,) = issued["commands"]
            record = _wait(client, record["id"], timeout, frozenset(_FINAL - {"answered"}))
            if record["state"] == "uploaded":
                with output.open("wb") as out:
                    written = client.support_bundle(device_id, record["id"], out)
        if as_json:
            emit_json(record)
            return
        if record["state"] != "uploaded":
            detail = (record.get("upload") or {}).get("error", "")
            click.echo(f"{device_id}: {_describe(record)} {safe(detail)}".rstrip())
            raise SystemExit(1)
        click.echo(
            f"{device_id}: support bundle written to {output} ({written} bytes, SHA-256 "
            f"{record['upload']['sha256']})"
        )

    @devices.command("commands")
    @admin_options
    @json_option
    @click.argument("device_id")
    @click.option("--limit", type=int, default=20, show_default=True)
    def commands(url: str, token: str, as_json: bool, device_id: str, limit: int) -> None:
        """DEVICE_ID's recent commands: pending, answered, refused, expired, uploads."""
        with AdminClient(url, token) as client:
            records = client.device_commands(device_id, limit)
        if as_json:
            emit_json(records)
            return
        rows = [
            (
                r["sequence"],
                r["name"],
                _describe(r),
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["issued"])),
                r["id"],
            )
            for r in records
        ]
        echo_table(rows, ("SEQ", "COMMAND", "STATE", "ISSUED", "ID"))
