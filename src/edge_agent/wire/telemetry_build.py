"""Building a ``TelemetryReport`` from ``Agent.status()`` (pure, tolerant).

Owns ``report_from_status`` (tolerant of missing or mistyped optional parts of the status),
``latency_histogram`` (latencies -> counts per ``LATENCY_BUCKETS_MS`` bucket) and
``drift_alert_entries`` (the ``drift_alert`` events of closed windows). Does not own the
report's wire format or its strict parser (``edge_agent.wire.telemetry_report``), publishing or
storing (the sync loop and the outbox); does no I/O. ``edge_agent.wire.telemetry`` re-exports both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from edge_agent.drift.monitor import DriftWindow
from edge_agent.wire.fields import _LABEL, _MAX_INT
from edge_agent.wire.telemetry_report import (
    _MAX_MODELS,
    _MAX_WINDOWS,
    _SHADOW_FLOATS,
    _SHADOW_INTS,
    LATENCY_BUCKETS_MS,
    LATENCY_FINE_BUCKETS_MS,
    DriftSummary,
    ModelStats,
    Resources,
    ShadowStats,
    TelemetryReport,
    coarse_from_fine,
)

__all__ = ["latency_histogram", "report_from_status"]


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
    coarse = tuple(_count_or_zero(b) for b in buckets)
    fine_raw, fine = m.get("latency_fine"), None
    if isinstance(fine_raw, list | tuple) and len(fine_raw) == len(LATENCY_FINE_BUCKETS_MS) + 1:
        fine = tuple(_count_or_zero(b) for b in fine_raw)
        coarse = coarse_from_fine(fine)  # the report's two histograms always agree
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
        latency_buckets=coarse,
        latency_fine=fine,
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


def drift_alert_entries(
    windows: Iterable[tuple[str, int, DriftWindow]], at: float
) -> list[dict[str, object]]:
    """One ``drift_alert`` event entry per window that starts an alert episode (pure).

    ``windows`` are ``(model key, version, window)`` as ``Agent.drift_windows`` holds them (a
    pinned key ``name@version`` names its model); the entries have the shape of
    ``Registry.events`` entries, for ``telemetry.event_from_registry``. A tensor that keeps
    drifting window after window is announced once, when it starts.
    """
    entries: list[dict[str, object]] = []
    for key, version, window in windows:
        if not window.alert_started:
            continue
        drifted = [int(i) for i in np.flatnonzero(window.verdict.drifted)]
        shown = ", ".join(map(str, drifted[:20])) + (", ..." if len(drifted) > 20 else "")
        detail = (
            f"{window.role} {window.tensor!r}: {len(drifted)} feature(s) drifted [{shown}] "
            f"in a window of {window.rows} rows"
        )
        entries.append(
            {
                "model": key.partition("@")[0],
                "version": version,
                "event": "drift_alert",
                "detail": detail,
                "at": at,
            }
        )
    return entries
