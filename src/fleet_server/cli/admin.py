"""``fleet-server`` operator commands that talk to a running server's admin API.

``devices list|show|register|misbehaviour``, ``models publish|list|show|accuracy`` (with each
version's aborts, quarantine and overrides; labelled accuracy per version and group),
``assign``, ``waves start``, ``telemetry tail`` and ``status``.
Each takes ``--url`` (env ``EDGEFLEET_ADMIN_URL``, default ``http://127.0.0.1:8780``) and
``--token`` (env ``EDGEFLEET_ADMIN_TOKEN``), prints a human table by default and JSON with
``--json``. Errors are ``AdminApiError``s, mapped to exit codes by the
CLI's error boundary (the one error table, ``fleet_server.errors.ERRORS``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from fleet_server.admin.client import DEFAULT_ADMIN_URL, AdminClient

__all__ = [
    "admin_options",
    "echo_table",
    "emit",
    "emit_json",
    "json_option",
    "parse_tags",
    "register_admin_commands",
    "shown",
    "table_lines",
]

F = TypeVar("F", bound=Callable[..., Any])


def admin_options(func: F) -> F:
    """``--url`` and ``--token`` (required) for commands that call the admin API."""
    func = click.option(
        "--token",
        envvar="EDGEFLEET_ADMIN_TOKEN",
        required=True,
        help="Admin bearer token (env EDGEFLEET_ADMIN_TOKEN).",
    )(func)
    return click.option(
        "--url",
        envvar="EDGEFLEET_ADMIN_URL",
        default=DEFAULT_ADMIN_URL,
        show_default=True,
        help="Admin API URL (env EDGEFLEET_ADMIN_URL).",
    )(func)


def json_option(func: F) -> F:
    """``--json``: machine-readable output."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(func)


def emit_json(data: Any) -> None:
    """Print ``data`` as indented, key-sorted JSON (every admin command's ``--json``)."""
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def emit(data: Any, as_json: bool, text: str) -> None:
    """``data`` as JSON with ``--json``, else the one-line human ``text``."""
    if as_json:
        emit_json(data)
    else:
        click.echo(text)


def shown(text: Any, limit: int = 80) -> str:
    """``text`` safe for a terminal: non-printable characters escaped, cut at ``limit``."""
    s = str(text)
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in s)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def table_lines(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> list[str]:
    """A left-aligned text table (``-`` for None), one string per line, headers first."""
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [list(headers), *cells]
    ]


def echo_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    """Print ``table_lines``."""
    for line in table_lines(rows, headers):
        click.echo(line)


def _models_of(device: dict[str, Any]) -> str:
    desired = device.get("desired") or {}
    return ",".join(f"{n}@v{a['version']}" for n, a in sorted(desired.items())) or "-"


def _reported_rows(reported: dict[str, Any] | None) -> list[tuple[str, str]]:
    """One row per model the device reports: what runs, the outcome, transfer progress."""
    rows = []
    for name, m in sorted(((reported or {}).get("models") or {}).items()):
        text = f"active v{m.get('active')} assigned v{m.get('assigned')} {m.get('outcome')}"
        transfer = m.get("transfer")
        if transfer:
            text += (
                f", downloading v{transfer['version']}: "
                f"{transfer['received_blocks']}/{transfer['total_blocks']} blocks"
            )
        if m.get("reason"):
            text += f" ({m['reason']})"
        rows.append((f"model {name}", text))
    return rows


def _label_rows(labels: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The labels a selector sees (``effective``), then the operator's and the device's own;
    device-supplied text, so escaped."""
    rows = []
    for title, key in (("labels", "effective"), ("labels operator", "operator"),
                       ("labels device", "device")):  # fmt: skip
        found = labels.get(key) or {}
        text = ", ".join(f"{shown(k, 80)}={shown(v, 80)}" for k, v in sorted(found.items()))
        rows.append((title, text or "-"))
    if labels.get("refused"):
        rows.append(("labels refused", f"{int(labels['refused'])} invalid reported label(s)"))
    return rows


def _refusals_of(misbehaviour: dict[str, Any] | None) -> str:
    """``reason=n`` pairs of a device's refusals, or ``0``."""
    if not misbehaviour or not misbehaviour.get("total"):
        return "0"
    return " ".join(f"{k}={v}" for k, v in sorted(misbehaviour["reasons"].items()))


def parse_tags(tags: tuple[str, ...]) -> dict[str, str]:
    """``--tag KEY=VALUE`` options as a dict. Raises: click.BadParameter."""
    out: dict[str, str] = {}
    for tag in tags:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{tag!r} is not KEY=VALUE", param_hint="--tag")
        out[key] = value
    return out


def _accuracy_cells(a: dict[str, Any]) -> tuple[str, str, str]:
    if not a.get("n"):
        return "no labels", "-", "0"
    return f"{a['accuracy']:.1%}", f"[{a['low']:.1%}, {a['high']:.1%}]", str(a["n"])


def register_admin_commands(cli: click.Group, devices: click.Group) -> None:
    """Add the admin-API commands to the ``fleet-server`` group and its ``devices`` group."""

    @devices.command("list")
    @admin_options
    @json_option
    @click.option("--group", help="Only devices of this group.")
    @click.option("--selector", help="Only devices whose labels match, e.g. 'site=berlin'.")
    @click.option("--label-group", help="Only devices of this label group (a named selector).")
    def devices_list(
        url: str,
        token: str,
        as_json: bool,
        group: str | None,
        selector: str | None,
        label_group: str | None,
    ) -> None:
        """List devices with their group, online state and desired models."""
        with AdminClient(url, token) as client:
            rows = client.devices(group, selector=selector, label_group=label_group)
        if as_json:
            emit_json(rows)
            return
        echo_table(
            [
                (
                    d["id"],
                    d["group"],
                    "online" if d["online"] else "offline",
                    "revoked" if d["revoked_at"] else "active",
                    d["desired_version"],
                    _models_of(d),
                )
                for d in rows
            ],
            ("DEVICE", "GROUP", "STATUS", "STATE", "DESIRED", "MODELS"),
        )

    @devices.command("show")
    @admin_options
    @json_option
    @click.argument("device_id")
    def devices_show(url: str, token: str, as_json: bool, device_id: str) -> None:
        """Show one device: record, desired and reported state, telemetry sequence state."""
        with AdminClient(url, token) as client:
            d = client.device(device_id)
        if as_json:
            emit_json(d)
            return
        seq = d.get("seq") or {}
        echo_table(
            [
                ("id", d["id"]),
                ("group", d["group"]),
                ("tags", json.dumps(d["tags"], sort_keys=True)),
                ("online", d["online"]),
                ("enrolled_at", d["enrolled_at"]),
                ("revoked_at", d["revoked_at"]),
                ("last_seen", d["last_seen"]),
                ("desired", f"v{d['desired_version']} {_models_of(d)}"),
                ("desired_expires", d.get("desired_expires")),
                ("reported_at", d.get("reported_at")),
                ("telemetry_acked", seq.get("acked_upto")),
                ("telemetry_lost", seq.get("lost")),
                ("refused", _refusals_of(d.get("misbehaviour"))),
                *_label_rows(d.get("labels") or {}),
                *_reported_rows(d.get("reported")),
            ],
            ("FIELD", "VALUE"),
        )

    @devices.command("misbehaviour")
    @admin_options
    @json_option
    @click.option("--top", type=click.IntRange(1, 10_000), default=20, show_default=True)
    def devices_misbehaviour(url: str, token: str, as_json: bool, top: int) -> None:
        """Devices whose messages the server refused, worst first, with the reasons.

        Counted by the worker that answers, since it started (each worker counts what it
        received).
        """
        with AdminClient(url, token) as client:
            rows = client.misbehaviour(top)
        if as_json:
            emit_json(rows)
            return
        echo_table(
            [(m["device_id"], m["total"], m["last_reason"], _refusals_of(m)) for m in rows],
            ("DEVICE", "REFUSED", "LAST", "REASONS"),
        )

    @devices.command("register")
    @admin_options
    @json_option
    @click.argument("device_id")
    @click.option("--group", default="default", show_default=True)
    @click.option("--tag", "tags", multiple=True, help="KEY=VALUE (repeatable).")
    @click.option("--cert-serial", default=None, help="Serial of the device's certificate.")
    def devices_register(
        url: str,
        token: str,
        as_json: bool,
        device_id: str,
        group: str,
        tags: tuple[str, ...],
        cert_serial: str | None,
    ) -> None:
        """Register an enrolled DEVICE_ID with the server (after ``devices enroll``)."""
        with AdminClient(url, token) as client:
            record = client.register(device_id, group, parse_tags(tags), cert_serial)
        emit(record, as_json, f"registered {record['id']} in group {record['group']}")

    @cli.group()
    def models() -> None:
        """Publish and list builder-signed model bundles."""

    @models.command("publish")
    @admin_options
    @json_option
    @click.argument("bundle", type=click.Path(dir_okay=False, exists=True, path_type=Path))
    def models_publish(url: str, token: str, as_json: bool, bundle: Path) -> None:
        """Upload BUNDLE; the server verifies it with the builder root before storing it."""
        with AdminClient(url, token) as client:
            m = client.publish(bundle)
        emit(m, as_json, f"published {m['name']} v{m['version']} ({m['channel']}) {m['sha256']}")

    @models.command("list")
    @admin_options
    @json_option
    def models_list(url: str, token: str, as_json: bool) -> None:
        """List published bundles."""
        with AdminClient(url, token) as client:
            rows = client.models()
        if as_json:
            emit_json(rows)
            return
        echo_table(
            [
                (
                    m["name"],
                    m["version"],
                    m["channel"],
                    m["length"],
                    m["sha256"],
                    (m.get("history") or {}).get("summary", "-"),
                )
                for m in rows
            ],
            ("NAME", "VERSION", "CHANNEL", "BYTES", "SHA256", "HISTORY"),
        )

    @models.command("show")
    @admin_options
    @json_option
    @click.argument("name")
    @click.argument("version", type=click.IntRange(1))
    def models_show(url: str, token: str, as_json: bool, name: str, version: int) -> None:
        """One published version with its rollouts, aborts, quarantine and overrides."""
        with AdminClient(url, token) as client:
            m = client.model(name, version)
        if as_json:
            emit_json(m)
            return
        h = m.get("history") or {}
        click.echo(f"{m['name']} v{m['version']} ({m['channel']}) {m['sha256']}")
        click.echo(f"history: {h.get('status', 'clean')} ({h.get('summary', '-')})")
        if h.get("quarantine"):
            q = h["quarantine"]
            click.echo(f"quarantined {q['at']}: {q['reason']}")
        for a in h.get("aborts") or ():
            reasons = "; ".join(a.get("reasons") or ())
            click.echo(f"aborted {a['at']} by {a['by']} (rollout {a['rollout']}): {reasons}")
        for o in h.get("overrides") or ():
            click.echo(f"override of {o['kind']} {o['at']} (rollout {o['rollout']}): {o['reason']}")
        rows = [(r["id"], r["state"], r["created_at"]) for r in m.get("rollouts") or ()]
        if rows:
            echo_table(rows, ("ROLLOUT", "STATE", "CREATED"))

    @models.command("accuracy")
    @admin_options
    @json_option
    @click.argument("name")
    @click.option("--hours", type=click.IntRange(1, 366 * 24), default=24, show_default=True)
    def models_accuracy(url: str, token: str, as_json: bool, name: str, hours: int) -> None:
        """Labelled accuracy of NAME's versions (ground truth the devices were told), with 95 %
        Wilson intervals, over the fleet and per device group."""
        with AdminClient(url, token) as client:
            doc = client.accuracy(name, hours=hours)
        if as_json:
            emit_json(doc)
            return
        click.echo(f"{doc['model']}: labelled accuracy since {doc['since']}")
        rows = []
        for v in doc.get("versions") or ():
            cohorts = [("fleet", v["fleet"]), *sorted((v.get("groups") or {}).items())]
            for cohort, a in cohorts:
                rows.append((f"v{v['version']}", cohort, *_accuracy_cells(a)))
            flips = ", ".join(f"{t}->{p} x{n}" for t, p, n in v["fleet"].get("flips") or ())
            if flips:
                rows.append((f"v{v['version']}", "confusions", flips, "", ""))
        echo_table(rows, ("VERSION", "COHORT", "ACCURACY", "95% INTERVAL", "LABELLED"))

    @cli.command("assign")
    @admin_options
    @json_option
    @click.option("--device", "device_id", help="Assign to this device.")
    @click.option("--group", help="Assign to every active device of this group.")
    @click.option(
        "--override-quarantine",
        default="",
        metavar="REASON",
        help="Assign a quarantined version anyway, for this reason (logged).",
    )
    @click.option(
        "--override-aborted",
        default="",
        metavar="REASON",
        help="Assign a version a rollout aborted, for this reason (logged).",
    )
    @click.argument("model")
    @click.argument("version", type=click.IntRange(1))
    def assign(
        url: str,
        token: str,
        as_json: bool,
        device_id: str | None,
        group: str | None,
        override_quarantine: str,
        override_aborted: str,
        model: str,
        version: int,
    ) -> None:
        """Assign MODEL VERSION (published) to a device or a group; other models are kept.

        This skips a rollout's waves and gates: a version a rollout aborted, or a quarantined
        one, is refused without the same override ``rollouts create`` takes."""
        if (device_id is None) == (group is None):
            raise click.UsageError("give exactly one of --device and --group")
        target = device_id if device_id is not None else group
        assert target is not None
        with AdminClient(url, token) as client:
            results = client.assign(
                target,
                model,
                version,
                group=group is not None,
                override_quarantine=override_quarantine,
                override_aborted=override_aborted,
            )
        if as_json:
            emit_json(results)
            return
        echo_table(
            [
                (
                    r["device_id"],
                    r["desired_version"],
                    "yes" if r["published"] else "no",
                    r["error"],
                )
                for r in results
            ],
            ("DEVICE", "DESIRED", "PUBLISHED", "ERROR"),
        )

    @cli.group()
    def waves() -> None:
        """Broadcast rollout waves."""

    @waves.command("start")
    @admin_options
    @json_option
    @click.argument("sha256")
    def waves_start(url: str, token: str, as_json: bool, sha256: str) -> None:
        """Broadcast the blocks of the published bundle SHA256 once (devices repair gaps)."""
        with AdminClient(url, token) as client:
            wave = client.start_wave(sha256)
        emit(wave, as_json, f"wave {wave['wave']} started for {sha256}")

    @cli.group()
    def telemetry() -> None:
        """Read stored telemetry."""

    @telemetry.command("tail")
    @admin_options
    @json_option
    @click.option("--device", "device_id", help="Only this device.")
    @click.option(
        "--after-id",
        type=click.IntRange(0),
        default=None,
        help="Entries after this id, oldest first (default: the newest --limit entries).",
    )
    @click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
    @click.option("--follow", "-f", is_flag=True, help="Keep polling for new entries.")
    @click.option("--interval", type=click.FloatRange(0.1), default=2.0, show_default=True)
    def telemetry_tail(
        url: str,
        token: str,
        as_json: bool,
        device_id: str | None,
        after_id: int | None,
        limit: int,
        follow: bool,
        interval: float,
    ) -> None:
        """Print the newest stored telemetry entries (JSON lines with --json); with --follow,
        then every new one as it arrives, like ``tail -f``."""
        with AdminClient(url, token) as client:
            try:
                while True:
                    rows = client.telemetry(after_id=after_id, device_id=device_id, limit=limit)
                    for t in rows:
                        if as_json:
                            click.echo(json.dumps(t, sort_keys=True))
                        else:
                            click.echo(
                                f"{t['id']:>8}  {t['received_at']}  {t['device_id']}  "
                                f"#{t['seq']}  {t['kind']}  {json.dumps(t['payload'])[:120]}"
                            )
                        after_id = max(after_id or 0, int(t["id"]))
                    if not follow:
                        return
                    after_id = after_id or 0  # follow from the end just shown (0: none yet)
                    if len(rows) < limit:
                        time.sleep(interval)
            except KeyboardInterrupt:
                return

    @cli.command("status")
    @admin_options
    @json_option
    def status(url: str, token: str, as_json: bool) -> None:
        """Fleet-wide counts and the gateway's counters."""
        with AdminClient(url, token) as client:
            st = client.status()
        if as_json:
            emit_json(st)
            return
        rows = [(k, st[k]) for k in ("devices", "active", "online", "bundles")]
        rows += [(f"gateway.{k}", v) for k, v in sorted(st["gateway"].items())]
        echo_table(rows, ("METRIC", "VALUE"))
