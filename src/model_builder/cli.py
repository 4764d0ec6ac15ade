"""``model-builder``: thin click commands over the builder, key store and verifier.

Every command reads its inputs, calls one function, and prints a human table or ``--json``.
Errors go through the shared boundary (``edge_agent.cli.support``) and leave with a stable exit
code from the one error table (``model_builder.errors.ERRORS``).
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from tuf.api.metadata import Targets

from edge_agent import __version__
from edge_agent.bundle import read_bundle, read_raw, write_bundle
from edge_agent.bundle.agent_archive import AGENT_PACKAGE_SUFFIX
from edge_agent.cli.support import echo_verdict, passphrase_from_env, run_cli
from edge_agent.contract import BundleManifest, DeviceProfile
from edge_agent.trust import TrustedRoot, parse_metadata
from model_builder.agent_package import agent_release_for, build_wheel, package_agent
from model_builder.build_cli import build, demo
from model_builder.errors import ERRORS
from model_builder.keystore import KeyStore
from model_builder.package import cosign_bundle

keystore_option = click.option(
    "--keystore",
    "keystore_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Key store directory (see `model-builder keys init`).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _now() -> datetime:
    return datetime.now(UTC)


@click.group()
@click.version_option(__version__, prog_name="model-builder")
def cli() -> None:
    """Quantize, gate, baseline, package and sign models for edgefleet devices."""


cli.add_command(build)
cli.add_command(demo)


# ------------------------------------------------------------------------------------- keys
@cli.group()
def keys() -> None:
    """Create a root of trust, rotate and revoke keys."""


@keys.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--root-keys", default=1, show_default=True)
@click.option("--root-threshold", default=1, show_default=True)
@click.option("--targets-keys", default=1, show_default=True, help="Builder signing keys.")
@click.option("--targets-threshold", default=1, show_default=True)
@click.option(
    "--online-keys",
    default=1,
    show_default=True,
    help="Fleet-server keys (timestamp/snapshot roles).",
)
@click.option("--expires-days", default=365, show_default=True)
def keys_init(
    directory: Path,
    root_keys: int,
    root_threshold: int,
    targets_keys: int,
    targets_threshold: int,
    online_keys: int,
    expires_days: int,
) -> None:
    """Create a key store with fresh Ed25519 keys and root v1 in DIRECTORY.

    Private keys are encrypted when EDGEFLEET_KEY_PASSPHRASE is set.
    """
    store = KeyStore.init(
        directory,
        now=_now(),
        root_keys=root_keys,
        root_threshold=root_threshold,
        targets_keys=targets_keys,
        targets_threshold=targets_threshold,
        online_keys=online_keys,
        expires_days=expires_days,
        passphrase=passphrase_from_env(),
    )
    click.echo(f"created {store.path} with root v1; provision devices with {store.root_path}")
    _print_keys(store, as_json=False)


@keys.command("list")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@json_option
def keys_list(directory: Path, as_json: bool) -> None:
    """List keys and the roles they hold in the current root."""
    _print_keys(KeyStore.open(directory, passphrase_from_env()), as_json)


@keys.command("rotate")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--role", required=True, type=click.Choice(["root", "targets", "timestamp", "snapshot"])
)
@click.option("--add", "add", default=0, help="Generate this many new keys for the role.")
@click.option(
    "--add-public",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="Add a public key held elsewhere (PEM or *.pub.json).",
)
@click.option(
    "--remove",
    multiple=True,
    help="Key id or label (e.g. a stolen targets-1) to remove from the role; repeatable.",
)
@click.option("--threshold", type=int, default=None)
@click.option("--expires-days", default=365, show_default=True)
def keys_rotate(
    directory: Path,
    role: str,
    add: int,
    add_public: tuple[Path, ...],
    remove: tuple[str, ...],
    threshold: int | None,
    expires_days: int,
) -> None:
    """Write the next root version with ROLE's keys or threshold changed."""
    store = KeyStore.open(directory, passphrase_from_env())
    version = store.rotate(
        role,
        now=_now(),
        add=add,
        add_public=add_public,
        remove=remove,
        threshold=threshold,
        expires_days=expires_days,
    )
    click.echo(f"root v{version} written; distribute {store.path / 'roots'} to devices")


@keys.command("revoke")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("keyid")
@click.option("--expires-days", default=365, show_default=True)
def keys_revoke(directory: Path, keyid: str, expires_days: int) -> None:
    """Remove KEYID from every role in a new root version."""
    store = KeyStore.open(directory, passphrase_from_env())
    version = store.revoke(keyid, now=_now(), expires_days=expires_days)
    click.echo(f"revoked {keyid[:16]}...; root v{version} written")


def _print_keys(store: KeyStore, as_json: bool) -> None:
    root = store.trusted_root()
    rows: list[dict[str, Any]] = [
        {
            "label": k.label,
            "keyid": k.keyid,
            "roles": [
                r for r in ("root", "targets", "timestamp", "snapshot") if k.keyid in root.keyids(r)
            ],
            "private": k.has_private,
        }
        for k in store.list_keys()
    ]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "root_version": root.version,
                    "keys": rows,
                    "thresholds": {
                        r: root.threshold(r) for r in ("root", "targets", "timestamp", "snapshot")
                    },
                },
                indent=2,
            )
        )
        return
    click.echo(f"root v{root.version}, expires {root.expires.isoformat()}")
    for r in rows:
        roles = ",".join(r["roles"]) or "(not in current root)"
        click.echo(
            f"  {r['label']:<22} {r['keyid'][:16]}  {roles:<20} "
            f"{'private' if r['private'] else 'public only'}"
        )


# ------------------------------------------------------------------ inspect / verify / sign
@cli.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
def inspect(bundle: Path, as_json: bool) -> None:
    """Print a bundle's manifest, report and signatures (without verifying them)."""
    raw = read_raw(bundle, with_artifact=True)  # the whole file: a tail after it is refused
    md = parse_metadata(raw.targets_bytes, Targets.type)
    manifest = BundleManifest.from_bytes(raw.manifest_bytes)
    sigs = sorted(md.signatures)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "manifest": manifest.to_dict(),
                    "signatures": sigs,
                    "targets_version": md.signed.version,
                    "expires": md.signed.expires.isoformat(),
                },
                indent=2,
            )
        )
        return
    m = manifest
    click.echo(
        f"{m.name} v{m.version} ({m.channel})  {m.artifact.format}  "
        f"{m.artifact.length:,} bytes  sha256 {m.artifact.sha256[:16]}..."
    )
    click.echo(
        f"targets v{md.signed.version}, expires {md.signed.expires.isoformat()}, "
        f"{len(sigs)} signature(s): {', '.join(s[:16] for s in sigs)}"
    )
    c = m.compatibility
    click.echo(
        f"runtime {c.runtime} >= {c.min_runtime_version}, arch {','.join(c.arch)}, "
        f"accelerator {c.accelerator}"
        + (f", cpu features {' '.join(c.cpu_features)}" if c.cpu_features else "")
    )
    for t in m.inputs.tensors:
        dims = ",".join(str(d.size) if d.size else f"{d.min}..{d.max}" for d in t.shape)
        click.echo(
            f"input {t.name}: {t.dtype}[{dims}] nan={t.nan_policy} "
            f"preprocessing={t.preprocessing.kind}"
        )
    click.echo(
        f"output: {m.outputs.task} {', '.join(m.outputs.outputs)}"
        + (f" labels={len(m.outputs.labels)}" if m.outputs.labels else "")
    )
    click.echo(
        f"golden samples: {len(m.golden)}; baseline tensors: "
        f"{', '.join([*m.baseline.inputs, *m.baseline.outputs])}"
    )
    table = m.report.get("table")
    if isinstance(table, str):
        click.echo(table)


@cli.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--root",
    "root_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Trusted root metadata (v1 as provisioned).",
)
@click.option(
    "--root-update",
    "updates",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Newer root versions, in order.",
)
@click.option(
    "--keystore",
    "keystore_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Use the key store's root chain instead of --root.",
)
@click.option("--arch", default=None, help="Also check compatibility with this architecture.")
@click.option(
    "--runtime-version", default=None, help="Runtime version of the target device (with --arch)."
)
@click.option(
    "--cpu-features",
    default=None,
    help="The device's CPU flags, space or comma separated (with --arch; default: unchecked).",
)
@click.option("--installed-version", type=int, default=None)
@json_option
def verify(
    bundle: Path,
    root_path: Path | None,
    updates: tuple[Path, ...],
    keystore_dir: Path | None,
    arch: str | None,
    runtime_version: str | None,
    cpu_features: str | None,
    installed_version: int | None,
    as_json: bool,
) -> None:
    """Verify BUNDLE against a root of trust, as a device would."""
    if keystore_dir is not None:
        root = KeyStore.open(keystore_dir).trusted_root()
    elif root_path is not None:
        root = TrustedRoot.from_chain(root_path.read_bytes(), [p.read_bytes() for p in updates])
    else:
        raise click.UsageError("give --root or --keystore")
    device = None
    if arch is not None:
        if runtime_version is None:
            raise click.UsageError("--arch needs --runtime-version (the device's runtime)")
        # The device is described without reading the (still unverified) manifest.
        device = DeviceProfile(
            arch=arch,
            runtimes={"onnxruntime": runtime_version, "litert": runtime_version},
            cpu_features=None
            if cpu_features is None
            else frozenset(cpu_features.replace(",", " ").lower().split()),
        )
    loaded = read_bundle(
        bundle, root, now=_now(), installed_version=installed_version, device=device
    )
    echo_verdict(loaded, root, device, as_json)


@cli.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@keystore_option
@click.option("--key", "labels", multiple=True, required=True, help="Key label to sign with.")
def sign(bundle: Path, keystore_dir: Path, labels: tuple[str, ...]) -> None:
    """Add co-signatures to BUNDLE (for targets thresholds above one)."""
    n = cosign_bundle(bundle, KeyStore.open(keystore_dir, passphrase_from_env()), labels)
    click.echo(f"{bundle} now carries {n} signature(s)")


@cli.command("agent-package")
@keystore_option
@click.option("--release", type=int, required=True, help="Release number (only grows).")
@click.option(
    "--wheel",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="An edgefleet wheel; without it, one is built from --source with pip wheel --no-deps.",
)
@click.option(
    "--source",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=Path(),
    show_default=True,
    help="The edgefleet source tree to build the wheel from.",
)
@click.option("--python", "python", default=None, help="major.minor (default: this Python).")
@click.option("--arch", "arch", multiple=True, default=("any",), show_default=True)
@click.option("--min-config-schema", type=int, default=1, show_default=True)
@click.option("--expires-days", default=365, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def agent_package(
    keystore_dir: Path,
    release: int,
    wheel: Path | None,
    source: Path,
    python: str | None,
    arch: tuple[str, ...],
    min_config_schema: int,
    expires_days: int,
    out: Path,
) -> None:
    """Sign the agent's own software as an agent package (OUT/edgefleet-agent-RELEASE.efa)."""
    store = KeyStore.open(keystore_dir, passphrase_from_env())
    if wheel is None:
        wheel = build_wheel(source, out)
    py = python or f"{sys.version_info.major}.{sys.version_info.minor}"
    rel = agent_release_for(
        wheel, release=release, python=py, arch=arch, min_config_schema=min_config_schema
    )
    data = package_agent(wheel, rel, store, now=_now(), expires_days=expires_days)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"edgefleet-agent-{release}{AGENT_PACKAGE_SUFFIX}"
    write_bundle(target, data)
    click.echo(f"{target}: agent release {release}, edgefleet {rel.version}, Python {py}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: the CLI behind the error boundary."""
    run_cli(cli, ERRORS, argv)
