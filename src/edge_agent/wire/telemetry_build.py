"""Building a ``TelemetryReport`` from ``Agent.status()`` (pure, tolerant).

Owns ``report_from_status`` (the report around the models: window, agent-wide counters; each
model is built part by part by ``ModelStats.from_status``, tolerant of missing or mistyped
optional parts of the status) and ``drift_alert_entries`` (the ``drift_alert`` events of closed
windows). Does not own the report's wire format or its strict parser
(``edge_agent.wire.telemetry_report`` and the part modules), publishing or storing (the sync loop
and the outbox); does no I/O. ``edge_agent.wire.telemetry`` re-exports ``report_from_status``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from edge_agent.drift.monitor import DriftWindow
from edge_agent.wire.fields import LABEL, count_or_zero, finite_or_none, tolerant_counts
from edge_agent.wire.telemetry_drift import MAX_WINDOWS
from edge_agent.wire.telemetry_model import ModelStats
from edge_agent.wire.telemetry_report import MAX_MODELS, Resources, TelemetryReport

__all__ = ["drift_alert_entries", "report_from_status"]


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
    of models not in ``status`` are dropped. Only the first ``MAX_WINDOWS`` per model are kept.

    Raises:
        ContractError: an invalid device id, a negative seq, or a non-finite ``now``.
    """
    uptime = finite_or_none(status.get("uptime_s")) or 0.0
    per_model: dict[str, list[DriftWindow]] = {}
    for key, _version, window in windows:
        per_model.setdefault(key, []).append(window)
    raw_models = status.get("models")
    models = {}
    if isinstance(raw_models, Mapping):
        for key, m in list(raw_models.items())[:MAX_MODELS]:
            if isinstance(m, Mapping) and LABEL.fullmatch(str(key)):
                models[str(key)] = ModelStats.from_status(m, per_model.get(key, [])[:MAX_WINDOWS])
    report = TelemetryReport(
        device_id=device_id,
        seq=seq,
        window_start=now if window_start is None else window_start,
        window_end=now,
        # The agent's own start time when it gives one: ``now - uptime`` jitters with rounding,
        # and consumers take a changed started_at for a restart.
        started_at=finite_or_none(status.get("started_at")) or max(0.0, now - uptime),
        agent_version=str(status.get("version", ""))[:64],
        models=models,
        counts=tolerant_counts(status.get("counts")),
        resources=resources
        or Resources(model_memory_bytes=count_or_zero(status.get("memory_used_bytes"))),
        telemetry_dropped=dict(telemetry_dropped or {}),
        drift_blocks_dropped=count_or_zero(status.get("drift_blocks_dropped")),
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
