"""Telemetry wire formats: what a device publishes and what MQTT consumers read.

Owns the versioned payloads (frozen value objects with strict ``from_dict``, canonical
``to_bytes`` and size-capped ``from_bytes``): ``TelemetryReport`` (periodic window report),
``Event`` (lifecycle events), ``StatusMessage`` (retained online/offline and last will),
``Batch`` (several reports/events in one message, each with its own ``seq``) and
``TelemetryAck`` (server -> device: "stored everything up to ``upto_seq``"), plus
``report_from_status``, which turns ``Agent.status()`` into a report.

Reports and events share one per-device sequence (the outbox's), so one acknowledgement of the
highest contiguous ``seq`` covers both. Counters in a report are cumulative since
``started_at`` (Prometheus counter semantics): a consumer takes differences between reports
and sees a restart as a new ``started_at``.

Versioning: fields added later are optional and keep ``schema_version``; parsers ignore keys
they do not know. Removing or retyping a field, or changing a fixed table (latency bucket
edges, event kinds), bumps it. JSON Schemas: ``edge_agent/schemas/*.schema.json``.

Does not publish, store or retry anything (the outbox and the MQTT adapter do) and does no I/O.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from edge_agent.drift.monitor import DriftWindow
from edge_agent.drift.view import TierAView
from edge_agent.errors import ContractError, IdentityError
from edge_agent.identity import validate_device_id

__all__ = [
    "EVENT_KINDS",
    "LATENCY_BUCKETS_MS",
    "MAX_BATCH_ITEMS",
    "MAX_PAYLOAD_BYTES",
    "SCHEMA_VERSION",
    "Batch",
    "DriftSummary",
    "Event",
    "ModelStats",
    "Resources",
    "ShadowStats",
    "StatusMessage",
    "TelemetryAck",
    "TelemetryReport",
    "decode_message",
    "event_from_registry",
    "latency_histogram",
    "report_from_status",
]

SCHEMA_VERSION: Final = 1
#: Refused before ``json.loads`` is even tried.
MAX_PAYLOAD_BYTES: Final = 256 * 1024
MAX_BATCH_ITEMS: Final = 256
#: Upper bucket edges (ms, inclusive); bucket ``i`` counts ``edge[i-1] < ms <= edge[i]``, the
#: last bucket counts everything above 5,000 ms. Fixed for schema_version 1.
LATENCY_BUCKETS_MS: Final = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0)
EVENT_KINDS: Final = (
    "installed",
    "install_failed",
    "rolled_back",
    "probation_passed",
    "probation_failed",
    "load_failed",
    "admission_refused",
    "drift_alert",
    "fallback_breaker_open",
    "fallback_breaker_closed",
    "telemetry_dropped",
    "desired_rejected",
    "transfer_started",
    "transfer_failed",
)
STATES: Final = ("online", "offline")
STATUS_REASONS: Final = ("connected", "shutdown", "connection_lost")
_MAX_INT: Final = 2**53 - 1  # exact in every JSON reader
_MAX_MAP: Final = 64
_MAX_MODELS: Final = 32
_MAX_WINDOWS: Final = 64
_MAX_TEXT: Final = 1024
_LABEL = re.compile(r"^[A-Za-z0-9_.:/-]{1,128}$")
_REGISTRY_KINDS: Final = {"rollback": "rolled_back"}
_SHADOW_INTS: Final = (
    "offered",
    "sampled",
    "dropped",
    "compared",
    "agree_rows",
    "disagree_rows",
    "candidate_errors",
)
_SHADOW_FLOATS: Final = (
    "agreement",
    "live_p50_ms",
    "live_p99_ms",
    "candidate_p50_ms",
    "candidate_p99_ms",
)


# --------------------------------------------------------------------------- readers
def _obj(d: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise ContractError(f"{what} must be a JSON object")
    return d


def _get(d: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in d:
        raise ContractError(f"{what}: missing field {key!r}")
    return d[key]


def _int(v: Any, what: str, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= _MAX_INT:
        raise ContractError(f"{what} must be an integer in [{lo}, 2**53-1]")
    return v


def _num(v: Any, what: str, *, lo: float = 0.0) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ContractError(f"{what} must be a number")
    out = float(v)
    if not math.isfinite(out) or out < lo:
        raise ContractError(f"{what} must be finite and >= {lo}")
    return out


def _opt_num(v: Any, what: str) -> float | None:
    return None if v is None else _num(v, what, lo=-math.inf)


def _str(v: Any, what: str, limit: int = _MAX_TEXT) -> str:
    if not isinstance(v, str) or len(v) > limit:
        raise ContractError(f"{what} must be a string of at most {limit} characters")
    return v


def _label(v: Any, what: str) -> str:
    if not isinstance(v, str) or not _LABEL.fullmatch(v):
        raise ContractError(f"{what} must be a label of 1-128 [A-Za-z0-9_.:/-]")
    return v


def _counts(v: Any, what: str) -> dict[str, int]:
    v = _obj(v, what)
    if len(v) > _MAX_MAP:
        raise ContractError(f"{what} has more than {_MAX_MAP} entries")
    return {_label(k, f"{what} key"): _int(n, f"{what}[{k!r}]") for k, n in v.items()}


def _device(v: Any) -> str:
    try:
        return validate_device_id(v)
    except IdentityError as exc:
        raise ContractError(f"device_id: {exc}") from exc


def _header(d: Any, kind: str) -> Mapping[str, Any]:
    m = _obj(d, kind)
    version = _get(m, "schema_version", kind)
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        raise ContractError(f"{kind}: schema_version {version!r} is not supported")
    if _get(m, "type", kind) != kind:
        raise ContractError(f"{kind}: type must be {kind!r}")
    return m


def _no_constants(name: str) -> Any:
    raise ContractError(f"payload contains {name}, which JSON does not allow")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ContractError("payload has duplicate keys")
    return out


def _load(data: bytes, max_bytes: int) -> Any:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ContractError("payload must be bytes")
    if len(data) > max_bytes:
        raise ContractError(f"payload of {len(data)} bytes exceeds the {max_bytes}-byte cap")
    try:
        return json.loads(
            bytes(data).decode("utf-8"),
            parse_constant=_no_constants,
            parse_int=_bounded_int,
            object_pairs_hook=_no_duplicates,
        )
    # ValueError covers JSONDecodeError and CPython's integer-digit limit.
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ContractError(f"payload is not UTF-8 JSON: {exc}") from exc


def _bounded_int(text: str) -> int:
    """JSON integers stay within 20 digits (every count and seq fits in 2**63)."""
    if len(text.lstrip("-")) > 20:
        raise ContractError(f"integer of {len(text)} digits is out of range")
    return int(text)


def _dump(d: Mapping[str, Any]) -> bytes:
    try:
        text = json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:
        raise ContractError(f"payload has a non-finite number: {exc}") from exc
    return text.encode("ascii")


class _Wire:
    """``to_bytes``/``from_bytes`` on top of each class's ``to_dict``/``from_dict``."""

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """Canonical JSON: sorted keys, no whitespace, ASCII, no NaN.

        Raises:
            ContractError: a non-finite float slipped into a field.
        """
        return _dump(self.to_dict())


# --------------------------------------------------------------------------- report
@dataclass(frozen=True)
class DriftSummary:
    """One closed tier-A drift window of one tensor.

    Attributes:
        tensor: Tensor name.
        role: ``"input"`` or ``"output"``.
        start: Agent clock (s) at the window's first row; compare only within one device.
        end: Agent clock (s) at which it closed.
        reason: Why it closed: ``"count"``, ``"time"`` or ``"flush"``.
        rows: Samples in the window.
        view: ``TierAView.to_bytes()`` (travels as base64); exact to merge across devices.
        alert: The calibrated verdict alerted.
        drifted: Indices of the features that drifted.
        max_psi: Largest PSI over judged features (None if none was scorable).
        max_js: Largest Jensen-Shannon divergence, likewise.
        max_ks: Largest Kolmogorov-Smirnov statistic, likewise.
    """

    tensor: str
    role: str
    start: float
    end: float
    reason: str
    rows: int
    view: bytes
    alert: bool
    drifted: tuple[int, ...] = ()
    max_psi: float | None = None
    max_js: float | None = None
    max_ks: float | None = None

    def tier_a_view(self) -> TierAView:
        """The window's sketch. Raises ContractError (bytes that are not a tier-A view)."""
        return TierAView.from_bytes(self.view)

    @classmethod
    def from_window(cls, window: DriftWindow) -> DriftSummary:
        """Summarise a ``DriftMonitor`` window."""

        def top(values: Any) -> float | None:
            finite = [float(x) for x in values if math.isfinite(float(x))]
            return max(finite) if finite else None

        return cls(
            tensor=window.tensor,
            role=window.role,
            start=float(window.start),
            end=float(window.end),
            reason=window.reason,
            rows=window.rows,
            view=window.view.to_bytes(),
            alert=bool(window.verdict.alert),
            drifted=tuple(window.verdict.drifted_features()),
            max_psi=top(window.scores.psi),
            max_js=top(window.scores.js),
            max_ks=top(window.scores.ks),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {
            "tensor": self.tensor,
            "role": self.role,
            "start": self.start,
            "end": self.end,
            "reason": self.reason,
            "rows": self.rows,
            "view": base64.b64encode(self.view).decode("ascii"),
            "alert": self.alert,
            "drifted": list(self.drifted),
            "max_psi": self.max_psi,
            "max_js": self.max_js,
            "max_ks": self.max_ks,
        }

    @classmethod
    def from_dict(cls, d: Any) -> DriftSummary:
        """Parse strictly; the view must decode as a tier-A view.

        Raises:
            ContractError: a missing or mistyped field, bad base64, or an invalid view.
        """
        w = "drift window"
        d = _obj(d, w)
        role = _get(d, "role", w)
        if role not in ("input", "output"):
            raise ContractError(f"{w}: role must be 'input' or 'output'")
        try:
            view = base64.b64decode(_str(_get(d, "view", w), f"{w}.view", 1 << 20), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ContractError(f"{w}: view is not base64") from exc
        TierAView.from_bytes(view)
        drifted = _get(d, "drifted", w) if "drifted" in d else []
        if not isinstance(drifted, list) or len(drifted) > 4096:
            raise ContractError(f"{w}: drifted must be a list of feature indices")
        alert = _get(d, "alert", w)
        if not isinstance(alert, bool):
            raise ContractError(f"{w}: alert must be a boolean")
        return cls(
            tensor=_label(_get(d, "tensor", w), f"{w}.tensor"),
            role=role,
            start=_num(_get(d, "start", w), f"{w}.start", lo=-math.inf),
            end=_num(_get(d, "end", w), f"{w}.end", lo=-math.inf),
            reason=_label(_get(d, "reason", w), f"{w}.reason"),
            rows=_int(_get(d, "rows", w), f"{w}.rows"),
            view=view,
            alert=alert,
            drifted=tuple(_int(i, f"{w}.drifted[]") for i in drifted),
            max_psi=_opt_num(d.get("max_psi"), f"{w}.max_psi"),
            max_js=_opt_num(d.get("max_js"), f"{w}.max_js"),
            max_ks=_opt_num(d.get("max_ks"), f"{w}.max_ks"),
        )


@dataclass(frozen=True)
class ShadowStats:
    """Shadow (candidate next to live) or A/B comparison counters of one model.

    ``counts`` holds ``offered``, ``sampled``, ``dropped``, ``compared``, ``agree_rows``,
    ``disagree_rows``, ``candidate_errors``; the floats are None before any comparison.
    """

    counts: Mapping[str, int] = field(default_factory=dict)
    agreement: float | None = None
    live_p50_ms: float | None = None
    live_p99_ms: float | None = None
    candidate_p50_ms: float | None = None
    candidate_p99_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        out: dict[str, Any] = {"counts": dict(self.counts)}
        out.update({k: getattr(self, k) for k in _SHADOW_FLOATS})
        return out

    @classmethod
    def from_dict(cls, d: Any) -> ShadowStats:
        """Parse strictly. Raises ContractError (missing or mistyped field)."""
        d = _obj(d, "shadow")
        floats = {k: _opt_num(d.get(k), f"shadow.{k}") for k in _SHADOW_FLOATS}
        return cls(counts=_counts(_get(d, "counts", "shadow"), "shadow.counts"), **floats)


@dataclass(frozen=True)
class ModelStats:
    """One loaded model in a report. Counters are cumulative since the agent started.

    Attributes:
        version: Model version serving.
        on_probation: Freshly installed and still being judged.
        outcomes: Requests by outcome (``ok``, ``error``, ``rejected``).
        sources: Requests answered by source (``device``, ``cloud``), when known.
        latency_buckets: Counts per ``LATENCY_BUCKETS_MS`` bucket plus one overflow bucket.
        latency_ms: Quantiles of recent latency (``p50``, ``p90``, ``p99``), in ms.
        rejects_by_reason: Requests refused by input validation, by reason.
        dropped_rows_by_reason: Rows dropped from accepted requests, by reason.
        drift: Tier-A drift windows closed since the previous report.
        shadow: Shadow-deployment statistics, if a candidate runs in shadow.
        ab: Requests per A/B arm, if traffic is split.
    """

    version: int
    on_probation: bool = False
    outcomes: Mapping[str, int] = field(default_factory=dict)
    sources: Mapping[str, int] = field(default_factory=dict)
    latency_buckets: tuple[int, ...] = (0,) * (len(LATENCY_BUCKETS_MS) + 1)
    latency_ms: Mapping[str, float] = field(default_factory=dict)
    rejects_by_reason: Mapping[str, int] = field(default_factory=dict)
    dropped_rows_by_reason: Mapping[str, int] = field(default_factory=dict)
    drift: tuple[DriftSummary, ...] = ()
    shadow: ShadowStats | None = None
    ab: Mapping[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {
            "version": self.version,
            "on_probation": self.on_probation,
            "outcomes": dict(self.outcomes),
            "sources": dict(self.sources),
            "latency_buckets": list(self.latency_buckets),
            "latency_ms": dict(self.latency_ms),
            "rejects_by_reason": dict(self.rejects_by_reason),
            "dropped_rows_by_reason": dict(self.dropped_rows_by_reason),
            "drift": [w.to_dict() for w in self.drift],
            "shadow": None if self.shadow is None else self.shadow.to_dict(),
            "ab": None if self.ab is None else dict(self.ab),
        }

    @classmethod
    def from_dict(cls, d: Any) -> ModelStats:
        """Parse strictly. Raises ContractError (missing, mistyped or out-of-range field)."""
        w = "model"
        d = _obj(d, w)
        buckets = _get(d, "latency_buckets", w)
        if not isinstance(buckets, list) or len(buckets) != len(LATENCY_BUCKETS_MS) + 1:
            raise ContractError(f"{w}: latency_buckets must have {len(LATENCY_BUCKETS_MS) + 1}")
        drift = _get(d, "drift", w)
        if not isinstance(drift, list) or len(drift) > _MAX_WINDOWS:
            raise ContractError(f"{w}: drift must be a list of at most {_MAX_WINDOWS} windows")
        lat = _obj(d.get("latency_ms", {}), f"{w}.latency_ms")
        probation = d.get("on_probation", False)
        if not isinstance(probation, bool):
            raise ContractError(f"{w}: on_probation must be a boolean")
        shadow, ab = d.get("shadow"), d.get("ab")
        return cls(
            version=_int(_get(d, "version", w), f"{w}.version"),
            on_probation=probation,
            outcomes=_counts(_get(d, "outcomes", w), f"{w}.outcomes"),
            sources=_counts(d.get("sources", {}), f"{w}.sources"),
            latency_buckets=tuple(_int(n, f"{w}.latency_buckets[]") for n in buckets),
            latency_ms={
                _label(k, f"{w}.latency_ms key"): _num(v, f"{w}.latency_ms") for k, v in lat.items()
            },
            rejects_by_reason=_counts(_get(d, "rejects_by_reason", w), f"{w}.rejects"),
            dropped_rows_by_reason=_counts(_get(d, "dropped_rows_by_reason", w), f"{w}.dropped"),
            drift=tuple(DriftSummary.from_dict(x) for x in drift),
            shadow=None if shadow is None else ShadowStats.from_dict(shadow),
            ab=None if ab is None else _counts(ab, f"{w}.ab"),
        )


@dataclass(frozen=True)
class Resources:
    """Device resources at report time: bytes and seconds."""

    rss_bytes: int = 0
    cpu_seconds: float = 0.0
    model_memory_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {
            "rss_bytes": self.rss_bytes,
            "cpu_seconds": self.cpu_seconds,
            "model_memory_bytes": self.model_memory_bytes,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Resources:
        """Parse strictly. Raises ContractError (mistyped or negative field)."""
        d = _obj(d, "resources")
        return cls(
            rss_bytes=_int(_get(d, "rss_bytes", "resources"), "resources.rss_bytes"),
            cpu_seconds=_num(_get(d, "cpu_seconds", "resources"), "resources.cpu_seconds"),
            model_memory_bytes=_int(d.get("model_memory_bytes", 0), "resources.model_memory"),
        )


@dataclass(frozen=True)
class TelemetryReport(_Wire):
    """A periodic window report of one device (topic ``.../telemetry``).

    Attributes:
        device_id: The reporting device.
        seq: Per-device outbox sequence number, shared with events.
        window_start: Unix time (s) the window opened (the previous report).
        window_end: Unix time (s) the report was built.
        started_at: Unix time (s) the agent started; counters are cumulative since then.
        agent_version: edge-agent version.
        models: Per model name, its statistics.
        counts: Agent-wide requests by source/outcome (``device``, ``cloud``, ``rejected``,
            ``errors``).
        resources: Device resource use.
        telemetry_dropped: Outbox entries dropped for lack of space, by kind (never silent).
        drift_blocks_dropped: Drift batches the background worker had to drop.
    """

    device_id: str
    seq: int
    window_start: float
    window_end: float
    started_at: float = 0.0
    agent_version: str = ""
    models: Mapping[str, ModelStats] = field(default_factory=dict)
    counts: Mapping[str, int] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    telemetry_dropped: Mapping[str, int] = field(default_factory=dict)
    drift_blocks_dropped: int = 0
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict, valid against ``telemetry-report.schema.json``."""
        return {
            "schema_version": self.schema_version,
            "type": "report",
            "device_id": self.device_id,
            "seq": self.seq,
            "window_start": self.window_start,
            "window_end": self.window_end,
            "started_at": self.started_at,
            "agent_version": self.agent_version,
            "models": {k: m.to_dict() for k, m in sorted(self.models.items())},
            "counts": dict(self.counts),
            "resources": self.resources.to_dict(),
            "telemetry_dropped": dict(self.telemetry_dropped),
            "drift_blocks_dropped": self.drift_blocks_dropped,
        }

    @classmethod
    def from_dict(cls, d: Any) -> TelemetryReport:
        """Parse strictly (unknown keys are ignored, see the module's versioning rule).

        Raises:
            ContractError: wrong schema_version or type, or a missing, mistyped or
                out-of-range field.
        """
        w = "report"
        d = _header(d, w)
        models = _obj(_get(d, "models", w), "report.models")
        if len(models) > _MAX_MODELS:
            raise ContractError(f"{w}: more than {_MAX_MODELS} models")
        start = _num(_get(d, "window_start", w), "report.window_start")
        end = _num(_get(d, "window_end", w), "report.window_end")
        if end < start:
            raise ContractError(f"{w}: window_end is before window_start")
        return cls(
            device_id=_device(_get(d, "device_id", w)),
            seq=_int(_get(d, "seq", w), "report.seq"),
            window_start=start,
            window_end=end,
            started_at=_num(d.get("started_at", 0.0), "report.started_at"),
            agent_version=_str(d.get("agent_version", ""), "report.agent_version", 64),
            models={_label(k, "model name"): ModelStats.from_dict(m) for k, m in models.items()},
            counts=_counts(d.get("counts", {}), "report.counts"),
            resources=Resources.from_dict(_get(d, "resources", w)),
            telemetry_dropped=_counts(_get(d, "telemetry_dropped", w), "report.dropped"),
            drift_blocks_dropped=_int(d.get("drift_blocks_dropped", 0), "drift_blocks_dropped"),
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> TelemetryReport:
        """Parse a payload, refusing it unread if it is larger than ``max_bytes``.

        Raises:
            ContractError: oversized, not UTF-8 JSON, NaN/Infinity, duplicate keys, or invalid.
        """
        return cls.from_dict(_load(data, max_bytes))


# --------------------------------------------------------------------------- events
@dataclass(frozen=True)
class Event(_Wire):
    """A lifecycle event (topic ``.../events``, or inside a ``Batch``).

    Attributes:
        device_id: The device.
        seq: Per-device outbox sequence number, shared with reports.
        kind: One of ``EVENT_KINDS``.
        model: Model name, if the event concerns one.
        version: Model version, if the event concerns one.
        detail: Free text for humans (at most 1,024 characters); never parse it.
        at: Unix time (s) the event happened.
    """

    device_id: str
    seq: int
    kind: str
    at: float
    model: str | None = None
    version: int | None = None
    detail: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict, valid against ``event.schema.json``."""
        return {
            "schema_version": self.schema_version,
            "type": "event",
            "device_id": self.device_id,
            "seq": self.seq,
            "kind": self.kind,
            "model": self.model,
            "version": self.version,
            "detail": self.detail,
            "at": self.at,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Event:
        """Parse strictly.

        Raises:
            ContractError: wrong schema_version or type, an unknown kind, or a missing,
                mistyped or out-of-range field.
        """
        d = _header(d, "event")
        kind = _get(d, "kind", "event")
        if kind not in EVENT_KINDS:
            raise ContractError(f"event: unknown kind {kind!r}")
        model, version = d.get("model"), d.get("version")
        return cls(
            device_id=_device(_get(d, "device_id", "event")),
            seq=_int(_get(d, "seq", "event"), "event.seq"),
            kind=kind,
            at=_num(_get(d, "at", "event"), "event.at"),
            model=None if model is None else _label(model, "event.model"),
            version=None if version is None else _int(version, "event.version"),
            detail=_str(d.get("detail", ""), "event.detail"),
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> Event:
        """Parse a payload (size-capped before parsing). Raises ContractError (invalid)."""
        return cls.from_dict(_load(data, max_bytes))


def event_from_registry(device_id: str, seq: int, entry: Mapping[str, Any]) -> Event | None:
    """An ``Event`` from one ``Registry.events`` entry; None for kinds not on the wire.

    Raises:
        ContractError: the entry's fields have the wrong types.
    """
    raw = entry.get("event")
    kind = _REGISTRY_KINDS.get(str(raw), str(raw))
    if kind not in EVENT_KINDS:
        return None
    model = entry.get("model")
    return Event.from_dict(
        {
            "schema_version": SCHEMA_VERSION,
            "type": "event",
            "device_id": device_id,
            "seq": seq,
            "kind": kind,
            "model": model,
            "version": entry.get("version"),
            "detail": str(entry.get("detail", ""))[:_MAX_TEXT],
            "at": entry.get("at", 0.0),
        }
    )


# --------------------------------------------------------------------------- status
@dataclass(frozen=True)
class StatusMessage(_Wire):
    """Retained ``.../status``: ``online`` on connect, ``offline`` on shutdown or as the will.

    The will is registered at connect time, so an ``offline``/``connection_lost`` status
    carries the time of that connection in ``at``, not the time it was lost.
    """

    device_id: str
    state: str
    at: float
    reason: str = "connected"
    agent_version: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict, valid against ``status.schema.json``."""
        return {
            "schema_version": self.schema_version,
            "type": "status",
            "device_id": self.device_id,
            "state": self.state,
            "reason": self.reason,
            "at": self.at,
            "agent_version": self.agent_version,
        }

    @classmethod
    def from_dict(cls, d: Any) -> StatusMessage:
        """Parse strictly. Raises ContractError (bad version, state, reason or field)."""
        d = _header(d, "status")
        state, reason = _get(d, "state", "status"), d.get("reason", "connected")
        if state not in STATES or reason not in STATUS_REASONS:
            raise ContractError(f"status: state {state!r} / reason {reason!r} not allowed")
        return cls(
            device_id=_device(_get(d, "device_id", "status")),
            state=state,
            at=_num(_get(d, "at", "status"), "status.at"),
            reason=reason,
            agent_version=_str(d.get("agent_version", ""), "status.agent_version", 64),
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = 4096) -> StatusMessage:
        """Parse a payload (size-capped before parsing). Raises ContractError (invalid)."""
        return cls.from_dict(_load(data, max_bytes))


# --------------------------------------------------------------------- batch and ack
@dataclass(frozen=True)
class Batch(_Wire):
    """Several reports and events of one device in one message, in ``seq`` order."""

    device_id: str
    items: tuple[TelemetryReport | Event, ...]
    schema_version: int = SCHEMA_VERSION
    # The oldest seq the device's outbox still holds: anything below it the server lacks was
    # dropped on the device and will never come (the server counts it lost and acks past it).
    floor: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= len(self.items) <= MAX_BATCH_ITEMS:
            raise ContractError(f"batch must hold 1-{MAX_BATCH_ITEMS} items")
        if self.floor is not None and (
            isinstance(self.floor, bool) or self.floor < 1 or self.floor > self.items[0].seq
        ):
            raise ContractError("batch: floor must be a seq >= 1 and <= the first item's seq")
        seqs = [i.seq for i in self.items]
        if any(i.device_id != self.device_id for i in self.items):
            raise ContractError("batch: every item must be from the batch's device")
        if any(b <= a for a, b in itertools.pairwise(seqs)):
            raise ContractError("batch: item seq numbers must be strictly increasing")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict, valid against ``telemetry-report.schema.json`` (its batch form)."""
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "type": "batch",
            "device_id": self.device_id,
            "items": [i.to_dict() for i in self.items],
        }
        if self.floor is not None:
            out["floor"] = self.floor
        return out

    @classmethod
    def from_dict(cls, d: Any) -> Batch:
        """Parse strictly.

        Raises:
            ContractError: an invalid item, items of another device, seqs out of order, an
                empty or too-large batch.
        """
        d = _header(d, "batch")
        items = _get(d, "items", "batch")
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH_ITEMS:
            raise ContractError(f"batch: items must be a list of 1-{MAX_BATCH_ITEMS}")
        parsed: list[TelemetryReport | Event] = []
        for item in items:
            kind = _obj(item, "batch item").get("type")
            if kind == "report":
                parsed.append(TelemetryReport.from_dict(item))
            elif kind == "event":
                parsed.append(Event.from_dict(item))
            else:
                raise ContractError(f"batch: item type {kind!r} is not 'report' or 'event'")
        floor = d.get("floor")
        if floor is not None and (isinstance(floor, bool) or not isinstance(floor, int)):
            raise ContractError("batch: floor must be an integer")
        return cls(
            device_id=_device(_get(d, "device_id", "batch")), items=tuple(parsed), floor=floor
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> Batch:
        """Parse a payload (size-capped before parsing). Raises ContractError (invalid)."""
        return cls.from_dict(_load(data, max_bytes))


@dataclass(frozen=True)
class TelemetryAck(_Wire):
    """Server -> device (``.../ack``): every item with ``seq <= upto_seq`` is stored."""

    device_id: str
    upto_seq: int
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {
            "schema_version": self.schema_version,
            "type": "ack",
            "device_id": self.device_id,
            "upto_seq": self.upto_seq,
        }

    @classmethod
    def from_dict(cls, d: Any) -> TelemetryAck:
        """Parse strictly. Raises ContractError (bad version, device id or seq)."""
        d = _header(d, "ack")
        return cls(
            device_id=_device(_get(d, "device_id", "ack")),
            upto_seq=_int(_get(d, "upto_seq", "ack"), "ack.upto_seq"),
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = 4096) -> TelemetryAck:
        """Parse a payload (size-capped before parsing). Raises ContractError (invalid)."""
        return cls.from_dict(_load(data, max_bytes))


_DECODERS: Final[dict[str, Any]] = {
    "report": TelemetryReport,
    "event": Event,
    "batch": Batch,
    "status": StatusMessage,
    "ack": TelemetryAck,
}


def decode_message(
    data: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES
) -> TelemetryReport | Event | Batch | StatusMessage | TelemetryAck:
    """Parse any telemetry payload by its ``type`` field (what an ingest worker calls).

    Raises:
        ContractError: oversized, not JSON, an unknown type, or invalid for its type.
    """
    d = _obj(_load(data, max_bytes), "payload")
    kind = d.get("type")
    decoder = _DECODERS.get(kind) if isinstance(kind, str) else None
    if decoder is None:
        raise ContractError(f"unknown payload type {d.get('type')!r}")
    out: TelemetryReport | Event | Batch | StatusMessage | TelemetryAck = decoder.from_dict(d)
    return out


# --------------------------------------------------------------------------- builder
def latency_histogram(latencies_ms: Iterable[float]) -> tuple[int, ...]:
    """Counts per ``LATENCY_BUCKETS_MS`` bucket (plus overflow) of some latencies in ms.

    NaN latencies are ignored.
    """
    counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    for ms in latencies_ms:
        if math.isnan(ms):
            continue
        i = next((j for j, e in enumerate(LATENCY_BUCKETS_MS) if ms <= e), len(LATENCY_BUCKETS_MS))
        counts[i] += 1
    return tuple(counts)


def _ints_of(d: Any) -> dict[str, int]:
    if not isinstance(d, Mapping):
        return {}
    return {
        str(k): int(v)
        for k, v in d.items()
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0 and _LABEL.fullmatch(str(k))
    }


def _count_or_zero(v: Any) -> int:
    ok = isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _MAX_INT
    return int(v) if ok else 0


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _model_from_status(m: Mapping[str, Any], windows: Iterable[DriftWindow]) -> ModelStats:
    requests = _count_or_zero(m.get("requests"))
    errors = _count_or_zero(m.get("errors"))
    rejects = _ints_of(m.get("rejects_by_reason"))
    rejected = sum(rejects.values())
    buckets = m.get("latency_buckets")
    if not (isinstance(buckets, list | tuple) and len(buckets) == len(LATENCY_BUCKETS_MS) + 1):
        buckets = (0,) * (len(LATENCY_BUCKETS_MS) + 1)
    latency = m.get("latency") if isinstance(m.get("latency"), Mapping) else {}
    lat = {
        str(k).removesuffix("_ms"): f
        for k, v in (latency or {}).items()
        if (f := _finite(v)) is not None and f >= 0
    }
    shadow_raw = m.get("shadow")
    shadow = None
    if isinstance(shadow_raw, Mapping):
        shadow = ShadowStats(
            counts=_ints_of({k: shadow_raw.get(k) for k in _SHADOW_INTS}),
            **{k: _finite(shadow_raw.get(k)) for k in _SHADOW_FLOATS},
        )
    ab = m.get("ab")
    return ModelStats(
        version=_count_or_zero(m.get("version")),
        on_probation=bool(m.get("on_probation", False)),
        # Row-level rejects are inside ``requests``; request-level ones are not, so ``ok``
        # is a lower bound when clients send malformed requests.
        outcomes={
            "ok": max(0, requests - errors - rejected),
            "error": errors,
            "rejected": rejected,
        },
        sources=_ints_of(m.get("sources")),
        latency_buckets=tuple(_count_or_zero(b) for b in buckets),
        latency_ms=lat,
        rejects_by_reason=rejects,
        dropped_rows_by_reason=_ints_of(m.get("dropped_rows_by_reason")),
        drift=tuple(DriftSummary.from_window(w) for w in windows),
        shadow=shadow,
        ab=_ints_of(ab) if isinstance(ab, Mapping) else None,
    )


def report_from_status(
    device_id: str,
    seq: int,
    status: Mapping[str, Any],
    windows: Iterable[tuple[str, int, DriftWindow]],
    now: float,
    *,
    window_start: float | None = None,
    resources: Resources | None = None,
    telemetry_dropped: Mapping[str, int] | None = None,
) -> TelemetryReport:
    """Build a report from ``Agent.status()`` and the drift windows closed since the last one.

    Tolerant: missing or mistyped optional parts of ``status`` become zeros or are left out.
    ``windows`` are ``(model, version, window)`` as ``Agent.drift_windows`` holds them; windows
    of models not in ``status`` are dropped. Only the first ``_MAX_WINDOWS`` per model are kept.

    Raises:
        ContractError: an invalid device id, a negative seq, or a non-finite ``now``.
    """
    uptime = _finite(status.get("uptime_s")) or 0.0
    per_model: dict[str, list[DriftWindow]] = {}
    for key, _version, window in windows:
        per_model.setdefault(key, []).append(window)
    raw_models = status.get("models")
    models = {}
    if isinstance(raw_models, Mapping):
        for key, m in list(raw_models.items())[:_MAX_MODELS]:
            if isinstance(m, Mapping) and _LABEL.fullmatch(str(key)):
                models[str(key)] = _model_from_status(m, per_model.get(key, [])[:_MAX_WINDOWS])
    report = TelemetryReport(
        device_id=device_id,
        seq=seq,
        window_start=now if window_start is None else window_start,
        window_end=now,
        # The agent's own start time when it gives one: ``now - uptime`` jitters with rounding,
        # and consumers take a changed started_at for a restart.
        started_at=_finite(status.get("started_at")) or max(0.0, now - uptime),
        agent_version=str(status.get("version", ""))[:64],
        models=models,
        counts=_ints_of(status.get("counts")),
        resources=resources
        or Resources(model_memory_bytes=_count_or_zero(status.get("memory_used_bytes"))),
        telemetry_dropped=dict(telemetry_dropped or {}),
        drift_blocks_dropped=_count_or_zero(status.get("drift_blocks_dropped")),
    )
    # Round-trip through the strict parser so a report we build is one we would accept.
    return TelemetryReport.from_dict(report.to_dict())
