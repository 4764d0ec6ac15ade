"""``fleet-server``: the fleet operator's command line.

Identity and access: the fleet CA (``ca``: the server's and read-only consumers' identities,
``server-identity``/``consumer-identity``), device enrollment and revocation (``devices``) and
the broker configuration (``broker-config``: consumers included, ``acl.local`` kept),
provisioning claims and the CA's online service (``claims``, ``ca serve``: in
``fleet_server.cli.certs``). The
server itself: ``serve --config FILE`` (``fleet_server.server.run``). Operator commands against
a running server's admin API (``devices list|show|register|misbehaviour``, ``models``,
``assign``, ``waves``, ``telemetry``, ``status``) live in ``fleet_server.cli.admin``, evaluation
sets (``evalsets``) in ``fleet_server.cli.evalsets``, the audit log (``audit list|export``) in
``fleet_server.cli.audit``, accounts and API tokens (``accounts``, ``tokens``) in
``fleet_server.cli.accounts``, remote diagnostics (``devices ping|logs|support-bundle|restart|
health-check|commands``) in ``fleet_server.cli.diagnostics``, capture upload and datasets
(``capture``, ``datasets``) in ``fleet_server.cli.capture``. Commands
are thin; the error boundary in ``edge_agent.cli.support`` maps our errors to exit codes by the
one error table (``fleet_server.errors.ERRORS``).

``devices revoke`` revokes the device's certificates at the CA (what the broker enforces) and,
when an admin token is available (``--token`` / ``EDGEFLEET_ADMIN_TOKEN``), also marks the
device revoked on the server so nothing new is assigned to it. ``--server`` makes that step
mandatory (a usage error without a token), ``--no-server`` skips it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from edge_agent import __version__
from edge_agent.cli.support import passphrase_from_env, run_cli
from edge_agent.common.durable import write_atomic
from fleet_server.admin.client import DEFAULT_ADMIN_URL, AdminClient
from fleet_server.cli.accounts import register_account_commands
from fleet_server.cli.admin import register_admin_commands
from fleet_server.cli.agent import register_agent_commands
from fleet_server.cli.audit import register_audit_commands
from fleet_server.cli.capture import register_capture_commands
from fleet_server.cli.certs import register_cert_commands
from fleet_server.cli.diagnostics import register_diagnostics_commands
from fleet_server.cli.drift import register_drift_commands
from fleet_server.cli.evalsets import register_evalset_commands
from fleet_server.cli.labels import register_label_commands
from fleet_server.cli.rollouts import register_rollout_commands
from fleet_server.cli.root import register_root_commands
from fleet_server.errors import ERRORS
from fleet_server.pki.broker_config import BrokerConfig, write_broker_config
from fleet_server.pki.ca import CertificateAuthority

F = TypeVar("F", bound=Callable[..., Any])


def ca_dir_option(func: F) -> F:
    """The ``--ca-dir`` option every CA-using command shares (env ``EDGEFLEET_CA_DIR``)."""
    return click.option(
        "--ca-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="EDGEFLEET_CA_DIR",
        required=True,
        help="Directory of the fleet CA (ca.key, ca.crt, state.json, crl.pem).",
    )(func)


def _now() -> datetime:
    return datetime.now(UTC)


@click.group()
@click.version_option(__version__, prog_name="fleet-server")
def cli() -> None:
    """edgefleet fleet server."""


@cli.group()
def ca() -> None:
    """The fleet's certificate authority."""


@ca.command("init")
@click.option(
    "--ca-dir",
    "--dir",
    "directory",
    envvar="EDGEFLEET_CA_DIR",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to create the CA.",
)
@click.option("--name", default="edgefleet fleet CA", show_default=True, help="CA common name.")
@click.option("--days", type=click.IntRange(1), default=3650, show_default=True)
def ca_init(directory: Path, name: str, days: int) -> None:
    """Create a new fleet CA (EC P-256, pathlen 0) and an empty CRL in DIR."""
    authority = CertificateAuthority.init(
        directory, now=_now(), common_name=name, validity=timedelta(days=days)
    )
    click.echo(str(authority.cert_path))


@ca.command("server-identity")
@ca_dir_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--name", default="fleet.server", show_default=True, help="Server CN.")
def ca_server_identity(ca_dir: Path, out: Path, name: str) -> None:
    """Issue the fleet server's own MQTT client key and certificate into OUT."""
    pair = CertificateAuthority.open(ca_dir).issue_server_identity(name, now=_now())
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "server.key", pair.key_pem, mode=0o600)
    write_atomic(out / "server.crt", pair.cert_pem)
    click.echo(str(out / "server.crt"))


@ca.command("consumer-identity")
@ca_dir_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.argument("name")
def ca_consumer_identity(ca_dir: Path, out: Path, name: str) -> None:
    """Issue a read-only telemetry consumer's MQTT key and certificate (NAME: <label>.consumer).

    The next ``broker-config`` grants it read access to every device's telemetry, events,
    status and reported topics, and nothing else; ``devices revoke NAME --no-server`` revokes it.
    """
    pair = CertificateAuthority.open(ca_dir).issue_consumer_identity(name, now=_now())
    out.mkdir(parents=True, exist_ok=True)
    stem = name.removesuffix(".consumer")
    write_atomic(out / f"{stem}.key", pair.key_pem, mode=0o600)
    write_atomic(out / f"{stem}.crt", pair.cert_pem)
    click.echo(str(out / f"{stem}.crt"))


@ca.command("crl")
@ca_dir_option
@click.option("--days", type=click.IntRange(1), default=30, show_default=True)
def ca_crl(ca_dir: Path, days: int) -> None:
    """Re-sign the CRL (run well before its next update; the broker refuses all after it)."""
    authority = CertificateAuthority.open(ca_dir)
    authority.write_crl(now=_now(), validity=timedelta(days=days))
    click.echo(str(authority.crl_path))


@cli.group()
def devices() -> None:
    """Enroll and revoke devices."""


@devices.command("token")
@ca_dir_option
@click.argument("device_id")
@click.option("--ttl-hours", type=click.IntRange(1), default=24, show_default=True)
def devices_token(ca_dir: Path, device_id: str, ttl_hours: int) -> None:
    """Print a one-time enrollment token for DEVICE_ID (shown once, stored hashed)."""
    authority = CertificateAuthority.open(ca_dir)
    click.echo(authority.create_token(device_id, now=_now(), ttl=timedelta(hours=ttl_hours)))


@devices.command("enroll")
@ca_dir_option
@click.option("--csr", type=click.Path(dir_okay=False, exists=True, path_type=Path), required=True)
@click.option("--device-id", help="Device id the CSR's CN must equal (operator mode).")
@click.option("--token", help="One-time enrollment token (token mode; names the device).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--days", type=click.IntRange(1), default=365, show_default=True)
def devices_enroll(
    ca_dir: Path, csr: Path, device_id: str | None, token: str | None, out: Path, days: int
) -> None:
    """Check and sign a device CSR; write the device certificate to OUT."""
    if (device_id is None) == (token is None):
        raise click.UsageError("give exactly one of --device-id and --token")
    authority = CertificateAuthority.open(ca_dir)
    validity = timedelta(days=days)
    csr_pem = csr.read_bytes()
    if token is not None:
        cert = authority.redeem_token(token, csr_pem, now=_now(), validity=validity)
    else:
        assert device_id is not None
        cert = authority.sign_csr(csr_pem, device_id, now=_now(), validity=validity)
    write_atomic(out, cert)
    click.echo(str(out))


@devices.command("revoke")
@ca_dir_option
@click.argument("device_id")
@click.option(
    "--server/--no-server",
    default=None,
    help="Also mark the device revoked on the server (default: when a token is given).",
)
@click.option("--url", envvar="EDGEFLEET_ADMIN_URL", default=DEFAULT_ADMIN_URL, show_default=True)
@click.option("--token", envvar="EDGEFLEET_ADMIN_TOKEN", default=None, help="Admin token.")
def devices_revoke(
    ca_dir: Path, device_id: str, server: bool | None, url: str, token: str | None
) -> None:
    """Revoke every certificate of DEVICE_ID and rewrite the CRL (then SIGHUP the broker)."""
    notify = server if server is not None else token is not None
    if notify and token is None:
        raise click.UsageError("--server needs --token (or EDGEFLEET_ADMIN_TOKEN)")
    authority = CertificateAuthority.open(ca_dir)
    serials = authority.revoke(device_id, now=_now())
    click.echo(f"revoked {len(serials)} certificate(s) of {device_id}; CRL {authority.crl_path}")
    if notify:
        assert token is not None
        with AdminClient(url, token) as client:
            client.revoke(device_id)
        click.echo(f"server: {device_id} marked revoked")


@cli.command("broker-config")
@ca_dir_option
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8883, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Listener address.")
@click.option("--prefix", default="edgefleet", show_default=True, help="Topic prefix.")
@click.option("--server-cn", default="fleet.server", show_default=True)
@click.option(
    "--worker-cn",
    "worker_cns",
    multiple=True,
    help="Identity of a further server worker (repeatable; each needs its own certificate).",
)
@click.option(
    "--consumer-cn",
    "consumer_cns",
    multiple=True,
    help="Read-only consumer identity (repeatable; those issued by 'ca consumer-identity' "
    "are included anyway).",
)
@click.option("--dns-name", "dns_names", multiple=True, help="Broker DNS name (repeatable).")
@click.option("--ip", "ips", multiple=True, help="Broker IP address (repeatable).")
@click.option("--persistence/--no-persistence", default=False, show_default=True)
@click.option("--user", "run_as_user", default=None, help="User Mosquitto runs as if root.")
def broker_config(
    ca_dir: Path,
    directory: Path,
    port: int,
    host: str,
    prefix: str,
    server_cn: str,
    worker_cns: tuple[str, ...],
    consumer_cns: tuple[str, ...],
    dns_names: tuple[str, ...],
    ips: tuple[str, ...],
    persistence: bool,
    run_as_user: str | None,
) -> None:
    """Write a Mosquitto 2.0 config, ACL file and broker certificate into DIR.

    The ACL ends with DIR/acl.local, the operator's own rules: created empty once and never
    overwritten, so hand-added rules survive the next run.
    """
    config = BrokerConfig(
        host=host,
        port=port,
        prefix=prefix,
        server_cn=server_cn,
        worker_cns=worker_cns,
        consumer_cns=consumer_cns,
        dns_names=dns_names or ("localhost",),
        ip_addresses=ips or ("127.0.0.1",),
        persistence=persistence,
        run_as_user=run_as_user,
    )
    files = write_broker_config(directory, CertificateAuthority.open(ca_dir), config, now=_now())
    click.echo(str(files.conf))


@cli.command("serve")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    envvar="EDGEFLEET_SERVER_CONFIG",
    required=True,
    help="Server TOML (see deploy/fleet-server.example.toml); env EDGEFLEET_SERVER__* overrides.",
)
def serve(config_path: Path) -> int:
    """Run the fleet server (MQTT gateway + admin API) until SIGTERM/SIGINT."""
    import logging

    from fleet_server.config import load_config
    from fleet_server.server import run

    config = load_config(config_path)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run(config, passphrase=passphrase_from_env())


register_admin_commands(cli, devices)
register_drift_commands(cli)
register_rollout_commands(cli)
register_evalset_commands(cli)
register_root_commands(cli)
register_agent_commands(cli)
register_audit_commands(cli)
register_account_commands(cli)
register_diagnostics_commands(devices)
register_label_commands(cli, devices)
register_cert_commands(cli, ca)
register_capture_commands(cli)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: the CLI behind the error boundary."""
    run_cli(cli, ERRORS, argv=argv)
