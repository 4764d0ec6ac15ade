"""``edge-agent``: the device command line.

``run`` starts the daemon; ``status``, ``infer`` and ``feedback`` talk to it over its local
API; store commands (``install``, ``rollback``, ``models``) work on the state directory directly,
under an exclusive lock, so they are safe whether or not the daemon runs; ``verify`` checks a
bundle exactly as ``install`` would, without installing it.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import numpy as np

from edge_agent import __version__
from edge_agent.bundle import read_bundle
from edge_agent.cli.agent_update import agent
from edge_agent.cli.support import echo_verdict, run_cli
from edge_agent.client import (
    AgentClient,
    AgentRequestError,
    AgentUnreachableError,
    conform_inputs,
)
from edge_agent.config import AgentConfig, load_config
from edge_agent.errors import ConfigError, InputValidationError
from edge_agent.runtime.device import detect_device_profile
from edge_agent.serving.capture import CaptureRing
from edge_agent.store import ModelStore
from edge_agent.trust import TrustedRoot

CONFIG_ENV = "EDGEFLEET_AGENT_CONFIG"

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=lambda: os.environ.get(CONFIG_ENV),
    show_default=f"${CONFIG_ENV}",
    help="Agent config (TOML); EDGEFLEET_AGENT__SECTION__KEY variables override it.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _config(path: Path | None) -> AgentConfig:
    return load_config(path)


@contextmanager
def _store(cfg: AgentConfig) -> Iterator[ModelStore]:
    root_path = Path(cfg.store.root_path)
    try:
        root = TrustedRoot.from_bytes(root_path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read the provisioned root {root_path}: {exc}") from exc
    # The store takes its own lock around every change (threads and processes).
    yield ModelStore(
        Path(cfg.store.state_dir),
        root,
        detect_device_profile(),
        keep_versions=cfg.store.keep_versions,
    )


@click.group()
@click.version_option(__version__, prog_name="edge-agent")
def cli() -> None:
    """edgefleet device agent."""


@cli.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@config_option
@click.option("--force", is_flag=True, help="Reinstall a version that failed here before.")
@json_option
def install(bundle: Path, config_path: Path | None, force: bool, as_json: bool) -> None:
    """Verify BUNDLE against the device's root of trust and activate it atomically."""
    with _store(_config(config_path)) as store:
        res = store.install(bundle, force=force)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "name": res.name,
                    "version": res.version,
                    "previous": res.previous,
                    "removed": list(res.removed),
                }
            )
        )
    else:
        prev = f" (was v{res.previous})" if res.previous else ""
        click.echo(
            f"installed {res.name} v{res.version}{prev}; on probation until the agent "
            "confirms its health"
        )


@cli.command()
@click.argument("name")
@config_option
@click.option("--reason", default="manual rollback", show_default=True)
def rollback(name: str, config_path: Path | None, reason: str) -> None:
    """Return NAME to its newest other good version."""
    with _store(_config(config_path)) as store:
        before = store.state(name).active
        state = store.rollback(name, reason, failed=False)
    click.echo(f"{name}: v{before} -> v{state.active} ({reason})")


@cli.command()
@config_option
@json_option
def models(config_path: Path | None, as_json: bool) -> None:
    """List installed models, their versions and status."""
    with _store(_config(config_path)) as store:
        states = [store.state(n) for n in store.names()]
    if as_json:
        click.echo(json.dumps([s.to_dict() for s in states], indent=2))
        return
    if not states:
        click.echo("no models installed")
    for s in states:
        versions = ", ".join(
            f"v{r.version}:{r.status}" + ("*" if r.version == s.active else "") for r in s.versions
        )
        click.echo(f"{s.name:<24} active v{s.active}  [{versions}]")


@cli.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--root",
    "root_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The root metadata this device was provisioned with.",
)
@click.option(
    "--root-update",
    "updates",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Newer root versions to walk, in order (repeatable).",
)
@click.option(
    "--installed-version",
    type=int,
    default=None,
    help="Version of this model already installed (rollback check).",
)
@json_option
def verify(
    bundle: Path,
    root_path: Path,
    updates: tuple[Path, ...],
    installed_version: int | None,
    as_json: bool,
) -> None:
    """Verify BUNDLE as this device would before installing it."""
    root = TrustedRoot.from_chain(root_path.read_bytes(), [p.read_bytes() for p in updates])
    device = detect_device_profile()
    loaded = read_bundle(
        bundle, root, now=datetime.now(UTC), installed_version=installed_version, device=device
    )
    echo_verdict(loaded, root, device, as_json)


@cli.command()
@config_option
def run(config_path: Path | None) -> None:
    """Run the daemon: load every installed model and serve the local v2 API until SIGTERM."""
    from edge_agent.daemon import run as run_daemon

    raise SystemExit(run_daemon(_config(config_path)))


def _sync_status(cfg: AgentConfig) -> dict[str, Any] | None:
    """What the running daemon's sync loop last wrote (None when sync is off or never ran)."""
    if not cfg.sync.enabled:
        return None
    path = Path(cfg.store.state_dir) / "sync" / "status.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


@cli.command()
@config_option
@json_option
def status(config_path: Path | None, as_json: bool) -> None:
    """Installed models (from the store) and whether the daemon is up and ready."""
    cfg = _config(config_path)
    with _store(cfg) as store:
        states = [store.state(n) for n in store.names()]
        root_version, root_warning = store.root.version, store.root_warning
    client = AgentClient(cfg.api, timeout=2.0)
    try:
        daemon = "ready" if client.ready() else "not ready"
    except AgentUnreachableError:
        daemon = "not running"
    sync = _sync_status(cfg)
    if as_json:
        out = {
            "daemon": daemon,
            "root": {"version": root_version, "warning": root_warning or None},
            "models": [s.to_dict() for s in states],
            "sync": sync,
        }
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"daemon: {daemon}")
    click.echo(f"trusted root: v{root_version}" + (f" ({root_warning})" if root_warning else ""))
    if sync is not None:
        click.echo(
            f"fleet sync: {'connected' if sync.get('connected') else 'not connected'}, desired "
            f"state v{sync.get('desired_version', 0)}, {sync.get('outbox_entries', 0)} telemetry "
            "entries waiting for the server's ack"
        )
        for name, d in sorted((sync.get("downloads") or {}).items()):
            click.echo(f"  downloading {name} v{d['version']}: {d['received']}/{d['total']} blocks")
        for name, o in sorted((sync.get("outcomes") or {}).items()):
            reason = f" ({o['reason']})" if o.get("reason") else ""
            click.echo(f"  {name}: {o['outcome']}{reason}")
    for s in states:
        rec = s.active_record
        last = s.events[-1] if s.events else {}
        if s.down is not None and s.down.version == s.active:
            click.echo(f"{s.name:<24} v{s.active} DOWN since {s.down.at}: {s.down.reason}"[:2000])
            continue
        click.echo(
            f"{s.name:<24} v{s.active} {rec.status if rec else '-':<10} last event: "
            f"{last.get('event', '-')} {last.get('detail', '')}".rstrip()
        )


@cli.command()
@click.argument("model")
@click.argument("data", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@config_option
@click.option("--input-name", default=None, help="Input name for .npy data (default: the first).")
def infer(model: str, data: Path, config_path: Path | None, input_name: str | None) -> None:
    """Send DATA (.npy, or .npz keyed by input name) to MODEL on the running daemon."""
    client = AgentClient(_config(config_path).api)
    try:
        if data.suffix == ".npz":
            with np.load(data, allow_pickle=False) as npz:
                inputs = {k: npz[k] for k in npz.files}
            arr = None
        else:
            arr = np.load(data, allow_pickle=False)
    # A damaged .npz is a bad zip, a truncated .npy an early EOF: both are bad input.
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputValidationError(f"cannot read {data}: {exc}", reason="data") from exc
    status_code, meta = client.request("GET", f"/v2/models/{model}")
    if status_code != 200 or not isinstance(meta, dict):
        raise AgentRequestError(status_code, str(meta))
    if arr is not None:
        if input_name is None:
            input_name = meta["inputs"][0]["name"]
        inputs = {str(input_name): arr}
    click.echo(json.dumps(client.infer(model, conform_inputs(inputs, meta)), indent=2))


@cli.command()
@click.argument("model")
@click.option("--id", "request_id", required=True, help="The request's id (its v2 'id').")
@click.option(
    "--label",
    "labels",
    multiple=True,
    required=True,
    help="The true class (index or name); repeat it once per row of a batch request.",
)
@click.option("--version", default=None, help="Only if this version answered the request.")
@config_option
def feedback(
    model: str,
    request_id: str,
    labels: tuple[str, ...],
    version: str | None,
    config_path: Path | None,
) -> None:
    """Tell the running daemon the true answer of an earlier request to MODEL."""
    client = AgentClient(_config(config_path).api)
    values: list[int | str | None] = [int(x) if x.isascii() and x.isdigit() else x for x in labels]
    out = client.feedback(model, request_id, values, version=version)
    click.echo(json.dumps(out, indent=2))


@cli.command()
@config_option
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write JSON lines here instead of standard output.",
)
def capture(config_path: Path | None, out: Path | None) -> None:
    """Export the sampled capture ring buffer as JSON lines (oldest first)."""
    directory = Path(_config(config_path).store.state_dir) / "capture"
    lines = (json.dumps(r) for r in CaptureRing.export(directory))
    if out is None:
        for line in lines:
            click.echo(line)
    else:
        n = 0
        with out.open("w") as fh:
            for line in lines:
                fh.write(line + "\n")
                n += 1
        click.echo(f"wrote {n} records to {out}")


@cli.group()
def identity() -> None:
    """The device's MQTT identity: key and CSR (the key never leaves the device)."""


@identity.command("csr")
@config_option
@click.option("--ca", "ca_cert", type=click.Path(dir_okay=False, exists=True, path_type=Path))
def identity_csr(config_path: Path | None, ca_cert: Path | None) -> None:
    """Create the device key (once) and write a CSR for the operator to sign; print its path.

    With --ca, also provision the fleet CA certificate the device will trust.
    """
    cfg = _config(config_path)
    from edge_agent.common.identity import IdentityStore  # x509: commands and sync only

    store = IdentityStore(Path(cfg.sync.identity_dir))
    if ca_cert is not None:
        store.provision_ca(ca_cert.read_bytes())
    store.write_csr(cfg.device_id)
    click.echo(str(store.csr_path))


@identity.command("install")
@config_option
@click.argument("cert", type=click.Path(dir_okay=False, exists=True, path_type=Path))
def identity_install(config_path: Path | None, cert: Path) -> None:
    """Check the issued certificate (fleet CA, this device's key and id) and install it."""
    cfg = _config(config_path)
    from edge_agent.common.identity import IdentityStore  # x509: commands and sync only

    store = IdentityStore(Path(cfg.sync.identity_dir))
    store.install_certificate(cert.read_bytes(), cfg.device_id, datetime.now(UTC))
    click.echo(str(store.cert_path))


@identity.command("claim")
@config_option
def identity_claim(config_path: Path | None) -> None:
    """Enroll now with the provisioned claim (claim.json); print enrolled or pending."""
    from edge_agent.common.enroll import enroll_with_claim, load_claim

    cfg = _config(config_path)
    from edge_agent.common.identity import IdentityStore  # x509: commands and sync only

    store = IdentityStore(Path(cfg.sync.identity_dir))
    claim = load_claim(store)
    if claim is None:
        raise ConfigError(f"no claim.json in {store.directory}")
    click.echo(enroll_with_claim(store, cfg.device_id, claim, now=datetime.now(UTC), timeout=30))


@cli.group()
def root() -> None:
    """The device's trusted root: show it, rotate it with signed new versions."""


@root.command("update")
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@config_option
def root_update(files: tuple[Path, ...], config_path: Path | None) -> None:
    """Rotate to newer root versions FILES (in version order; known versions are skipped).

    Each version must be exactly the next one and signed by a threshold of the previous root's
    keys and of its own. A running daemon picks the new root up within seconds.
    """
    chain = []
    for path in files:
        try:
            chain.append(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
    with _store(_config(config_path)) as store:
        before = store.root.version
        after = store.update_roots(chain)
    if after.version == before:
        click.echo(f"trusted root stays v{before} (nothing newer in the files)")
    else:
        click.echo(f"trusted root rotated v{before} -> v{after.version}")


@root.command("show")
@config_option
@json_option
def root_show(config_path: Path | None, as_json: bool) -> None:
    """The trusted root: version, expiry, and each role's key ids and threshold."""
    with _store(_config(config_path)) as store:
        trusted, warning = store.root, store.root_warning
    roles: dict[str, dict[str, Any]] = {
        r: {"threshold": trusted.threshold(r), "keyids": list(trusted.keyids(r))}
        for r in ("root", "targets", "timestamp", "snapshot")
    }
    if as_json:
        out = {
            "version": trusted.version,
            "expires": trusted.expires.isoformat(),
            "roles": roles,
            "warning": warning or None,
        }
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"root v{trusted.version}, expires {trusted.expires.isoformat()}")
    for r, d in roles.items():
        ids = ", ".join(k[:16] for k in d["keyids"])
        click.echo(f"  {r:<10} threshold {d['threshold']}: {ids}")
    if warning:
        click.echo(f"warning: {warning}")


cli.add_command(agent)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: the CLI behind the error boundary."""
    run_cli(cli, argv=argv)
