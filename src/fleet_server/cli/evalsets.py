"""``fleet-server evalsets`` commands: add, list, show labelled evaluation sets.

``evalsets add --model NAME FILE --source TEXT [--note TEXT]`` uploads an ``.npz`` (``x``: float32
raw inputs ``(n, ...)``, ``y``: integer class indices ``(n,)``) to ``fleet-server serve``'s admin
API, which checks it and registers it for the model by its sha256, with its provenance. The
newest set of a model is what ``rollouts create`` compares the candidate with the version it
replaces on. ``list [--model NAME]`` and ``show SHA256`` print the registrations; text that
came from operators or files is shown escaped. Errors are ``AdminApiError``s for the CLI's
error boundary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from fleet_server.admin.client import AdminClient
from fleet_server.cli.admin import admin_options, echo_table, emit_json, json_option, shown

__all__ = ["register_evalset_commands"]


def _row(r: dict[str, Any]) -> tuple[Any, ...]:
    shape = "x".join(str(d) for d in r.get("sample_shape") or []) or "-"
    return (
        str(r["sha256"])[:12],
        shown(r["model"], 32),
        r["samples"],
        r["classes"],
        shape,
        str(r["registered_at"])[:19],
        shown(r["source"], 40),
    )


_HEADERS = ("SHA256", "MODEL", "SAMPLES", "CLASSES", "SHAPE", "REGISTERED", "SOURCE")


def register_evalset_commands(cli: click.Group) -> None:
    """Add the ``evalsets`` group to ``cli``."""

    @cli.group("evalsets")
    def evalsets() -> None:
        """Labelled evaluation sets per model (the offline check before a rollout)."""

    @evalsets.command("add")
    @admin_options
    @json_option
    @click.option("--model", required=True, help="The model name the set is for.")
    @click.option("--source", required=True, help="Where the samples and labels come from.")
    @click.option("--note", default="", help="Anything the next operator should know.")
    @click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    def add(
        url: str, token: str, as_json: bool, model: str, source: str, note: str, file: Path
    ) -> None:
        """Register FILE (.npz with x and y) as an evaluation set of --model."""
        with AdminClient(url, token) as client:
            r = client.add_evalset(file, model, source, note)
        if as_json:
            emit_json(r)
            return
        what = "registered" if r.get("new") else "already registered"
        click.echo(
            f"evaluation set {r['sha256']} {what} for {shown(r['model'], 32)}: "
            f"{r['samples']} samples, {r['classes']} classes"
        )

    @evalsets.command("list")
    @admin_options
    @json_option
    @click.option("--model", default=None, help="Only the sets of this model.")
    def list_sets(url: str, token: str, as_json: bool, model: str | None) -> None:
        """List evaluation sets, newest first (the newest of a model is the one used)."""
        with AdminClient(url, token) as client:
            rows = client.evalsets(model)
        if as_json:
            emit_json(rows)
            return
        echo_table([_row(r) for r in rows], _HEADERS)

    @evalsets.command("show")
    @admin_options
    @json_option
    @click.argument("sha256")
    def show(url: str, token: str, as_json: bool, sha256: str) -> None:
        """Show the registrations of the evaluation set SHA256, with their provenance."""
        with AdminClient(url, token) as client:
            data = client.evalset(sha256.lower())
        if as_json:
            emit_json(data)
            return
        click.echo(f"evaluation set {data['sha256']}")
        for r in data["registrations"]:
            shape = "x".join(str(d) for d in r.get("sample_shape") or [])
            click.echo(f"  model       {shown(r['model'], 128)}")
            click.echo(f"  samples     {r['samples']} of shape ({shape}), {r['classes']} classes")
            click.echo(f"  registered  {r['registered_at']}")
            click.echo(f"  source      {shown(r['source'], 512)}")
            click.echo(f"  note        {shown(r['note'], 1024) or '-'}")
