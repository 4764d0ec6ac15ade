"""``fleet-server capture enable|disable|collect|export|status`` and ``fleet-server datasets
list|show|export|register-evalset``: data for the next model, through the admin API.

``capture enable MODEL --group G`` (or ``--device ID`` repeated) saves the model's upload
policy and sends it, signed, to every device of the cohort; ``collect MODEL`` asks each of them
for its next chunk; ``export MODEL --since 24h`` writes every row captured in a time range,
over all the model's datasets, as one training file; ``status`` shows the policies and each
device's upload state. Datasets are
the chunks the server accepted, by digest: ``export`` writes the flat training ``.npz``
or Parquet file (``--format parquet``), ``register-evalset`` turns
the labelled rows into an evaluation set of the model. Text that came from devices is printed
escaped. Errors are ``AdminApiError``s for the CLI's error boundary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from fleet_server.admin.client import AdminClient
from fleet_server.cli.admin import admin_options, echo_table, emit_json, json_option, shown

__all__ = ["register_capture_commands"]


def _sent(data: dict[str, Any], what: str) -> None:
    commands = data.get("commands") or []
    click.echo(f"{what}: {len(commands)} device(s) sent a signed command")
    for device, why in sorted((data.get("errors") or {}).items()):
        click.echo(f"  {shown(device, 64)}: not sent: {shown(why, 200)}")


def _ttl(func: Any) -> Any:
    return click.option(
        "--ttl", default=3600, show_default=True, help="Seconds each command stays valid."
    )(func)


_format_option = click.option(
    "--format",
    "fmt",
    type=click.Choice(["npz", "parquet"]),
    default="npz",
    show_default=True,
    help="npz, or Parquet (the same columns; a tensor row is a fixed-size list, its shape "
    "in the field's row_shape metadata).",
)


def register_capture_commands(cli: click.Group) -> None:
    """Add the ``capture`` and ``datasets`` groups to ``cli``."""

    @cli.group("capture")
    def capture() -> None:
        """Upload of captured records per model and cohort (opt-in)."""

    @capture.command("enable")
    @admin_options
    @json_option
    @_ttl
    @click.option("--group", default=None, help="The cohort: every active device of a group.")
    @click.option("--device", "devices", multiple=True, help="The cohort: these devices.")
    @click.option(
        "--sample-rate",
        type=click.FloatRange(0.0, 1.0),
        default=1.0,
        show_default=True,
        help="Share of captured records uploaded.",
    )
    @click.option("--bytes-per-day", type=int, default=16 * 1024 * 1024, show_default=True)
    @click.option("--chunk-bytes", type=int, default=1024 * 1024, show_default=True)
    @click.option(
        "--drop",
        multiple=True,
        help="A field to drop on the device: inputs, outputs, labels, metadata, "
        "input:<name>, output:<name>, feature:<index>.",
    )
    @click.argument("model")
    def enable(
        url: str,
        token: str,
        as_json: bool,
        ttl: int,
        group: str | None,
        devices: tuple[str, ...],
        sample_rate: float,
        bytes_per_day: int,
        chunk_bytes: int,
        drop: tuple[str, ...],
        model: str,
    ) -> None:
        """Turn on upload of MODEL's captured records for a cohort."""
        if (group is None) == (not devices):
            raise click.UsageError("give --group or --device (not both)")
        selector: dict[str, Any] = {"group": group} if group else {"devices": list(devices)}
        body = {
            "selector": selector,
            "sample_ppm": round(sample_rate * 1_000_000),
            "bytes_per_day": bytes_per_day,
            "chunk_bytes": chunk_bytes,
            "drop": list(drop),
            "ttl_seconds": ttl,
        }
        with AdminClient(url, token) as client:
            data = client.capture_action(model, "enable", body)
        if as_json:
            emit_json(data)
            return
        _sent(data, f"capture upload of {shown(model, 64)} enabled")

    @capture.command("disable")
    @admin_options
    @json_option
    @_ttl
    @click.argument("model")
    def disable(url: str, token: str, as_json: bool, ttl: int, model: str) -> None:
        """Turn off upload of MODEL's captured records on its cohort."""
        with AdminClient(url, token) as client:
            data = client.capture_action(model, "disable", {"ttl_seconds": ttl})
        if as_json:
            emit_json(data)
            return
        _sent(data, f"capture upload of {shown(model, 64)} disabled")

    @capture.command("collect")
    @admin_options
    @json_option
    @_ttl
    @click.argument("model")
    def collect(url: str, token: str, as_json: bool, ttl: int, model: str) -> None:
        """Ask every device of MODEL's cohort for its next chunk."""
        with AdminClient(url, token) as client:
            data = client.capture_action(model, "collect", {"ttl_seconds": ttl})
        if as_json:
            emit_json(data)
            return
        _sent(data, f"collecting {shown(model, 64)}")

    @capture.command("export")
    @admin_options
    @_format_option
    @click.option(
        "--since",
        default=None,
        help="Rows captured since: Unix seconds, ISO-8601 or relative (24h, 7d); default the 7 "
        "days up to --until.",
    )
    @click.option("--until", default=None, help="Rows captured until (default: now).")
    @click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
    @click.argument("model")
    def export_model(
        url: str,
        token: str,
        fmt: str,
        since: str | None,
        until: str | None,
        output: Path,
        model: str,
    ) -> None:
        """Write every captured row of MODEL in a time range, over all its datasets, as one
        training file (the columns of `datasets export`)."""
        with AdminClient(url, token) as client, output.open("wb") as out:
            written = client.capture_export(model, out, fmt, since, until)
        click.echo(f"wrote {written} bytes to {output}")

    @capture.command("status")
    @admin_options
    @json_option
    @click.argument("model", required=False)
    def status(url: str, token: str, as_json: bool, model: str | None) -> None:
        """Policies and each device's upload state."""
        with AdminClient(url, token) as client:
            data = client.capture_status(model)
        if as_json:
            emit_json(data)
            return
        rows = []
        for p in data.get("policies", []):
            state = "on" if p["enabled"] else "off"
            for d in p.get("devices") or [{}]:
                counts = d.get("device_counts") or {}
                rows.append(
                    (
                        shown(p["model"], 32),
                        state,
                        shown(d.get("device_id", "-"), 40),
                        d.get("chunks", 0),
                        d.get("records", 0),
                        d.get("refused_chunks", 0),
                        d.get("refused_records", 0),
                        shown(" ".join(f"{k}={v}" for k, v in sorted(counts.items())), 60),
                    )
                )
        echo_table(
            rows,
            ("MODEL", "UPLOAD", "DEVICE", "CHUNKS", "RECORDS", "REFUSED", "BAD RECS", "DEVICE"),
        )

    @cli.group("datasets")
    def datasets() -> None:
        """Datasets built from uploaded captures, by digest."""

    @datasets.command("list")
    @admin_options
    @json_option
    @click.option("--model", default=None)
    @click.option("--limit", type=click.IntRange(1, 1000), default=200, show_default=True)
    def list_datasets(url: str, token: str, as_json: bool, model: str | None, limit: int) -> None:
        """List datasets, newest first."""
        with AdminClient(url, token) as client:
            rows = client.datasets(model, limit)
        if as_json:
            emit_json(rows)
            return
        echo_table(
            [
                (
                    r["sha256"][:12],
                    shown(r["model"], 32),
                    r["records"],
                    r["rows"],
                    r["labelled_rows"],
                    shown(",".join(r["provenance"].get("devices", [])), 40),
                    str(r["created_at"])[:19],
                )
                for r in rows
            ],
            ("SHA256", "MODEL", "RECORDS", "ROWS", "LABELLED", "DEVICES", "CREATED"),
        )

    @datasets.command("show")
    @admin_options
    @click.argument("sha256")
    def show(url: str, token: str, sha256: str) -> None:
        """Show a dataset with its provenance (JSON; device text stays JSON-escaped)."""
        with AdminClient(url, token) as client:
            emit_json(client.dataset(sha256.lower()))

    @datasets.command("export")
    @admin_options
    @_format_option
    @click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
    @click.argument("sha256")
    def export(url: str, token: str, fmt: str, output: Path, sha256: str) -> None:
        """Write a dataset for training (one row per request row), as npz or Parquet."""
        with AdminClient(url, token) as client, output.open("wb") as out:
            written = client.dataset_export(sha256.lower(), out, fmt)
        click.echo(f"wrote {written} bytes to {output}")

    @datasets.command("register-evalset")
    @admin_options
    @json_option
    @click.option("--input", "input_name", default=None, help="The input (if several).")
    @click.option("--note", default="", help="Anything the next operator should know.")
    @click.argument("sha256")
    def register(
        url: str, token: str, as_json: bool, input_name: str | None, note: str, sha256: str
    ) -> None:
        """Register a dataset's labelled rows as an evaluation set of its model."""
        with AdminClient(url, token) as client:
            data = client.register_dataset_evalset(sha256.lower(), input_name, note)
        if as_json:
            emit_json(data)
            return
        r = data["evalset"]
        click.echo(
            f"evaluation set {r['sha256']} for {shown(r['model'], 32)}: "
            f"{r['samples']} samples, {r['classes']} classes"
        )
