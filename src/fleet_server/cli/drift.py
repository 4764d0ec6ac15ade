"""``fleet-server drift report``: fleet-wide drift of one model, from the admin API.

Prints, per cohort, the features that drifted (PSI and mean shift against their calibrated
thresholds) and the devices whose own windows drifted; ``--json`` prints the API body. With
``--feature N`` and ``--html``/``--png`` it also writes a chart of that feature's merged
distribution against its baseline per cohort (``fleet_server.drift.report``). Errors are
``AdminApiError``/``FleetDriftError``s for the CLI's error boundary.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edge_agent.common.durable import write_atomic
from fleet_server.admin.client import AdminClient
from fleet_server.cli.admin import admin_options, echo_table, json_option
from fleet_server.drift.report import render_html, render_png

__all__ = ["register_drift_commands"]


def _n(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _rows(report: dict[str, Any]) -> list[tuple[Any, ...]]:
    rows = []
    for c in report["cohorts"]:
        for f in c["features"]:
            if f["drifted"]:
                rows.append((
                    c["cohort"], f"v{c['version']}", f"{c['role']}:{c['tensor']}", f["feature"],
                    f"{_n(f['psi'], '.4f')} / {_n(f['psi_threshold'], '.4f')}",
                    f"{_n(f['mean_shift'], '+.3f')} / {_n(f['mean_shift_threshold'], '.3f')}",
                    ",".join(f["by_test"]), c["devices"], f["n"],
                    "-" if c["bucket"] is None else f"{c['bucket']:.0f}",
                ))  # fmt: skip
    return rows


def register_drift_commands(
    cli: click.Group, client_factory: Callable[[str, str], Any] = AdminClient
) -> None:
    """Add the ``drift`` group to ``cli``; ``client_factory(url, token)`` makes the client."""

    @cli.group("drift")
    def drift() -> None:
        """Fleet-wide drift (tier-A windows merged across devices)."""

    @drift.command("report")
    @admin_options
    @json_option
    @click.argument("model")
    @click.option("--version", "version", type=click.IntRange(0), help="Only this version.")
    @click.option("--by", default=None, help="Cohorts: group, device or tag:KEY.")
    @click.option("--since", default=None, help="Unix s, ISO-8601 or relative (24h, 7d).")
    @click.option("--until", default=None, help="End of the range (same forms).")
    @click.option("--bucket", default=None, help="Time buckets, e.g. 1h (default: one).")
    @click.option("--no-devices", is_flag=True, help="Skip the per-device scoring.")
    @click.option("--feature", type=click.IntRange(0), help="Feature index to chart.")
    @click.option("--tensor", default=None, help="Tensor to chart (default: the first).")
    @click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("--png", "png_out", type=click.Path(dir_okay=False, path_type=Path))
    def drift_report(
        url: str,
        token: str,
        as_json: bool,
        model: str,
        version: int | None,
        by: str | None,
        since: str | None,
        until: str | None,
        bucket: str | None,
        no_devices: bool,
        feature: int | None,
        tensor: str | None,
        html_out: Path | None,
        png_out: Path | None,
    ) -> None:
        """Which features of MODEL drifted, in which cohorts and devices."""
        charting = html_out is not None or png_out is not None
        if charting and feature is None:
            raise click.UsageError("--html/--png need --feature N")
        with client_factory(url, token) as client:
            report = client.drift(
                model, version=version, by=by, since=since, until=until, bucket=bucket,
                views=charting, devices=not no_devices,
            )  # fmt: skip
        if feature is not None and html_out is not None:
            write_atomic(html_out, render_html(report, feature, tensor).encode())
        if feature is not None and png_out is not None:
            write_atomic(png_out, render_png(report, feature, tensor))
        if as_json:
            click.echo(json.dumps(report, indent=2, sort_keys=True))
            return
        cohorts = report["cohorts"]
        click.echo(
            f"{model}: {len(cohorts)} cohort cells (by {report['by']}), "
            f"{report['devices_scored']} devices scored, skipped {report['skipped'] or 'none'}"
        )
        rows = _rows(report)
        if rows:
            echo_table(rows, ("COHORT", "VERSION", "TENSOR", "FEATURE", "PSI / THR",
                               "SHIFT / THR", "TESTS", "DEVICES", "N", "BUCKET"))  # fmt: skip
        else:
            click.echo("no feature drifted")
        for d in report["device_alerts"]:
            click.echo(
                f"device {d['device_id']}: {d['role']}:{d['tensor']} v{d['version']} "
                f"features {d['drifted']}"
            )
        for path in (html_out, png_out):
            if path is not None:
                click.echo(f"wrote {path}")
