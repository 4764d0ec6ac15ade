"""The fleet server's configuration: frozen dataclasses loaded once from TOML plus env overrides.

``load_config(path, env)`` is the only way in: it reads the file, applies overrides of the form
``EDGEFLEET_SERVER__<SECTION>__<KEY>=value`` (values parsed as TOML scalars, so ``true``, ``8``,
``"text"`` and bare strings all work), validates every field and returns a ``ServerConfig``.
Unknown sections or keys are errors: a typo must not silently fall back to a default.

Sections: ``[registry]``, ``[mqtt]``, ``[gateway]`` (``GatewayConfig``: the very object the
gateway takes), ``[api]`` (admin HTTP API), ``[signing]`` (online key, builder root),
``[fallback]``, ``[rollouts]`` and ``[retention]``. Paths left empty default to places under
``registry.state_dir``. Each section is one frozen class with its own ``validate()``; no
section is copied into a second class (``server.run`` hands them on, converting units or names
only where an edge_agent type needs it: the MQTT session, the history policy).

Owns: parsing and validation. Does not own: reading the admin token file or the keys (that is
``fleet_server.server``, at start-up).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from edge_agent.common.config_loader import apply_env, build_section, read_toml
from edge_agent.errors import ContractError
from edge_agent.wire.topics import Topics
from edge_agent.wire.transfer import DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE
from fleet_server.errors import ServerConfigError

__all__ = [
    "ENV_PREFIX",
    "ApiConfig",
    "GatewayConfig",
    "MqttSection",
    "RegistrySection",
    "ServerConfig",
    "SigningConfig",
    "load_config",
]

ENV_PREFIX = "EDGEFLEET_SERVER__"
LOG_LEVELS = ("debug", "info", "warning", "error")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
T = TypeVar("T")


@dataclass(frozen=True)
class RegistrySection:
    """Where the server keeps its state; ``url`` defaults to SQLite under ``state_dir``."""

    state_dir: str = "/var/lib/edgefleet-server"
    url: str = ""

    def validate(self) -> None:
        _check(bool(self.state_dir), "state_dir must not be empty")
        _check(
            self.url == "" or self.url.startswith(("sqlite", "postgresql")),
            "url must be a sqlite:// or postgresql:// URL",
        )


@dataclass(frozen=True)
class MqttSection:
    """How the server reaches the broker (its own X.509 identity, CN = ``client_id``)."""

    host: str = "127.0.0.1"
    port: int = 8883
    ca_path: str = "/etc/edgefleet-server/ca.crt"
    cert_path: str = "/etc/edgefleet-server/server.crt"
    key_path: str = "/etc/edgefleet-server/server.key"
    client_id: str = "fleet.server"
    # How long the broker keeps this worker's session (and queues its share of the shared
    # subscriptions) after a disconnect: enough to ride out a restart, short enough that a
    # dead worker stops receiving telemetry and fallback requests soon (Mosquitto keeps
    # assigning shared messages to an offline member's session until it expires).
    session_expiry: int = 120

    def validate(self) -> None:
        _check(bool(self.host), "host must not be empty")
        _check(0 < self.port < 65536, "port must be 1..65535")
        for name in ("ca_path", "cert_path", "key_path"):
            _check(bool(getattr(self, name)), f"{name} must not be empty")
        _check(bool(_LABEL.fullmatch(self.client_id)), "client_id is not a valid client id")
        _check(0 <= self.session_expiry <= 2**32 - 1, "session_expiry must be 0..4294967295")


@dataclass(frozen=True)
class GatewayConfig:
    """The ``[gateway]`` section: the settings of one gateway worker, exactly as the gateway
    (``fleet_server.gateway.gateway.Gateway``) takes them.

    ``bundles_dir`` is also the bundle library's directory. In the server's TOML, leaving it out
    (or empty) means ``<registry.state_dir>/bundles``; built in code, the default is ``bundles``
    under the working directory.
    """

    prefix: str = "edgefleet"
    share_group: str = "fleet"
    bundles_dir: str | Path = "bundles"
    block_size: int = DEFAULT_BLOCK_SIZE
    broadcast_min_devices: int = 2
    resend_round_seconds: float = 0.05
    max_blocks_per_second: float = 2000.0
    ingest_max_batch: int = 500
    ingest_max_wait_seconds: float = 0.05
    # Per device, messages it may send per second (a token bucket with ``device_burst``): a
    # misbehaving device cannot starve the others. Refused telemetry is not acknowledged, so
    # the device sends it again later; nothing is lost. A backlog of batches drains well within.
    device_rate_per_second: float = 100.0
    device_burst: int = 500
    # Most telemetry messages queued for storage per device (its fair share of the queue).
    device_queue: int = 200
    # A device is online when its status says so and it spoke within this many seconds
    # (agents report every 30 s by default).
    presence_timeout_seconds: float = 120.0
    # Offer devices the packed telemetry encoding in every ack (``packed-1``: about a tenth of
    # the bytes). False keeps every device on JSON, for consumers of the MQTT telemetry topics
    # that read JSON only (``edge_agent.wire.compact.decode_message`` reads both).
    packed_telemetry: bool = True

    def validate(self) -> None:
        """Check every value (``load_config`` does, and so does the gateway it is given to).

        Raises:
            ServerConfigError: a value is out of range, the prefix breaks the topic tree's
                prefix rule (``Topics.check_prefix``) or the share group is not a valid topic
                level; the message names the key.
        """
        try:
            Topics.check_prefix(self.prefix)  # the one prefix rule (agents, broker config)
        except ContractError as exc:
            raise ServerConfigError(f"prefix is not a valid topic prefix: {exc}") from exc
        _check(bool(_LABEL.fullmatch(self.share_group)), "share_group is not a valid name")
        try:
            Topics(self.prefix).shared(self.share_group, "telemetry")
        except ContractError as exc:
            raise ServerConfigError(f"prefix or share_group: {exc}") from exc
        _check(
            16 * 1024 <= self.block_size <= MAX_BLOCK_SIZE,
            f"block_size must be {16 * 1024}..{MAX_BLOCK_SIZE}",
        )
        _check(self.broadcast_min_devices >= 1, "broadcast_min_devices must be >= 1")
        _check(0 < self.resend_round_seconds <= 10, "resend_round_seconds must be in (0, 10]")
        _check(0 < self.max_blocks_per_second < math.inf, "max_blocks_per_second must be positive")
        _check(1 <= self.ingest_max_batch <= 10_000, "ingest_max_batch must be 1..10000")
        _check(0 <= self.ingest_max_wait_seconds <= 10, "ingest_max_wait_seconds must be 0..10")
        _check(
            0 < self.device_rate_per_second < math.inf,
            "device_rate_per_second must be positive",
        )
        _check(self.device_burst >= 1, "device_burst must be >= 1")
        _check(self.device_queue >= 1, "device_queue must be >= 1")
        _check(
            0 < self.presence_timeout_seconds < math.inf,
            "presence_timeout_seconds must be positive",
        )


@dataclass(frozen=True)
class ApiConfig:
    """The admin HTTP API. Give ``token_file`` (preferred) or ``token``: the bootstrap token,
    which acts as the built-in admin (to create the first named accounts); serve refuses
    neither while ``bootstrap_token`` is true. Set ``bootstrap_token = false`` once named
    accounts exist: the configured token is then refused like any unknown one."""

    host: str = "127.0.0.1"
    port: int = 8780
    token_file: str | None = None
    token: str | None = None
    bootstrap_token: bool = True
    max_request_bytes: int = 1024 * 1024
    max_upload_bytes: int = 1024 * 1024 * 1024

    def validate(self) -> None:
        _check(bool(self.host), "host must not be empty")
        _check(0 <= self.port <= 65535, "port must be 0..65535")
        _check(
            self.token is None or self.token_file is None,
            "token and token_file are exclusive: give one",
        )
        _check(self.token is None or len(self.token) >= 16, "token must be >= 16 characters")
        _check(self.max_request_bytes >= 1024, "max_request_bytes must be >= 1024")
        _check(self.max_upload_bytes >= 1024, "max_upload_bytes must be >= 1024")


@dataclass(frozen=True)
class SigningConfig:
    """The online key that signs desired state, and the builder root that vets bundles."""

    online_key: str = "/etc/edgefleet-server/online.pem"
    root_path: str = "/etc/edgefleet-server/root.json"
    desired_ttl_seconds: int = 24 * 3600

    def validate(self) -> None:
        _check(bool(self.online_key), "online_key must not be empty")
        _check(bool(self.root_path), "root_path must not be empty")
        _check(
            60 <= self.desired_ttl_seconds <= 90 * 24 * 3600,
            "desired_ttl_seconds must be 60..7776000",
        )


@dataclass(frozen=True)
class FallbackSection:
    """Cloud fallback serving: answer devices' fallback requests with cloud models.

    Each device is answered by the version it runs, and only published versions are served.
    ``models_dir`` may register cloud models served as they are (e.g. the float or a larger
    model): ``<name>@<version>.onnx`` / ``.tflite`` for one version, ``<name>.onnx`` for every
    version of the name; any other version is answered by its own published bundle, verified
    with the builder root and run with its signed preprocessing.
    """

    enabled: bool = False
    models_dir: str = ""
    share_group: str = "fleet-fallback"
    threads: int = 2
    max_queue: int = 64

    def validate(self) -> None:
        _check(bool(self.share_group), "share_group must not be empty")
        _check(1 <= self.threads <= 64, "threads must be 1..64")
        _check(1 <= self.max_queue <= 100_000, "max_queue must be 1..100000")


@dataclass(frozen=True)
class RolloutsSection:
    """The rollout engine: how often the leader judges gates and moves waves."""

    interval_seconds: float = 5.0

    def validate(self) -> None:
        _check(0.1 <= self.interval_seconds <= 3600, "interval_seconds must be 0.1..3600")


@dataclass(frozen=True)
class RetentionSection:
    """Telemetry history: how long raw rows and rollups are kept (``fleet_server.history``)."""

    raw_days: float = 3.0  # raw telemetry rows (tail, rollout edges, the current bucket)
    fine_days: float = 1.0  # 5-minute rollups (ranges over 6 h start on the hour)
    hour_days: float = 400.0  # hourly rollups
    interval_seconds: float = 30.0  # how often the leader folds closed buckets and prunes
    delete_batch: int = 2000  # rows per delete transaction (the longest ingest ever waits)

    def validate(self) -> None:
        _check(0.01 <= self.raw_days <= 3650, "raw_days must be 0.01..3650")
        _check(0.01 <= self.fine_days <= 3650, "fine_days must be 0.01..3650")
        _check(1 <= self.hour_days <= 36500, "hour_days must be 1..36500")
        _check(1 <= self.interval_seconds <= 3600, "interval_seconds must be 1..3600")
        _check(100 <= self.delete_batch <= 100_000, "delete_batch must be 100..100000")


@dataclass(frozen=True)
class CaptureSection:
    """Capture upload (``fleet_server.capture``): how often the leader asks every device of an
    enabled model's cohort for its next chunk (0: never by itself; ``capture collect`` still
    does it on request)."""

    collect_interval_seconds: float = 3600.0

    def validate(self) -> None:
        _check(
            self.collect_interval_seconds == 0 or 60 <= self.collect_interval_seconds <= 604800,
            "collect_interval_seconds must be 0 (off) or 60..604800",
        )


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``fleet-server serve`` needs, validated, with derived paths filled in."""

    log_level: str = "info"
    registry: RegistrySection = field(default_factory=RegistrySection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    signing: SigningConfig = field(default_factory=SigningConfig)
    fallback: FallbackSection = field(default_factory=FallbackSection)
    rollouts: RolloutsSection = field(default_factory=RolloutsSection)
    retention: RetentionSection = field(default_factory=RetentionSection)
    capture: CaptureSection = field(default_factory=CaptureSection)


_SECTIONS: dict[str, type[Any]] = {
    "registry": RegistrySection,
    "mqtt": MqttSection,
    "gateway": GatewayConfig,
    "api": ApiConfig,
    "signing": SigningConfig,
    "fallback": FallbackSection,
    "rollouts": RolloutsSection,
    "retention": RetentionSection,
    "capture": CaptureSection,
}
_TOP = ("log_level",)


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> ServerConfig:
    """Read ``path`` (TOML; ``None`` for defaults), apply ``env`` overrides, validate.

    Args:
        path: the TOML file, or ``None`` for defaults plus environment.
        env: the environment to read overrides from (``os.environ`` when ``None``).

    Returns:
        The validated configuration, ``registry.url`` and ``gateway.bundles_dir`` resolved.

    Raises:
        ServerConfigError: unreadable file, unknown key, wrong type or an invalid value; the
            message names the key.
    """
    data = read_toml(path, ServerConfigError)
    apply_env(data, os.environ if env is None else env, ENV_PREFIX, ServerConfigError)
    return _build(data)


def _build(data: Mapping[str, Any]) -> ServerConfig:
    unknown = set(data) - set(_SECTIONS) - set(_TOP)
    if unknown:
        raise ServerConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
    log_level = data.get("log_level", "info")
    if log_level not in LOG_LEVELS:
        raise ServerConfigError(f"log_level must be one of {LOG_LEVELS}, got {log_level!r}")
    sections = {name: _section(cls, data.get(name, {}), name) for name, cls in _SECTIONS.items()}
    registry: RegistrySection = sections["registry"]
    state = Path(registry.state_dir)
    if not registry.url:
        registry = dataclasses.replace(registry, url=f"sqlite:///{state / 'registry.db'}")
    gateway: GatewayConfig = sections["gateway"]
    if not gateway.bundles_dir or "bundles_dir" not in data.get("gateway", {}):
        gateway = dataclasses.replace(gateway, bundles_dir=str(state / "bundles"))
    return ServerConfig(
        log_level=log_level,
        registry=registry,
        mqtt=sections["mqtt"],
        gateway=gateway,
        api=sections["api"],
        signing=sections["signing"],
        fallback=sections["fallback"],
        rollouts=sections["rollouts"],
        retention=sections["retention"],
        capture=sections["capture"],
    )


def _section(cls: type[T], raw: Any, where: str) -> T:
    return build_section(
        cls, raw, where, ServerConfigError, wrap=lambda where, message: f"{where}.{message}"
    )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ServerConfigError(message)
