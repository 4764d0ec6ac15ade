"""Mosquitto 2.0 configuration for the fleet: TLS with client certificates, ACLs, queue limits.

Owns what the broker enforces: a TLS listener that requires a certificate from the fleet CA,
takes the client's identity (username *and* client id) from the certificate CN, checks the
CA's CRL, and confines each device to its own topics by ACL, while the fleet server's identity
gets the whole prefix (shared subscriptions included) and each read-only consumer identity
(``<label>.consumer``, see ``CertificateAuthority.issue_consumer_identity``) may read the
devices' telemetry, events, status and reported topics and write nothing. Operator ACL rules
live in ``acl.local`` next to the generated ``acl``: created empty once, never overwritten,
appended to every generated ACL. ``render_*`` are pure; only ``write_broker_config`` touches
files (and asks the CA for the broker's certificate).

Limits (Mosquitto 2.0 has them globally, for every client): ``message_size_limit`` and
``max_packet_size`` bound one message (the largest legitimate one is a cloud-fallback request,
``edge_agent.wire.fallback.MAX_MESSAGE_BYTES``), so no client can leave megabytes of retained
garbage; ``max_inflight_messages`` is also the MQTT v5 receive maximum a client may have
unacknowledged QoS 1 messages towards the broker; ``max_queued_messages`` and
``max_queued_bytes`` bound what the broker holds for one slow client (the server's own backlog
after a pause must fit). Mosquitto has no per-client publish rate limit: a QoS 0 flood faster
than the server drains fills the server's queue, and while it lasts the broker drops messages
for the server from every device (and, in 2.0, the PUBACKs of the server's own publishes: the
gateway acknowledges telemetry at QoS 0 so a lost PUBACK cannot freeze its outgoing window).
The bound on that queue makes the damage end with the flood; the gateway's per-device token
bucket and fair queues are the second line (``fleet_server.gateway.gateway``). A broker with
per-client
rate limits (EMQX, VerneMQ) confines a flood to its sender.

Does not start or signal the broker; a supervisor (systemd, the demo, the test fixture) does.
The broker re-reads the CRL on SIGHUP: reload it after a revocation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from edge_agent.common.durable import write_atomic
from edge_agent.errors import ContractError
from edge_agent.wire.fallback import MAX_MESSAGE_BYTES as _FALLBACK_MAX
from edge_agent.wire.topics import DEVICE_TO_SERVER, SERVER_TO_DEVICE, TOPIC_SPECS, Topics
from fleet_server.errors import BrokerConfigError
from fleet_server.pki.ca import CertificateAuthority
from fleet_server.pki.certs import CONSUMER_NAME_PATTERN, SERVER_NAME_PATTERN

__all__ = [
    "CONSUMER_READ_TOPICS",
    "DEVICE_READ_TOPICS",
    "DEVICE_WRITE_TOPICS",
    "BrokerConfig",
    "BrokerFiles",
    "render_acl",
    "render_mosquitto_conf",
    "write_broker_config",
]

# Per-device topics, relative to ``<prefix>/devices/<device id>/``, from the topic tree
# (``edge_agent.wire.topics``, its one owner). Devices publish what ``TOPIC_SPECS`` says a device
# publishes (state, telemetry, events, status, also their last will, and requests); they read
# what the server addresses to them. Nothing else under another device's id is readable or
# writable.
DEVICE_WRITE_TOPICS = tuple(TOPIC_SPECS[k].filter_suffix for k in DEVICE_TO_SERVER)
DEVICE_READ_TOPICS = tuple(TOPIC_SPECS[k].filter_suffix for k in SERVER_TO_DEVICE)
# What a read-only consumer may read, of every device (the broker's policy, in topic kinds).
CONSUMER_READ_TOPICS = tuple(
    TOPIC_SPECS[k].filter_suffix for k in ("telemetry", "events", "status", "reported")
)
#: The largest message any fleet client sends (a cloud-fallback request), plus headroom.
DEFAULT_MESSAGE_SIZE_LIMIT = _FALLBACK_MAX + 64 * 1024
LOCAL_ACL = "acl.local"
_LOCAL_ACL_HEADER = (
    "# Operator ACL rules, appended to the generated acl by every fleet-server broker-config.\n"
    "# This file is never overwritten. Start each block with a 'user <name>' (or 'pattern')\n"
    "# line; a bare 'topic' line here would extend the last generated user's rights.\n"
)

# Used with ``fullmatch`` (``re.match`` + ``$`` lets a trailing newline into the config file).
_USER = re.compile(r"[A-Za-z0-9._-]{1,32}")
_HOST = re.compile(r"[A-Za-z0-9.:-]{1,253}")


@dataclass(frozen=True)
class BrokerConfig:
    """What ``fleet-server broker-config`` writes. Defaults suit one host and tests."""

    host: str = "127.0.0.1"
    port: int = 8883
    prefix: str = "edgefleet"
    server_cn: str = "fleet.server"
    # Further server workers, each with its own certificate and therefore its own client id
    # (use_username_as_clientid: two workers sharing one identity would keep kicking each
    # other off). Every one gets the server's rights.
    worker_cns: tuple[str, ...] = ()
    # Read-only consumers (``<label>.consumer``): telemetry, events, status, reported.
    consumer_cns: tuple[str, ...] = ()
    dns_names: tuple[str, ...] = ("localhost",)
    ip_addresses: tuple[str, ...] = ("127.0.0.1",)
    persistence: bool = False
    # Per client. Bounds the QoS 1 backlog kept for an offline client (the server's backlog
    # after a pause: beyond it messages are dropped and devices resend) AND, in Mosquitto 2.0,
    # the packets waiting on an online client's socket: past it every packet for that client is
    # dropped, PUBACKs included. A QoS 0 flood fills exactly that much of the server's queue,
    # so the larger the value, the longer the server works off a flood's backlog afterwards.
    max_queued_messages: int = 10_000
    max_queued_bytes: int = 512 * 1024 * 1024
    max_inflight_messages: int = 200
    message_size_limit: int = DEFAULT_MESSAGE_SIZE_LIMIT
    # Mosquitto started as root switches to this user (default "mosquitto") before reading
    # the certificate files; None leaves the broker's default.
    run_as_user: str | None = None
    extra_listener_lines: tuple[str, ...] = field(default=())

    def validate(self) -> None:
        """Check every field that ends up in the config files.

        Raises:
            BrokerConfigError: a field would produce a broken or unsafe configuration.
        """
        if not 0 < self.port < 65536:
            raise BrokerConfigError(f"port {self.port} is out of range")
        if not _HOST.fullmatch(self.host):
            raise BrokerConfigError(f"invalid listener host {self.host!r}")
        try:  # the one prefix rule (agents, the server's gateway): no wildcards, '$' or '%'
            Topics.check_prefix(self.prefix)
        except ContractError as exc:
            raise BrokerConfigError(str(exc)) from exc
        for cn in (self.server_cn, *self.worker_cns):
            if not SERVER_NAME_PATTERN.fullmatch(cn):
                raise BrokerConfigError(
                    f"invalid server identity name {cn!r}: use '<label>.server' (a name "
                    "no device id can take, since the broker grants it the whole topic tree)"
                )
        for cn in self.consumer_cns:
            if not CONSUMER_NAME_PATTERN.fullmatch(cn):
                raise BrokerConfigError(
                    f"invalid consumer identity name {cn!r}: use '<label>.consumer'"
                )
        if self.max_queued_messages < 0 or self.max_inflight_messages < 0:
            raise BrokerConfigError("queue limits must be >= 0")
        if self.max_queued_bytes < 0:
            raise BrokerConfigError("max_queued_bytes must be >= 0")
        if not 64 * 1024 <= self.message_size_limit <= 256 * 1024 * 1024:
            raise BrokerConfigError(
                f"message_size_limit {self.message_size_limit} is out of range (64 KiB - 256 MiB)"
            )
        if self.run_as_user is not None and not _USER.fullmatch(self.run_as_user):
            raise BrokerConfigError(f"invalid user {self.run_as_user!r}")
        if not self.dns_names and not self.ip_addresses:
            raise BrokerConfigError("the broker needs at least one DNS name or IP address")


@dataclass(frozen=True)
class BrokerFiles:
    """Where ``write_broker_config`` put things."""

    conf: Path
    acl: Path
    cafile: Path
    certfile: Path
    keyfile: Path
    crlfile: Path


def render_acl(
    prefix: str,
    server_cn: str,
    worker_cns: tuple[str, ...] = (),
    consumer_cns: tuple[str, ...] = (),
    local: str = "",
) -> str:
    """The ACL file: pattern rules per device (``%u`` = certificate CN), the server users, the
    read-only consumers, then the operator's ``local`` rules verbatim.

    Pattern rules apply to every user, so the server's CN also matches them; that grants it
    nothing beyond its own ``user`` section. A consumer's CN would match them too (write on
    ``<prefix>/devices/<consumer>/...``, read on broadcasts): its section denies exactly that,
    and deny rules win over every grant.

    Raises:
        BrokerConfigError: ``local`` would attach rules to a generated user (a ``topic`` line
            before its first ``user``/``pattern`` line).
    """
    _check_local(local)
    lines = [
        "# Written by fleet-server broker-config; regenerate rather than edit.",
        "# Devices: username = certificate CN = device id (use_identity_as_username).",
    ]
    base = f"{prefix}/devices/%u"
    lines += [f"pattern write {base}/{t}" for t in DEVICE_WRITE_TOPICS]
    lines += [f"pattern read {base}/{t}" for t in DEVICE_READ_TOPICS]
    lines += [
        f"pattern read {prefix}/broadcast/#",
        "",
        "# The fleet server (and its workers): everything under the prefix, plain or shared.",
    ]
    for cn in (server_cn, *worker_cns):
        lines += [f"user {cn}", f"topic readwrite {prefix}/#", f"topic read $share/+/{prefix}/#"]
    if consumer_cns:
        lines += ["", "# Read-only consumers: device telemetry, events, status, reported."]
    for cn in consumer_cns:
        lines += [
            f"user {cn}",
            f"topic deny {prefix}/devices/{cn}/#",
            f"topic deny {prefix}/broadcast/#",
        ]
        for t in CONSUMER_READ_TOPICS:
            lines += [
                f"topic read {prefix}/devices/+/{t}",
                f"topic read $share/+/{prefix}/devices/+/{t}",
            ]
    if local.strip():
        lines += ["", f"# ---- {LOCAL_ACL} (operator rules, kept across regenerations) ----"]
        lines += local.rstrip("\n").split("\n")
    lines.append("")
    return "\n".join(lines)


def _check_local(local: str) -> None:
    for raw in local.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.split()[0] in ("user", "pattern"):
            return
        raise BrokerConfigError(
            f"{LOCAL_ACL}: the first rule must be a 'user' or 'pattern' line, not {line!r} "
            "(it would extend the rights of the last generated user)"
        )


def render_mosquitto_conf(config: BrokerConfig, files: BrokerFiles, data_dir: Path) -> str:
    """The mosquitto.conf text for ``config`` with the given file locations.

    Raises:
        BrokerConfigError: invalid settings, or a path Mosquitto cannot parse (whitespace).
    """
    config.validate()
    paths = [files.acl, files.cafile, files.certfile, files.keyfile, files.crlfile, data_dir]
    for p in paths:
        if any(ch.isspace() for ch in str(p)):
            raise BrokerConfigError(f"Mosquitto cannot use a path with whitespace: {p}")
    lines = [
        "# Written by fleet-server broker-config; regenerate rather than edit.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {files.acl}",
        # Without it every request/response round trip waits on delayed ACKs (~40-90 ms).
        "set_tcp_nodelay true",
        f"max_queued_messages {config.max_queued_messages}",
        f"max_queued_bytes {config.max_queued_bytes}",
        f"max_inflight_messages {config.max_inflight_messages}",
        f"message_size_limit {config.message_size_limit}",
        # The whole packet: payload plus topic and properties.
        f"max_packet_size {config.message_size_limit + 64 * 1024}",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
    ]
    if config.persistence:
        lines += ["persistence true", f"persistence_location {data_dir}/"]
    else:
        lines.append("persistence false")
    if config.run_as_user is not None:
        lines.append(f"user {config.run_as_user}")
    lines += [
        "",
        f"listener {config.port} {config.host}",
        f"cafile {files.cafile}",
        f"certfile {files.certfile}",
        f"keyfile {files.keyfile}",
        f"crlfile {files.crlfile}",
        "tls_version tlsv1.2",
        "require_certificate true",
        # Identity comes from the certificate; the client id is forced to it, so one device
        # can neither claim another's topics nor kick another's session.
        "use_identity_as_username true",
        "use_username_as_clientid true",
        *config.extra_listener_lines,
        "",
    ]
    return "\n".join(lines)


def write_broker_config(
    directory: Path, ca: CertificateAuthority, config: BrokerConfig, *, now: datetime
) -> BrokerFiles:
    """Write ``mosquitto.conf``, ``acl``, the broker's key and certificate into ``directory``.

    The CA certificate and CRL are referenced where the CA keeps them, so a revocation
    (which rewrites the CRL) needs only a broker reload (SIGHUP), not a new configuration.
    The ACL grants ``config.consumer_cns`` plus every unrevoked consumer identity of ``ca``,
    and ends with the operator's ``acl.local`` (created empty if missing, never written over).

    Raises:
        BrokerConfigError: invalid settings or paths, or an ``acl.local`` that cannot be
            appended safely.
        PkiError: the CA cannot issue the broker certificate.
        OSError: the files cannot be written.
    """
    config.validate()
    directory = Path(directory).resolve()
    files = BrokerFiles(
        conf=directory / "mosquitto.conf",
        acl=directory / "acl",
        cafile=ca.cert_path.resolve(),
        certfile=directory / "broker.crt",
        keyfile=directory / "broker.key",
        crlfile=ca.crl_path.resolve(),
    )
    conf_text = render_mosquitto_conf(config, files, directory)
    directory.mkdir(parents=True, exist_ok=True)
    local_path = directory / LOCAL_ACL
    if not local_path.exists():
        write_atomic(local_path, _LOCAL_ACL_HEADER.encode())
    local = local_path.read_text(encoding="utf-8")
    consumers = tuple(sorted({*config.consumer_cns, *ca.consumers()}))
    acl_text = render_acl(config.prefix, config.server_cn, config.worker_cns, consumers, local)
    pair = ca.issue_broker_identity(
        dns_names=config.dns_names, ip_addresses=config.ip_addresses, now=now
    )
    write_atomic(files.keyfile, pair.key_pem, mode=0o600)
    write_atomic(files.certfile, pair.cert_pem)
    write_atomic(files.acl, acl_text.encode())
    write_atomic(files.conf, conf_text.encode())
    return files
