"""``fleet-server`` commands for labels, label groups and maintenance windows.

``devices label DEVICE_ID KEY=VALUE... [--remove KEY]...`` sets and removes the operator's
labels of a device; ``devices labels DEVICE_ID`` shows them apart from the device's own and the
merge a selector sees. ``label-groups define NAME SELECTOR | list | show NAME | delete NAME``
manage named selectors; ``windows set NAME --selector S --days mon,tue --start HH:MM
--duration MINUTES --timezone ZONE | list | delete NAME`` the maintenance windows. Every command
calls ``fleet-server serve``'s admin API; device-supplied text is shown escaped. Errors are
``AdminApiError``s for the CLI's error boundary.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import click

from fleet_server.admin.client import AdminClient
from fleet_server.cli.admin import admin_options, echo_table, emit_json, json_option, shown

__all__ = ["register_label_commands"]


def _pairs(items: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="LABELS")
        out[key] = value
    return out


def _labels_lines(data: dict[str, Any]) -> list[str]:
    lines = [f"device {shown(data['device_id'], 128)}"]
    for title, key in (("operator", "operator"), ("device", "device"), ("effective", "effective")):
        labels = data.get(key) or {}
        text = ", ".join(f"{shown(k, 80)}={shown(v, 80)}" for k, v in sorted(labels.items()))
        lines.append(f"  {title:<10} {text or '-'}")
    if data.get("refused"):
        lines.append(f"  refused    {int(data['refused'])} reported label(s) were invalid")
    return lines


def register_label_commands(cli: click.Group, devices: click.Group) -> None:
    """Add ``devices label|labels``, ``label-groups`` and ``windows`` to ``cli``."""

    @devices.command("label")
    @admin_options
    @json_option
    @click.argument("device_id")
    @click.argument("labels", nargs=-1)
    @click.option("--remove", multiple=True, help="Remove the operator's label KEY (repeat).")
    def label(
        url: str,
        token: str,
        as_json: bool,
        device_id: str,
        labels: tuple[str, ...],
        remove: tuple[str, ...],
    ) -> None:
        """Set operator labels KEY=VALUE on DEVICE_ID (they win over the device's own)."""
        if not labels and not remove:
            raise click.UsageError("give KEY=VALUE labels to set or --remove KEY")
        with AdminClient(url, token) as client:
            data = client.set_labels(device_id, _pairs(labels), list(remove))
        if as_json:
            emit_json(data)
            return
        for line in _labels_lines(data):
            click.echo(line)

    @devices.command("labels")
    @admin_options
    @json_option
    @click.argument("device_id")
    def labels_show(url: str, token: str, as_json: bool, device_id: str) -> None:
        """Show DEVICE_ID's labels: the operator's, the device's own, the effective merge."""
        with AdminClient(url, token) as client:
            data = client.labels(device_id)
        if as_json:
            emit_json(data)
            return
        for line in _labels_lines(data):
            click.echo(line)

    @cli.group("label-groups")
    def label_groups() -> None:
        """Groups defined by a label selector (members follow the labels)."""

    @label_groups.command("define")
    @admin_options
    @json_option
    @click.argument("name")
    @click.argument("selector")
    def define(url: str, token: str, as_json: bool, name: str, selector: str) -> None:
        """Define (or redefine) label group NAME as SELECTOR, e.g. 'site=berlin,hw in (a,b)'."""
        with AdminClient(url, token) as client:
            data = client.label_call(
                "PUT", f"/v1/label-groups/{quote(name, safe='')}", {"selector": selector}
            )
        if as_json:
            emit_json(data)
        else:
            click.echo(f"label group {data['name']}: {data['selector']}")

    @label_groups.command("list")
    @admin_options
    @json_option
    def list_groups(url: str, token: str, as_json: bool) -> None:
        """List label groups with their selector and current member count."""
        with AdminClient(url, token) as client:
            rows = client.label_call("GET", "/v1/label-groups")["groups"]
        if as_json:
            emit_json(rows)
            return
        echo_table(
            [(r["name"], r.get("members", "-"), r["selector"]) for r in rows],
            ("NAME", "MEMBERS", "SELECTOR"),
        )

    @label_groups.command("show")
    @admin_options
    @json_option
    @click.argument("name")
    def show_group(url: str, token: str, as_json: bool, name: str) -> None:
        """Show label group NAME and the devices it matches now."""
        with AdminClient(url, token) as client:
            data = client.label_call("GET", f"/v1/label-groups/{quote(name, safe='')}")
        if as_json:
            emit_json(data)
            return
        click.echo(f"label group {data['name']}: {data['selector']}  ({data['members']} devices)")
        for d in data["devices"]:
            click.echo(f"  {shown(d, 128)}")

    @label_groups.command("delete")
    @admin_options
    @click.argument("name")
    def delete_group(url: str, token: str, name: str) -> None:
        """Delete label group NAME (rollouts keep the selector they copied)."""
        with AdminClient(url, token) as client:
            client.label_call("DELETE", f"/v1/label-groups/{quote(name, safe='')}")
        click.echo(f"label group {name} deleted")

    @cli.group("windows")
    def windows() -> None:
        """Maintenance windows: when matching devices may install."""

    @windows.command("set")
    @admin_options
    @json_option
    @click.argument("name")
    @click.option("--selector", required=True, help="Devices it applies to, e.g. 'site=b'.")
    @click.option("--days", default="mon,tue,wed,thu,fri,sat,sun", show_default=True)
    @click.option("--start", required=True, help="Local start time HH:MM.")
    @click.option("--duration", type=click.IntRange(1), required=True, help="Minutes.")
    @click.option("--timezone", required=True, help="IANA zone, e.g. Europe/Berlin.")
    def set_window(
        url: str,
        token: str,
        as_json: bool,
        name: str,
        selector: str,
        days: str,
        start: str,
        duration: int,
        timezone: str,
    ) -> None:
        """Define (or redefine) maintenance window NAME."""
        body = {
            "selector": selector,
            "weekdays": [d.strip() for d in days.split(",") if d.strip()],
            "start": start,
            "duration_minutes": duration,
            "timezone": timezone,
        }
        with AdminClient(url, token) as client:
            data = client.label_call("PUT", f"/v1/windows/{quote(name, safe='')}", body)
        if as_json:
            emit_json(data)
        else:
            click.echo(
                f"window {data['name']}: {','.join(data['weekdays'])} {data['start']} for "
                f"{data['duration_minutes']} min ({data['timezone']}) on {data['selector']}"
            )

    @windows.command("list")
    @admin_options
    @json_option
    def list_windows(url: str, token: str, as_json: bool) -> None:
        """List maintenance windows, whether each is open now and when it opens next."""
        with AdminClient(url, token) as client:
            rows = client.label_call("GET", "/v1/windows")["windows"]
        if as_json:
            emit_json(rows)
            return
        echo_table(
            [
                (
                    r["name"],
                    ",".join(r["weekdays"]),
                    r["start"],
                    r["duration_minutes"],
                    r["timezone"],
                    "open" if r["open_now"] else str(r["next_open"])[:16],
                    r["selector"],
                )
                for r in rows
            ],
            ("NAME", "DAYS", "START", "MINUTES", "ZONE", "NEXT", "SELECTOR"),
        )

    @windows.command("delete")
    @admin_options
    @click.argument("name")
    def delete_window(url: str, token: str, name: str) -> None:
        """Delete maintenance window NAME."""
        with AdminClient(url, token) as client:
            client.label_call("DELETE", f"/v1/windows/{quote(name, safe='')}")
        click.echo(f"window {name} deleted")
