"""The periodic telemetry report: ``TelemetryReport`` and the value types inside it.

Owns ``TelemetryReport`` (one device's window report) with its parts ``ModelStats``,
``DriftSummary``, ``ShadowStats`` and ``Resources`` (frozen, strict ``from_dict``, canonical
``to_bytes``, size-capped ``from_bytes``), the fixed latency bucket edges and the report's caps.
Does not own building a report from ``Agent.status()`` (``edge_agent.wire.telemetry_build``), the
other payloads (events, status, batches, acks: ``edge_agent.wire.telemetry``, which re-exports every
public name here) or publishing anything; does no I/O.
"""

from __future__ import annotations

import base64
import binascii
import math
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from edge_agent.drift.monitor import DriftWindow
from edge_agent.drift.view import TierAView
from edge_agent.errors import ContractError
from edge_agent.wire.fields import (
    MAX_PAYLOAD_BYTES,
    SCHEMA_VERSION,
    _counts,
    _device,
    _get,
    _header,
    _int,
    _label,
    _load,
    _num,
    _obj,
    _opt_num,
    _str,
    _Wire,
)

__all__ = [
    "LATENCY_BUCKETS_MS",
    "LATENCY_FINE_BUCKETS_MS",
    "DriftSummary",
    "ModelStats",
    "Resources",
    "ShadowStats",
    "TelemetryReport",
    "coarse_from_fine",
]

#: Upper bucket edges (ms, inclusive); bucket ``i`` counts ``edge[i-1] < ms <= edge[i]``, the
#: last bucket counts everything above 5,000 ms. Fixed for schema_version 1.
LATENCY_BUCKETS_MS: Final = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0)
_R10: Final = (1.0, 1.25, 1.6, 2.0, 2.5, 3.15, 4.0, 5.0, 6.3, 8.0)
#: Upper edges (ms, inclusive) of the fine latency histogram (``ModelStats.latency_fine``): the
#: Renard R10 series (10 log-spaced steps a decade, about 26 % apart) from 50 us to 5 s, so
#: sub-millisecond models are resolved. Every ``LATENCY_BUCKETS_MS`` edge is one of these edges,
#: so a fine histogram collapses exactly onto the coarse one (``coarse_from_fine``).
LATENCY_FINE_BUCKETS_MS: Final = tuple(
    e for e in (round(m * 10.0**k, 6) for k in range(-2, 4) for m in _R10) if 0.05 <= e <= 5000.0
)
# Coarse bucket of each fine bucket (the last, overflow, to the coarse overflow).
_COARSE_OF_FINE: Final = tuple(
    [bisect_left(LATENCY_BUCKETS_MS, e) for e in LATENCY_FINE_BUCKETS_MS]
    + [len(LATENCY_BUCKETS_MS)]
)
_MAX_MODELS: Final = 32
_MAX_WINDOWS: Final = 64
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


def coarse_from_fine(fine: Sequence[int]) -> tuple[int, ...]:
    """The ``LATENCY_BUCKETS_MS`` histogram of a ``LATENCY_FINE_BUCKETS_MS`` one (exact).

    Raises:
        ContractError: ``fine`` does not have one count per fine bucket plus overflow.
    """
    if len(fine) != len(_COARSE_OF_FINE):
        raise ContractError(f"latency_fine must have {len(_COARSE_OF_FINE)} counts")
    out = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    for i, n in zip(_COARSE_OF_FINE, fine, strict=True):
        out[i] += n
    return tuple(out)


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
        latency_fine: Counts per ``LATENCY_FINE_BUCKETS_MS`` bucket plus overflow, or None
            (agents before it, and reports that predate it: the key is then absent). When
            present, ``latency_buckets`` is exactly ``coarse_from_fine(latency_fine)``.
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
    latency_fine: tuple[int, ...] | None = None
    rejects_by_reason: Mapping[str, int] = field(default_factory=dict)
    dropped_rows_by_reason: Mapping[str, int] = field(default_factory=dict)
    drift: tuple[DriftSummary, ...] = ()
    shadow: ShadowStats | None = None
    ab: Mapping[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (``latency_fine`` only when known: old reports stay byte-identical)."""
        out = {
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
        if self.latency_fine is not None:
            out["latency_fine"] = list(self.latency_fine)
        return out

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
        coarse = tuple(_int(n, f"{w}.latency_buckets[]") for n in buckets)
        fine_raw, fine = d.get("latency_fine"), None
        if fine_raw is not None:
            if not isinstance(fine_raw, list):
                raise ContractError(f"{w}: latency_fine must be a list")
            fine = tuple(_int(n, f"{w}.latency_fine[]") for n in fine_raw)
            if coarse_from_fine(fine) != coarse:
                raise ContractError(f"{w}: latency_fine does not add up to latency_buckets")
        return cls(
            version=_int(_get(d, "version", w), f"{w}.version"),
            on_probation=probation,
            outcomes=_counts(_get(d, "outcomes", w), f"{w}.outcomes"),
            sources=_counts(d.get("sources", {}), f"{w}.sources"),
            latency_buckets=coarse,
            latency_fine=fine,
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
