"""The agent's config sections: one frozen class per TOML section, each validating itself.

Owns ``ApiConfig``, ``GrpcConfig``, ``StoreConfig``, ``RuntimeConfig`` (and ``options()``, the
one place the section becomes ``RuntimeOptions``), ``DriftConfig``, ``FallbackConfig``,
``ModelPolicy`` (per-model policy), ``VersionPolicy`` and ``ServingConfig`` (the ``[serving]``
section, parsed by hand: a one-key table per policy kind), ``CaptureConfig``, ``SyncConfig``,
their bounds and allowed values, ``is_loopback`` and the two checks every section uses
(``check``, ``as_table``). Does not own reading the file and the environment, the whole
``AgentConfig`` and its cross-section checks, or path resolution (``edge_agent.config.loader``).
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from typing import Any

from edge_agent.contract.manifest import MAX_VERSION
from edge_agent.errors import ConfigError, ContractError
from edge_agent.runtime.base import RuntimeOptions
from edge_agent.wire.topics import Topics

__all__ = [
    "BATCHING_MODES",
    "FALLBACK_MODES",
    "MAX_DRIFT_BUFFER_BYTES",
    "MAX_MALLOC_ARENAS",
    "MAX_POLICY_VERSIONS",
    "MIN_DRIFT_BUFFER_BYTES",
    "VALIDATION_POLICIES",
    "VERSION_POLICY_KINDS",
    "ApiConfig",
    "CaptureConfig",
    "DriftConfig",
    "FallbackConfig",
    "GrpcConfig",
    "ModelPolicy",
    "RuntimeConfig",
    "ServingConfig",
    "StoreConfig",
    "SyncConfig",
    "VersionPolicy",
    "as_table",
    "check",
    "is_loopback",
]

VALIDATION_POLICIES = ("reject", "drop")
BATCHING_MODES = ("off", "on", "auto")
FALLBACK_MODES = ("device_only", "prefer_device", "prefer_cloud", "cloud_only")
#: ``[runtime] malloc_arenas`` at most (glibc allows more; no device has a use for them).
MAX_MALLOC_ARENAS = 64
#: ``[drift] buffer_bytes`` bounds: room for a few wide windows, and no more than a device has.
MIN_DRIFT_BUFFER_BYTES = 64 * 1024
MAX_DRIFT_BUFFER_BYTES = 1024 * 1024 * 1024


@dataclass(frozen=True)
class ApiConfig:
    """The local Open Inference Protocol (KServe v2) endpoint."""

    host: str = "127.0.0.1"
    port: int = 8080
    unix_socket: str | None = None
    max_request_bytes: int = 8 * 1024 * 1024
    # Memory that decoding request bodies larger than 64 KiB may hold at once (bodies, parsed
    # JSON, tensors): such requests wait for their share, one that alone needs more gets 413.
    max_decode_memory_bytes: int = 256 * 1024 * 1024
    # A body over 64 KiB holds its share of that budget while it arrives: one that takes longer
    # than this gets 408, so a slow (or stalled) upload cannot keep other large requests waiting.
    body_read_seconds: float = 10.0
    # Per client: every TCP client on loopback is one client (127.0.0.1), so be generous.
    rate_limit_per_second: float = 10000.0
    rate_limit_burst: int = 20000
    drain_seconds: float = 10.0
    # Ground truth (``POST .../feedback``): answers remembered by request id, and for how long.
    # 0 requests turns the memory off; it holds at most 16 request rows per request on average.
    feedback_requests: int = 10_000
    feedback_seconds: float = 3600.0
    # The model repository extension's load and unload (and its index): control endpoints, off
    # by default; on, ``host`` (and ``[grpc] host``) must be a loopback address.
    repository_control: bool = False

    def validate(self) -> None:
        check(0 <= self.port <= 65535, "api.port must be 0..65535")
        check(
            not self.repository_control or is_loopback(self.host),
            f"api.repository_control needs a loopback api.host, not {self.host!r}",
        )
        check(0 <= self.feedback_requests <= 1_000_000, "api.feedback_requests: 0..1000000")
        check(self.feedback_seconds > 0, "api.feedback_seconds must be positive")
        check(self.max_request_bytes >= 1024, "api.max_request_bytes must be >= 1024")
        check(
            self.max_decode_memory_bytes >= 8 * self.max_request_bytes,
            "api.max_decode_memory_bytes must be >= 8 * api.max_request_bytes",
        )
        check(self.body_read_seconds > 0, "api.body_read_seconds must be positive")
        check(self.rate_limit_per_second > 0, "api.rate_limit_per_second must be positive")
        check(self.rate_limit_burst >= 1, "api.rate_limit_burst must be >= 1")
        check(self.drain_seconds >= 0, "api.drain_seconds must be >= 0")


@dataclass(frozen=True)
class GrpcConfig:
    """The Open Inference Protocol's gRPC service (``inference.GRPCInferenceService``).

    It shares the ``[api]`` section's rate limit and drain; ``port = 0`` picks a free port.
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8081
    unix_socket: str | None = None
    max_message_bytes: int = 8 * 1024 * 1024
    max_workers: int = 8
    # Calls admitted at once (running or waiting for a worker); more get RESOURCE_EXHAUSTED.
    # Received messages they hold are bounded by this times max_message_bytes.
    max_concurrent_rpcs: int = 32

    def validate(self) -> None:
        check(0 <= self.port <= 65535, "grpc.port must be 0..65535")
        check(self.max_message_bytes >= 1024, "grpc.max_message_bytes must be >= 1024")
        check(1 <= self.max_workers <= 256, "grpc.max_workers must be 1..256")
        check(
            self.max_workers <= self.max_concurrent_rpcs <= 4096,
            "grpc.max_concurrent_rpcs must be max_workers..4096",
        )


@dataclass(frozen=True)
class StoreConfig:
    """Where bundles and state live, what the device trusts, and how much it may load."""

    state_dir: str = "/var/lib/edgefleet"
    root_path: str = "/etc/edgefleet/root.json"
    keep_versions: int = 3
    memory_budget_mb: int = 512

    def validate(self) -> None:
        check(self.keep_versions >= 1, "store.keep_versions must be >= 1")
        check(self.memory_budget_mb >= 1, "store.memory_budget_mb must be >= 1")


@dataclass(frozen=True)
class RuntimeConfig:
    """The ``[runtime]`` section: how the agent runs every model it loads.

    Owns the keys an operator may set (threads, warm-up runs, and two daemon settings: whether
    it hands back the memory it touched only while starting, how many malloc arenas its threads
    share) and the agent's defaults for them (two warm-up runs;
    library callers that build ``RuntimeOptions`` themselves get its one).
    ``options`` builds the ``edge_agent.runtime.base.RuntimeOptions`` the runtime adapters take:
    the only place the section becomes adapter options. Providers and adapter extras are not
    configurable here (the agent runs the adapters' defaults).
    """

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    warmup_runs: int = 2
    #: Once the front ends are up, page out clean library pages and trim the malloc heaps
    #: (``edge_agent.common.residency``). A daemon setting only: not a ``RuntimeOptions`` field.
    release_startup_memory: bool = True
    #: glibc malloc arenas the daemon's threads share (``M_ARENA_MAX``; 0: glibc's default,
    #: 8 per core). A daemon setting only, like ``release_startup_memory``.
    malloc_arenas: int = 2

    def validate(self) -> None:
        check(
            0 <= self.malloc_arenas <= MAX_MALLOC_ARENAS,
            f"runtime.malloc_arenas must be in [0, {MAX_MALLOC_ARENAS}]",
        )
        check(self.intra_op_threads >= 0, "runtime.intra_op_threads must be >= 0")
        check(self.inter_op_threads >= 0, "runtime.inter_op_threads must be >= 0")
        check(self.warmup_runs >= 0, "runtime.warmup_runs must be >= 0")

    def options(self) -> RuntimeOptions:
        """The options every model the agent loads runs with."""
        return RuntimeOptions(
            intra_op_threads=self.intra_op_threads,
            inter_op_threads=self.inter_op_threads,
            warmup_runs=self.warmup_runs,
        )


@dataclass(frozen=True)
class DriftConfig:
    """Drift windows close after ``window_values`` rows or ``window_seconds``, whichever first.

    Closed windows wait for the next telemetry report in at most ``buffer_bytes`` of memory
    (estimated; the oldest are dropped, and counted, beyond it). ``windows_per_hour`` (0: off)
    bounds the windows each tensor closes, ``window_burst`` in a row: under traffic that
    would close them faster, windows grow instead (``edge_agent.drift.budget``).
    """

    window_values: int = 1000
    window_seconds: float = 60.0
    alpha: float = 0.01
    kll: bool = False
    max_rows_per_second: float = 5000.0
    buffer_bytes: int = 2 * 1024 * 1024
    windows_per_hour: float = 0.0
    window_burst: int = 4

    def validate(self) -> None:
        check(
            MIN_DRIFT_BUFFER_BYTES <= self.buffer_bytes <= MAX_DRIFT_BUFFER_BYTES,
            f"drift.buffer_bytes must be in [{MIN_DRIFT_BUFFER_BYTES}, {MAX_DRIFT_BUFFER_BYTES}]",
        )
        check(self.max_rows_per_second >= 256, "drift.max_rows_per_second must be >= 256")
        check(self.window_values >= 10, "drift.window_values must be >= 10")
        check(self.window_seconds > 0, "drift.window_seconds must be positive")
        check(0 < self.alpha < 0.5, "drift.alpha must be in (0, 0.5)")
        check(
            math.isfinite(self.windows_per_hour) and 0 <= self.windows_per_hour <= 3600,
            "drift.windows_per_hour must be in [0, 3600] (0: no budget)",
        )
        check(1 <= self.window_burst <= 1000, "drift.window_burst must be in [1, 1000]")


@dataclass(frozen=True)
class FallbackConfig:
    """When and how requests go to the cloud model."""

    mode: str = "device_only"
    deadline_ms: float = 250.0
    max_per_minute: int = 600
    min_confidence: float = 0.0
    max_entropy: float = 1.0
    breaker_failures: int = 5
    breaker_reset_seconds: float = 30.0
    # A row is out of distribution when more than this share of its features lies outside the
    # range the baseline saw; such requests go to the cloud under prefer_device.
    ood_feature_fraction: float = 0.25

    def validate(self) -> None:
        check(self.mode in FALLBACK_MODES, f"fallback.mode must be one of {FALLBACK_MODES}")
        check(self.deadline_ms > 0, "fallback.deadline_ms must be positive")
        check(self.max_per_minute >= 0, "fallback.max_per_minute must be >= 0")
        check(0 <= self.min_confidence <= 1, "fallback.min_confidence must be in [0, 1]")
        check(0 <= self.max_entropy <= 1, "fallback.max_entropy must be in [0, 1]")
        check(self.breaker_failures >= 1, "fallback.breaker_failures must be >= 1")
        check(self.breaker_reset_seconds >= 0, "fallback.breaker_reset_seconds must be >= 0")
        check(0 < self.ood_feature_fraction <= 1, "fallback.ood_feature_fraction in (0, 1]")


@dataclass(frozen=True)
class ModelPolicy:
    """Per-model behaviour: validation, probation, shadow and A/B."""

    validation: str = "reject"
    probation_requests: int = 200
    probation_seconds: float = 300.0
    max_error_rate: float = 0.05
    max_reject_rate: float = 0.5
    max_p99_ms: float = 1000.0
    shadow_candidate: str | None = None
    shadow_fraction: float = 0.0
    shadow_queue: int = 256
    ab_candidate: str | None = None
    ab_fraction: float = 0.0
    # Adaptive batching (edge_agent.runtime.batching): "off", "on", or "auto" (on when a
    # probe at load shows it pays); at most batch_max_rows rows per batch, and a leader waits
    # at most batch_max_delay_ms for more rows (only while requests arrive concurrently).
    batching: str = "off"
    batch_max_rows: int = 64
    batch_max_delay_ms: float = 2.0

    def validate(self) -> None:
        check(
            self.validation in VALIDATION_POLICIES,
            f"validation must be one of {VALIDATION_POLICIES}",
        )
        check(self.probation_requests >= 0, "probation_requests must be >= 0")
        check(self.probation_seconds >= 0, "probation_seconds must be >= 0")
        check(self.max_p99_ms > 0, "max_p99_ms must be positive")
        check(0 <= self.max_error_rate <= 1, "max_error_rate must be in [0, 1]")
        check(0 <= self.max_reject_rate <= 1, "max_reject_rate must be in [0, 1]")
        check(0 <= self.shadow_fraction <= 1, "shadow_fraction must be in [0, 1]")
        check(0 <= self.ab_fraction <= 1, "ab_fraction must be in [0, 1]")
        check(self.shadow_queue >= 1, "shadow_queue must be >= 1")
        check(self.batching in BATCHING_MODES, f"batching must be one of {BATCHING_MODES}")
        check(2 <= self.batch_max_rows <= 4096, "batch_max_rows must be in [2, 4096]")
        check(0 <= self.batch_max_delay_ms <= 100, "batch_max_delay_ms must be in [0, 100]")
        check(
            self.ab_fraction == 0 or self.ab_candidate is not None, "ab_fraction needs ab_candidate"
        )
        check(
            self.shadow_fraction == 0 or self.shadow_candidate is not None,
            "shadow_fraction needs shadow_candidate",
        )


#: The kinds of ``[serving] version_policy`` (as OpenVINO Model Server's model version policy).
VERSION_POLICY_KINDS = ("latest", "specific", "all")
#: At most this many versions in a ``latest`` or ``specific`` policy (a device keeps a few).
MAX_POLICY_VERSIONS = 64


@dataclass(frozen=True)
class VersionPolicy:
    """Which kept versions of a model serve by number (``/v2/models/{name}/versions/{v}``).

    ``latest`` (``count``): the active version and the ``count - 1`` newest other servable kept
    versions; ``specific`` (``versions``): those of the listed versions that are kept and
    servable; ``all``: every servable kept version. The active version always serves (the store
    and the fleet choose it). ``serving.routing.served_versions`` applies it.
    """

    kind: str = "latest"
    count: int = 1
    versions: tuple[int, ...] = ()

    @classmethod
    def from_toml(cls, value: Any) -> VersionPolicy:
        """``{latest = N}``, ``{specific = [v, ...]}`` or ``{all = true}``.

        Raises:
            ConfigError: anything else (the message names ``serving.version_policy``).
        """
        where = "serving.version_policy"
        if not isinstance(value, dict) or len(value) != 1:
            raise ConfigError(
                f"{where} must be one of {{latest = N}}, {{specific = [v, ...]}}, "
                f"{{all = true}}; got {value!r}"
            )
        ((kind, arg),) = value.items()
        if kind == "latest":
            check(
                type(arg) is int and 1 <= arg <= MAX_POLICY_VERSIONS,
                f"{where}.latest must be an integer 1..{MAX_POLICY_VERSIONS}, got {arg!r}",
            )
            return cls("latest", count=arg)
        if kind == "specific":
            ok = isinstance(arg, list) and 1 <= len(arg) <= MAX_POLICY_VERSIONS
            ok = ok and all(type(v) is int and 1 <= v <= MAX_VERSION for v in arg)
            check(
                ok and len(set(arg)) == len(arg),
                f"{where}.specific must list 1..{MAX_POLICY_VERSIONS} distinct versions "
                f"(integers 1..{MAX_VERSION}), got {arg!r}",
            )
            return cls("specific", count=0, versions=tuple(sorted(arg)))
        if kind == "all":
            check(arg is True, f"{where}.all must be true, got {arg!r}")
            return cls("all", count=0)
        raise ConfigError(f"{where}: unknown policy {kind!r} (one of {VERSION_POLICY_KINDS})")

    def to_toml(self) -> dict[str, Any]:
        """The TOML value this policy is read from (``from_toml(p.to_toml()) == p``)."""
        if self.kind == "specific":
            return {"specific": list(self.versions)}
        if self.kind == "all":
            return {"all": True}
        return {"latest": self.count}


@dataclass(frozen=True)
class ServingConfig:
    """The ``[serving]`` section: which kept versions serve besides the active one."""

    version_policy: VersionPolicy = field(default_factory=VersionPolicy)

    @classmethod
    def from_table(cls, raw: Any) -> ServingConfig:
        """Build the section from its TOML table.

        Raises:
            ConfigError: not a table, an unknown key or an invalid policy.
        """
        table = as_table(raw, "serving")
        unknown = set(table) - {"version_policy"}
        if unknown:
            raise ConfigError(f"unknown keys in [serving]: {', '.join(sorted(unknown))}")
        if "version_policy" not in table:
            return cls()
        return cls(VersionPolicy.from_toml(table["version_policy"]))


@dataclass(frozen=True)
class CaptureConfig:
    """Sampled capture of inputs/outputs into a bounded on-disk ring buffer (off by default)."""

    enabled: bool = False
    sample_rate: float = 0.01
    max_bytes: int = 64 * 1024 * 1024

    def validate(self) -> None:
        check(0 <= self.sample_rate <= 1, "capture.sample_rate must be in [0, 1]")
        check(self.max_bytes >= 64 * 1024, "capture.max_bytes must be >= 65536")


@dataclass(frozen=True)
class SyncConfig:
    """Fleet sync over MQTT (off by default: a device may run from installed bundles only).

    ``identity_dir`` holds the device key, its certificate and the fleet CA (``IdentityStore``).
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8883
    identity_dir: str = "/var/lib/edgefleet/identity"
    prefix: str = "edgefleet"
    keepalive: int = 30
    reconnect_max_seconds: float = 30.0
    report_interval_seconds: float = 30.0
    # Plain reports may wait this long to share one message (0: each leaves at once); events,
    # drift alerts, models on probation or in shadow never wait (edge_agent.sync.coalesce).
    report_coalesce_seconds: float = 0.0
    outbox_max_bytes: int = 16 * 1024 * 1024
    batch_max_items: int = 64
    batch_max_bytes: int = 192 * 1024
    ack_timeout_seconds: float = 10.0
    # Consecutive ack timeouts back off: the wait for an ack grows from ack_timeout_seconds
    # towards this cap, with full jitter (edge_agent.sync.uplink.ack_wait); an ack resets it.
    # A cap at or below ack_timeout_seconds turns the backoff off (a fixed ack timeout).
    ack_timeout_max_seconds: float = 60.0
    block_window: int = 16
    block_retry_seconds: float = 2.0
    # Remote diagnostics (``edge_agent.sync.ops.commands``): signed commands accepted per minute
    # (a burst of that many, refilled evenly) and support-bundle bytes uploaded per UTC day.
    commands_per_minute: int = 10
    upload_bytes_per_day: int = 64 * 1024 * 1024
    # Certificate renewal (edge_agent.sync.ops.renewal): at this fraction of the validity period.
    renew_fraction: float = 2 / 3
    renew_timeout_seconds: float = 30.0
    renew_retry_min_seconds: float = 10.0
    renew_retry_max_seconds: float = 3600.0

    def validate(self) -> None:
        check(0 < self.port <= 65535, "sync.port must be 1..65535")
        check(1 <= self.commands_per_minute <= 600, "sync.commands_per_minute must be 1..600")
        check(self.upload_bytes_per_day >= 0, "sync.upload_bytes_per_day must be >= 0")
        check(bool(self.host), "sync.host must not be empty")
        try:  # the one prefix rule (the server's gateway and the broker config use it too)
            Topics.check_prefix(self.prefix)
        except ContractError as exc:
            raise ConfigError(f"sync.prefix: {exc}") from exc
        check(5 <= self.keepalive <= 3600, "sync.keepalive must be 5..3600")
        check(self.reconnect_max_seconds >= 1, "sync.reconnect_max_seconds must be >= 1")
        check(self.report_interval_seconds > 0, "sync.report_interval_seconds must be positive")
        check(
            0 <= self.report_coalesce_seconds <= 3600,
            "sync.report_coalesce_seconds must be in [0, 3600] (0: no coalescing)",
        )
        check(self.outbox_max_bytes >= 256 * 1024, "sync.outbox_max_bytes must be >= 262144")
        check(1 <= self.batch_max_items <= 256, "sync.batch_max_items must be 1..256")
        check(
            4096 <= self.batch_max_bytes <= 224 * 1024, "sync.batch_max_bytes must be 4096..229376"
        )
        check(self.ack_timeout_seconds > 0, "sync.ack_timeout_seconds must be positive")
        check(
            0 < self.ack_timeout_max_seconds <= 3600,
            "sync.ack_timeout_max_seconds must be in (0, 3600]",
        )
        check(1 <= self.block_window <= 256, "sync.block_window must be 1..256")
        check(self.block_retry_seconds > 0, "sync.block_retry_seconds must be positive")
        check(0.1 <= self.renew_fraction <= 0.95, "sync.renew_fraction must be 0.1..0.95")
        check(self.renew_timeout_seconds > 0, "sync.renew_timeout_seconds must be positive")
        check(
            0 < self.renew_retry_min_seconds <= self.renew_retry_max_seconds,
            "sync.renew_retry_min_seconds must be positive and <= renew_retry_max_seconds",
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a listener's address) only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def as_table(value: Any, where: str) -> dict[str, Any]:
    """``value`` if it is a TOML table.

    Raises:
        ConfigError: it is not (the message names ``where``).
    """
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table")
    return value


def check(ok: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``ok``.

    Raises:
        ConfigError: ``ok`` is false.
    """
    if not ok:
        raise ConfigError(message)
