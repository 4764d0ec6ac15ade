"""``fleet-server agent`` commands: the agent's own software (publish, list, rollout, assign).

They talk to ``fleet-server serve``'s admin API (``--url``/``--token`` like every admin command).
``publish`` uploads an agent package (``model-builder agent-package`` writes it); the server
verifies it with the builder root exactly as a device will and serves it by the block transfer.
``rollout`` rolls a release out in gated waves, like a model (a rollout the ``rollouts``
commands show, pause, resume and abort); ``assign`` sends it to a device or a group at once.
Either way the release goes into the signed desired state; each device
running under the launcher installs it side by side, tries it and rolls back by itself if it
fails (docs/operations.md, "The agent updates itself"). Errors are ``AdminApiError``s for the
CLI's error boundary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from fleet_server.admin.client import AdminClient
from fleet_server.cli.admin import admin_options, emit_json, json_option
from fleet_server.cli.rollouts import rollout_title, target_body

__all__ = ["register_agent_commands"]


def register_agent_commands(cli: click.Group) -> None:
    """Add the ``agent`` group to the ``fleet-server`` group."""

    @cli.group()
    def agent() -> None:
        """The agent's own software: publish a signed agent package, roll out or assign it."""

    register_agent_rollout(agent)

    @agent.command("publish")
    @click.argument("package", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @admin_options
    @json_option
    def agent_publish(package: Path, url: str, token: str, as_json: bool) -> None:
        """Verify and publish PACKAGE (*.efa)."""
        with AdminClient(url, token) as client:
            r = client.publish_agent(package)
        if as_json:
            emit_json(r)
            return
        click.echo(f"agent release {r['release']} (edgefleet {r['version']}) published")

    @agent.command("list")
    @admin_options
    @json_option
    def agent_list(url: str, token: str, as_json: bool) -> None:
        """Published agent releases, newest first."""
        with AdminClient(url, token) as client:
            rows = client.agent_releases()
        if as_json:
            emit_json(rows)
            return
        for r in rows:
            click.echo(
                f"release {r['release']:<6} edgefleet {r['version']:<12} Python {r['python']:<5}"
                f" {r['sha256'][:16]}  {r['published_at']}"
            )

    @agent.command("assign")
    @click.argument("target")
    @click.argument("release", type=click.IntRange(min=1))
    @click.option("--group", is_flag=True, help="TARGET is a group: every active device in it.")
    @admin_options
    @json_option
    def agent_assign(
        target: str, release: int, group: bool, url: str, token: str, as_json: bool
    ) -> None:
        """Assign agent RELEASE to device TARGET (or every device of group TARGET)."""
        with AdminClient(url, token) as client:
            results = client.assign_agent(target, release, group=group)
        if as_json:
            emit_json(results)
            return
        for r in results:
            state = "sent" if r["published"] else f"not sent ({r['error']})"
            click.echo(f"{r['device_id']}: agent release {release} {state}")


def _agent_policy(opts: dict[str, Any]) -> dict[str, Any]:
    """The rollout policy of ``agent rollout``'s options (only what applies to an agent)."""
    policy: dict[str, Any] = {}
    for key in ("canary_fraction", "canary_count", "dwell_seconds", "min_devices"):
        if opts[key] is not None:
            policy[key] = opts[key]
    for key in ("min_requests", "on_breach", "quarantine_after"):
        if opts[key] is not None:
            policy[key] = opts[key]
    if opts["steps"] is not None:
        try:
            policy["steps"] = [float(s) for s in opts["steps"].split(",") if s.strip()]
        except ValueError as exc:
            raise click.BadParameter("comma-separated fractions", param_hint="--steps") from exc
    if opts["approval"]:
        policy["approval"] = True
    thresholds = {
        k: opts[k]
        for k in (
            "max_install_failure_rate",
            "max_rollback_rate",
            "max_p99_latency_ratio",
            "max_error_rate_increase",
        )
        if opts[k] is not None
    }
    if thresholds:
        policy["thresholds"] = thresholds
    if (opts["budget_label"] is None) != (opts["budget_max"] is None):
        raise click.UsageError("--budget-label goes with --budget-max")
    if opts["budget_label"] is not None:
        policy["disruption_budget"] = {
            "label": opts["budget_label"],
            "max_devices": opts["budget_max"],
        }
    return policy


def register_agent_rollout(agent: click.Group) -> None:
    """Add ``agent rollout`` to the ``agent`` group."""

    @agent.command("rollout")
    @click.argument("release", type=click.IntRange(min=1))
    @click.option("--group", help="Target every active device of this group.")
    @click.option("--tag", "tags", multiple=True, help="Target devices with KEY=VALUE (repeat).")
    @click.option("--selector", help="Target devices whose labels match, e.g. 'site in (a,b)'.")
    @click.option("--label-group", help="Target a label group (its selector is copied).")
    @click.option("--from-release", type=click.IntRange(1), help="Default: most devices' release.")
    @click.option("--canary", "canary_fraction", type=click.FloatRange(0, 1, min_open=True))
    @click.option("--canary-count", type=click.IntRange(1), help="Canary size in devices.")
    @click.option("--steps", help="Growth fractions, e.g. 0.25,0.5,1.")
    @click.option("--dwell", "dwell_seconds", type=click.FloatRange(0), help="Seconds per wave.")
    @click.option("--min-devices", type=click.IntRange(1), help="Reporting devices per gate.")
    @click.option("--min-requests", type=click.IntRange(1), help="Requests per side per gate.")
    @click.option("--approval", is_flag=True, help="Wait for `rollouts approve` between waves.")
    @click.option("--on-breach", type=click.Choice(["pause", "abort"]))
    @click.option("--quarantine-after", type=click.IntRange(1), help="Aborts before quarantine.")
    @click.option("--budget-label", help="Disruption budget per value of this label, e.g. site.")
    @click.option("--budget-max", type=click.IntRange(1), help="Budget: devices at once.")
    @click.option("--max-install-failure-rate", type=click.FloatRange(0, 1))
    @click.option("--max-rollback-rate", type=click.FloatRange(0, 1))
    @click.option("--max-p99-ratio", "max_p99_latency_ratio", type=click.FloatRange(1))
    @click.option("--max-error-increase", "max_error_rate_increase", type=click.FloatRange(0, 1))
    @click.option("--override-quarantine", default="", help="Reason to roll out a quarantined one.")
    @click.option("--override-aborted", default="", help="Reason to retry an aborted release.")
    @admin_options
    @json_option
    def agent_rollout(
        release: int,
        group: str | None,
        tags: tuple[str, ...],
        selector: str | None,
        label_group: str | None,
        from_release: int | None,
        override_quarantine: str,
        override_aborted: str,
        url: str,
        token: str,
        as_json: bool,
        **opts: Any,
    ) -> None:
        """Roll agent RELEASE out in gated waves (`rollouts watch ID` follows it).

        Only devices run by a launcher (the agent-update capability) are targeted. The gates:
        install failures and the launchers' own returns at every step; after the dwell, every
        member's new agent reporting, then the error rate and p99 latency of its models against
        the devices not yet updated. A breach pauses (or aborts: --on-breach abort) before the
        next wave; devices whose trial failed are already back on their previous release.
        """
        body: dict[str, Any] = {
            "agent": release,
            "from_version": from_release,
            "policy": _agent_policy(opts),
            **target_body(
                group, tags, selector, label_group, override_quarantine, override_aborted
            ),
        }
        with AdminClient(url, token) as client:
            r = client.create_rollout(body)
        if as_json:
            emit_json(r)
            return
        click.echo(rollout_title(r))
