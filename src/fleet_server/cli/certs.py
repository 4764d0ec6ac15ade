"""``fleet-server claims create|list|revoke|approve`` and ``fleet-server ca serve``.

``claims``: provisioning claims in the CA directory (``fleet_server.pki.claims``): a batch
credential with a device limit, an expiry and optional approval; the secret is printed once.

``ca serve``: the CA's online half, run where the CA key lives (not necessarily beside the
gateway): the certificate renewal service on MQTT (``fleet_server.pki.renewal``, with a server
identity of its own and a shared subscription) and, with ``--enroll-port``, the claim
enrollment listener over TLS (``fleet_server.admin.ops.enrollment``). After every revocation it
runs the CRL reload (``--crl-reload-command`` or ``--broker-pid-file``), and it re-signs the
CRL daily (it is valid 30 days; an expired CRL makes the broker refuse every client). With an
admin URL and token it asks the fleet server whether a renewing device is enrolled and not
revoked, and registers claim-enrolled devices (group = the claim's name). Commands are thin:
the library decides.
"""

from __future__ import annotations

import shlex
import signal
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.x509.oid import NameOID

from edge_agent.common.durable import write_atomic
from edge_agent.common.mqtt import MqttClient
from edge_agent.common.mqtt_types import MqttConfig
from fleet_server.admin.client import AdminClient
from fleet_server.admin.ops.enrollment import EnrollmentServer, create_enrollment_app
from fleet_server.errors import AdminRequestError, PkiError
from fleet_server.pki.ca import CertificateAuthority
from fleet_server.pki.crl_reload import CoalescedReload, command_reloader, pidfile_reloader
from fleet_server.pki.renewal import RenewalService

__all__ = ["register_cert_commands"]


CRL_REFRESH = timedelta(days=1)


def _now() -> datetime:
    return datetime.now(UTC)


_CA_DIR = click.option(
    "--ca-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="EDGEFLEET_CA_DIR",
    required=True,
    help="Directory of the fleet CA.",
)


@click.group()
def claims() -> None:
    """Provisioning claims: one enrollment credential for a production batch."""


@claims.command("create")
@_CA_DIR
@click.argument("name")
@click.option("--limit", type=click.IntRange(1), required=True, help="Most devices it enrolls.")
@click.option("--hours", type=click.IntRange(1), default=24 * 30, show_default=True)
@click.option("--approval/--no-approval", default=False, show_default=True)
def claims_create(ca_dir: Path, name: str, limit: int, hours: int, approval: bool) -> None:
    """Create claim NAME and print its secret (shown once; put it in the batch's claim.json)."""
    secret = CertificateAuthority.open(ca_dir).create_claim(
        name, now=_now(), ttl=timedelta(hours=hours), limit=limit, require_approval=approval
    )
    click.echo(secret)


@claims.command("list")
@_CA_DIR
def claims_list(ca_dir: Path) -> None:
    """Every claim: state, enrolled/limit, pending, expiry."""
    now = _now()
    for c in CertificateAuthority.open(ca_dir).claims():
        waiting = [p.device_id for p in c.pending if p.approved_at is None]
        click.echo(
            f"{c.name}\t{c.state(now)}\t{len(c.enrolled)}/{c.limit}\t"
            f"pending={len(waiting)}\tapproval={'yes' if c.require_approval else 'no'}\t"
            f"expires={c.expires_at.isoformat(timespec='seconds')}"
        )
        for device_id in waiting[:50]:
            click.echo(f"  pending {device_id}")


@claims.command("revoke")
@_CA_DIR
@click.argument("name")
def claims_revoke(ca_dir: Path, name: str) -> None:
    """Stop further enrollments under NAME (enrolled devices keep their certificates)."""
    CertificateAuthority.open(ca_dir).revoke_claim(name, now=_now())
    click.echo(f"claim {name} revoked")


@claims.command("approve")
@_CA_DIR
@click.argument("name")
@click.argument("device_ids", nargs=-1)
@click.option("--all", "approve_all", is_flag=True, help="Approve every pending device.")
def claims_approve(ca_dir: Path, name: str, device_ids: tuple[str, ...], approve_all: bool) -> None:
    """Approve pending DEVICE_IDS under claim NAME (or --all of them)."""
    if bool(device_ids) == approve_all:
        raise click.UsageError("name the devices to approve, or give --all")
    record = CertificateAuthority.open(ca_dir).approve_claim(name, device_ids, now=_now())
    approved = [p.device_id for p in record.pending if p.approved_at is not None]
    click.echo(f"approved {len(approved)} device(s) under {name}")


def _common_name(cert_path: Path) -> str:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read {cert_path}: {exc}") from exc
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise PkiError(f"{cert_path} has no single common name")
    return names[0].value


def _registry_check(admin: AdminClient) -> Any:
    def allowed(device_id: str) -> str | None:
        try:
            device = admin.device(device_id)
        except AdminRequestError as exc:
            return "not_enrolled" if exc.status == 404 else "unavailable"
        return "revoked" if device.get("revoked_at") else None

    return allowed


@click.command("serve")
@_CA_DIR
@click.option("--broker-host", default="127.0.0.1", show_default=True)
@click.option("--broker-port", type=click.IntRange(1, 65535), default=8883, show_default=True)
@click.option("--prefix", default="edgefleet", show_default=True)
@click.option(
    "--identity-dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    required=True,
    help="server.crt/server.key of this service's identity (e.g. 'ca server-identity "
    "--name ca.server'; give it to broker-config with --worker-cn).",
)
@click.option("--device-days", type=click.IntRange(1), default=365, show_default=True)
@click.option("--crl-reload-command", default=None, help="Run after each revocation.")
@click.option("--broker-pid-file", type=click.Path(path_type=Path), default=None)
@click.option(
    "--crl-reload-interval",
    type=click.FloatRange(0),
    default=60.0,
    show_default=True,
    help="Gather revocations for this long into one broker reload (a renewed device has "
    "already left its old certificate, so this is not urgent).",
)
@click.option("--enroll-host", default="0.0.0.0", show_default=True)  # noqa: S104
@click.option("--enroll-port", type=click.IntRange(0, 65535), default=0, help="0: no listener.")
@click.option("--enroll-dns-name", "enroll_dns", multiple=True, help="Listener DNS name.")
@click.option("--enroll-ip", "enroll_ips", multiple=True, help="Listener IP address.")
@click.option("--admin-url", envvar="EDGEFLEET_ADMIN_URL", default=None)
@click.option("--token", envvar="EDGEFLEET_ADMIN_TOKEN", default=None, help="Admin token.")
def ca_serve(
    ca_dir: Path,
    broker_host: str,
    broker_port: int,
    prefix: str,
    identity_dir: Path,
    device_days: int,
    crl_reload_command: str | None,
    broker_pid_file: Path | None,
    crl_reload_interval: float,
    enroll_host: str,
    enroll_port: int,
    enroll_dns: tuple[str, ...],
    enroll_ips: tuple[str, ...],
    admin_url: str | None,
    token: str | None,
) -> None:
    """Serve certificate renewal (MQTT) and claim enrollment (HTTPS) until SIGTERM."""
    if crl_reload_command and broker_pid_file:
        raise click.UsageError("give --crl-reload-command or --broker-pid-file, not both")
    ca = CertificateAuthority.open(ca_dir)
    target = (
        command_reloader(shlex.split(crl_reload_command))
        if crl_reload_command
        else pidfile_reloader(broker_pid_file)
        if broker_pid_file
        else None
    )
    reload = CoalescedReload(target, crl_reload_interval) if target is not None else None
    admin = AdminClient(admin_url, token) if admin_url and token else None
    cert_path, key_path = identity_dir / "server.crt", identity_dir / "server.key"
    client = MqttClient(
        MqttConfig(
            host=broker_host,
            port=broker_port,
            device_id=_common_name(cert_path),
            ca_path=ca.cert_path,
            cert_path=cert_path,
            key_path=key_path,
            prefix=prefix,
            announce_status=False,
        )
    )
    validity = timedelta(days=device_days)
    service = RenewalService(
        ca,
        client,
        prefix=prefix,
        validity=validity,
        allowed=_registry_check(admin) if admin else None,
        crl_changed=reload,
    )
    service.start()
    client.connect()
    listener = None
    if enroll_port:
        pair = ca.issue_broker_identity(
            dns_names=enroll_dns or ("localhost",),
            ip_addresses=enroll_ips or ("127.0.0.1",),
            now=_now(),
        )
        write_atomic(ca_dir / "enroll.key", pair.key_pem, mode=0o600)
        write_atomic(ca_dir / "enroll.crt", pair.cert_pem)

        def register(device_id: str, claim: str) -> None:
            if admin is not None:
                admin.register(device_id, claim, {"claim": claim})

        app = create_enrollment_app(ca, validity=validity, on_enrolled=register)
        listener = EnrollmentServer(
            app,
            enroll_host,
            enroll_port,
            certfile=ca_dir / "enroll.crt",
            keyfile=ca_dir / "enroll.key",
        )
        listener.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_a: stop.set())
    click.echo(f"ca serve: renewal on {broker_host}:{broker_port}, enrollment port {enroll_port}")
    # The broker refuses every client once the CRL's next update has passed: re-sign it daily.
    while not stop.wait(CRL_REFRESH.total_seconds()):
        ca.write_crl(now=_now())
        if reload is not None:
            reload()
    if listener is not None:
        listener.stop()
    client.close()
    if reload is not None:
        reload.close()
    if admin is not None:
        admin.close()
    click.echo(f"ca serve: stopped; {service.counts}")


def register_cert_commands(cli: click.Group, ca: click.Group) -> None:
    """Add ``claims`` to ``cli`` and ``serve`` to the ``ca`` group."""
    cli.add_command(claims)
    ca.add_command(ca_serve)
