"""``fleet-server agent`` commands: the agent's own software (publish, list, assign).

They talk to ``fleet-server serve``'s admin API (``--url``/``--token`` like every admin command).
``publish`` uploads an agent package (``model-builder agent-package`` writes it); the server
verifies it with the builder root exactly as a device will and serves it by the block transfer.
``assign`` puts the release in the signed desired state of a device or a group; each device
running under the launcher installs it side by side, tries it and rolls back by itself if it
fails (docs/operations.md, "The agent updates itself"). Errors are ``AdminApiError``s for the
CLI's error boundary.
"""

from __future__ import annotations

from pathlib import Path

import click

from fleet_server.admin.client import AdminClient
from fleet_server.cli.admin import admin_options, emit_json, json_option

__all__ = ["register_agent_commands"]


def register_agent_commands(cli: click.Group) -> None:
    """Add the ``agent`` group to the ``fleet-server`` group."""

    @cli.group()
    def agent() -> None:
        """The agent's own software: publish a signed agent package, assign a release."""

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
