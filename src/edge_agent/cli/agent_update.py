"""``edge-agent agent``: the agent's own software (install a signed agent package, show state).

``install`` verifies an agent package against the device's trusted root (the store's, after
any rotation), builds its release side by side and stages it; the launcher that runs the
daemon switches to it, tries it and rolls back by itself if it fails
(``edge_agent.selfupdate``). ``status`` prints the update state machine and the releases on
disk. Both work on the agent root (``--agent-root``, ``$EDGEFLEET_AGENT_ROOT``, or
``/var/lib/edgefleet/agent``) under its lock.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from edge_agent import __version__
from edge_agent.config import load_config
from edge_agent.errors import ConfigError
from edge_agent.runtime.device import detect_device_profile
from edge_agent.selfupdate.releases import DEFAULT_AGENT_ROOT, ENV_AGENT_ROOT, Layout
from edge_agent.store import ModelStore
from edge_agent.trust import TrustedRoot

__all__ = ["agent"]

agent_root_option = click.option(
    "--agent-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=lambda: os.environ.get(ENV_AGENT_ROOT, DEFAULT_AGENT_ROOT),
    show_default=f"${ENV_AGENT_ROOT} or {DEFAULT_AGENT_ROOT}",
    help="Where the launcher keeps the agent's releases.",
)
config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=lambda: os.environ.get("EDGEFLEET_AGENT_CONFIG"),
    help="Agent config (TOML): its store gives the trusted root.",
)


def _trusted_root(config_path: Path | None) -> TrustedRoot:
    cfg = load_config(config_path)
    root_path = Path(cfg.store.root_path)
    try:
        provisioned = TrustedRoot.from_bytes(root_path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read the provisioned root {root_path}: {exc}") from exc
    store = ModelStore(
        Path(cfg.store.state_dir),
        provisioned,
        detect_device_profile(),
        keep_versions=cfg.store.keep_versions,
    )
    return store.root


@click.group()
def agent() -> None:
    """The agent's own software: install a signed agent package, show the update state."""


@agent.command("install")
@click.argument("package", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@agent_root_option
@config_option
@click.option(
    "--retry-failed", is_flag=True, help="Try again a release that failed its trial here."
)
def agent_install(
    package: Path, agent_root: Path, config_path: Path | None, retry_failed: bool
) -> None:
    """Verify PACKAGE (*.efa), build its release side by side and stage it for the launcher."""
    root = _trusted_root(config_path)
    from edge_agent.selfupdate.install import stage_package  # a command only, not the daemon

    result = stage_package(
        Layout.open(agent_root),
        package,
        root,
        now=datetime.now(UTC),
        retry_failed=retry_failed,
    )
    click.echo(
        f"agent release {result.release} (edgefleet {result.version}) staged; "
        f"the launcher switches from {result.previous} and tries it"
    )


@agent.command("status")
@agent_root_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def agent_status(agent_root: Path, as_json: bool) -> None:
    """The running release, the update state and the releases on disk."""
    layout = Layout.open(agent_root)
    st = layout.load_state()
    current = layout.current()
    info = layout.release_info(current)
    releases = sorted(
        (d.name for d in layout.releases.iterdir() if layout.is_complete(d.name)), key=int
    ) if layout.releases.is_dir() else []  # fmt: skip
    out: dict[str, Any] = {
        "current": current,
        "current_version": info.get("version", __version__ if current == "base" else None),
        "state": st.state or "none",
        "candidate": st.candidate or None,
        "previous": st.previous,
        "reason": st.reason or None,
        "failed": list(st.failed),
        "releases": releases,
    }
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"running {current} (edgefleet {out['current_version']}), state {out['state']}")
    if st.candidate:
        click.echo(f"  candidate {st.candidate}, previous {st.previous}")
    if st.reason:
        click.echo(f"  reason: {st.reason}")
    if st.failed:
        click.echo(f"  failed here: {', '.join(map(str, st.failed))}")
