"""Reading a rollout's telemetry window: rollups where folded, raw rows at its edges.

Owns: ``rollout_inputs`` (per targeted device, what ``rollouts.observation.observe`` needs for its
window, including the output drift windows' moments folded into rollups) and ``before_outputs``
(per device, the output moments of one version over a closed time range: the last wave's
reference, the devices' windows before they switched). Does not own: the range plan and the
shared reads (``queries``), the observation itself (``rollouts.observation``). Every statement
carries its time range; nothing here reads a device's whole history.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edge_agent.errors import ContractError
from fleet_server.history.cells import DriftPart, RollupCell, drift_slices
from fleet_server.history.queries import (
    FINE_S,
    HOUR_S,
    ceil_time,
    floor_time,
    folded_marks,
    last_reports,
)
from fleet_server.registry.store import Registry
from fleet_server.registry.tables.core import TelemetryRollup, TelemetryRow
from fleet_server.registry.values import StoredTelemetry
from fleet_server.rollouts.metrics import OutputMoments, TensorMoments, WindowMetrics
from fleet_server.rollouts.observation import interval_metrics, report_outputs

__all__ = ["BeforeSwitch", "RolloutInputs", "before_outputs", "rollout_inputs"]

_CHUNK = 500
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class RolloutInputs:
    """One device's rollout window: raw rows to observe from ``since`` plus folded totals."""

    rows: list[StoredTelemetry] = field(default_factory=list)
    folded: WindowMetrics = field(default_factory=WindowMetrics)
    events: set[str] = field(default_factory=set)
    outputs: OutputMoments = field(default_factory=OutputMoments)


@dataclass
class BeforeSwitch:
    """One member's ``from_version`` window before it switched: metrics and output moments."""

    metrics: WindowMetrics = field(default_factory=WindowMetrics)
    outputs: OutputMoments = field(default_factory=OutputMoments)


def rollout_inputs(
    registry: Registry,
    model: str,
    windows: Mapping[str, tuple[datetime, int | None]],
) -> dict[str, RolloutInputs]:
    """Per device ``(since, version)``: what ``rollouts.observation.observe`` needs.

    ``rows`` are the raw rows of ``[since, first fine boundary)`` (the whole ``[since, now)``
    when nothing after ``since`` is folded) with the last report before ``since``; ``folded``,
    ``events`` and ``outputs`` (the output drift windows' moments) hold the rollups from that
    boundary to ``folded_until`` (whole hours from the hourly ones, the edges from the 5-minute
    ones) and the raw rows after it, so a rollout step reads O(devices x buckets), not every
    row since the rollout started.

    Raises:
        RegistryUnavailableError: the database failed.
    """
    out = {d: RolloutInputs() for d in windows}
    with registry.read_session("reading rollout telemetry") as s:
        fine_done, hour_done = folded_marks(s)
        by_since: dict[datetime, list[str]] = {}
        for d, (since, _v) in windows.items():
            by_since.setdefault(since, []).append(d)
        tails: list[str] = []
        for since, devices in by_since.items():
            edge = ceil_time(since, FINE_S)
            if fine_done is None or fine_done <= since:
                _raw_part(s, devices, since, None, out)
                continue
            _raw_part(s, devices, since, edge, out)
            for level, lo, hi in _levels(edge, fine_done, hour_done):
                _folded_part(s, model, devices, level, lo, hi, windows, out)
            tails += devices
        if fine_done is not None and tails:
            _tail_part(s, model, tails, fine_done, windows, out)
    return out


def _raw_part(
    s: Session,
    devices: list[str],
    since: datetime,
    until: datetime | None,
    out: dict[str, RolloutInputs],
) -> None:
    prior = last_reports(s, devices, since)
    for i in range(0, len(devices), _CHUNK):
        chunk = devices[i : i + _CHUNK]
        stmt = select(TelemetryRow).where(
            TelemetryRow.device_id.in_(chunk), TelemetryRow.received_at >= since
        )
        if until is not None:
            stmt = stmt.where(TelemetryRow.received_at < until)
        for r in s.scalars(stmt):
            out[r.device_id].rows.append(
                StoredTelemetry(r.id, r.device_id, r.seq, r.kind, r.received_at, r.payload)
            )
    for d, payload in prior.items():
        # The baseline row only serves the first difference: seq below every row of the window.
        out[d].rows.append(StoredTelemetry(0, d, -1, "report", _EPOCH, payload))


def _levels(
    lo: datetime, hi: datetime, hour_done: datetime | None
) -> list[tuple[int, datetime, datetime]]:
    """``[lo, hi)`` (on 5-minute boundaries) as whole folded hours plus 5-minute edges, so a
    window older than the 5-minute rollups' retention is still read (from its hours)."""
    h_lo, h_hi = ceil_time(lo, HOUR_S), min(floor_time(hi, HOUR_S), hour_done or lo)
    if h_lo >= h_hi:
        return [(FINE_S, lo, hi)]
    return [(FINE_S, lo, h_lo), (HOUR_S, h_lo, h_hi), (FINE_S, h_hi, hi)]


def _folded_part(
    s: Session,
    model: str,
    devices: list[str],
    level: int,
    lo: datetime,
    hi: datetime,
    windows: Mapping[str, tuple[datetime, int | None]],
    out: dict[str, RolloutInputs],
) -> None:
    if lo >= hi:
        return
    for i in range(0, len(devices), _CHUNK):
        chunk = devices[i : i + _CHUNK]
        stmt = select(
            TelemetryRollup.device_id,
            TelemetryRollup.version,
            TelemetryRollup.device_group,
            TelemetryRollup.max_psi,
            TelemetryRollup.metrics,
            TelemetryRollup.drift,
            TelemetryRollup.drift_arrays,
        ).where(
            TelemetryRollup.bucket_seconds == level,
            TelemetryRollup.bucket_start >= lo,
            TelemetryRollup.bucket_start < hi,
            TelemetryRollup.model == model,
            TelemetryRollup.device_id.in_(chunk),
        )
        for dev, ver, group, psi, metrics, drift, blob in s.execute(stmt):
            if windows[dev][1] != ver:
                continue
            cell = RollupCell.from_docs(group, psi, metrics, None)
            target = out[dev]
            target.folded = target.folded.merge(cell.metrics)
            target.events.update(k for k, n in cell.events.items() if n > 0)
            target.outputs = target.outputs.merge(_rollup_outputs(drift, blob))


def _tail_part(
    s: Session,
    model: str,
    devices: list[str],
    since: datetime,
    windows: Mapping[str, tuple[datetime, int | None]],
    out: dict[str, RolloutInputs],
) -> None:
    prior = last_reports(s, devices, since)
    for i in range(0, len(devices), _CHUNK):
        chunk = devices[i : i + _CHUNK]
        stmt = (
            select(TelemetryRow.device_id, TelemetryRow.kind, TelemetryRow.payload)
            .where(TelemetryRow.device_id.in_(chunk), TelemetryRow.received_at >= since)
            .order_by(TelemetryRow.device_id, TelemetryRow.seq)
        )
        for dev, kind, payload in s.execute(stmt):
            version = windows[dev][1]
            target = out[dev]
            if kind == "event":
                if payload.get("model") == model and payload.get("version") == version:
                    target.events.add(str(payload.get("kind")))
                continue
            prev = prior.get(dev)
            if prev is not None:
                delta = interval_metrics(prev, payload, model, version)
                if delta is not None:
                    target.folded = target.folded.merge(delta)
                    target.outputs = target.outputs.merge(report_outputs(payload, model, version))
            prior[dev] = payload


def _rollup_outputs(drift: Mapping[str, Any] | None, blob: bytes | None) -> OutputMoments:
    """The output parts of one rollup row as moments (a part that does not decode is left out:
    rollups are written by ``fleet_server.history`` alone)."""
    out = OutputMoments()
    try:
        for tensor, role, doc, data in drift_slices(drift or {}, blob or b""):
            if role != "output":
                continue
            p = DriftPart.from_doc(doc, data)
            t = TensorMoments.of(p.count.tolist(), p.sum.tolist(), p.sumsq.tolist(), p.windows)
            out = out.merge(OutputMoments.of_tensor(tensor, t))
    except ContractError:
        return out
    return out


def before_outputs(
    registry: Registry,
    model: str,
    windows: Mapping[str, tuple[datetime, datetime, int | None]],
) -> dict[str, BeforeSwitch]:
    """Per device ``(since, until, version)``: its metrics and output moments of ``version``
    in the range.

    The folded part comes from the rollups (whole hours from the hourly ones, 5-minute edges
    from the fine ones), the rest from the raw rows at the range's edges and after the fine
    level's ``folded_until``; a raw report counts its output windows when its interval counts
    (``rollouts.observation.interval_metrics``), as an observation does.

    Raises:
        RegistryUnavailableError: the database failed.
    """
    out = {d: BeforeSwitch() for d in windows}
    by_range: dict[tuple[datetime, datetime], list[str]] = {}
    for d, (lo, hi, _v) in windows.items():
        if lo < hi:
            by_range.setdefault((lo, hi), []).append(d)
    if not by_range:
        return out
    versions = {d: v for d, (_lo, _hi, v) in windows.items()}
    with registry.read_session("reading output windows before a rollout") as s:
        fine_done, hour_done = folded_marks(s)
        for (lo, hi), devices in by_range.items():
            edge, end = ceil_time(lo, FINE_S), floor_time(hi, FINE_S)
            if fine_done is not None:
                end = min(end, floor_time(fine_done, FINE_S))
            if fine_done is None or edge >= end:
                _raw_outputs(s, model, devices, lo, hi, versions, out)
                continue
            _raw_outputs(s, model, devices, lo, edge, versions, out)
            folded = {d: RolloutInputs() for d in devices}
            win = {d: (lo, versions[d]) for d in devices}
            for level, a, b in _levels(edge, end, hour_done):
                _folded_part(s, model, devices, level, a, b, win, folded)
            for d in devices:
                out[d].metrics = out[d].metrics.merge(folded[d].folded)
                out[d].outputs = out[d].outputs.merge(folded[d].outputs)
            _raw_outputs(s, model, devices, end, hi, versions, out)
    return out


def _raw_outputs(
    s: Session,
    model: str,
    devices: list[str],
    lo: datetime,
    hi: datetime,
    versions: Mapping[str, int | None],
    out: dict[str, BeforeSwitch],
) -> None:
    if lo >= hi:
        return
    prior = last_reports(s, devices, lo)
    for i in range(0, len(devices), _CHUNK):
        chunk = devices[i : i + _CHUNK]
        stmt = (
            select(TelemetryRow.device_id, TelemetryRow.payload)
            .where(
                TelemetryRow.device_id.in_(chunk),
                TelemetryRow.kind == "report",
                TelemetryRow.received_at >= lo,
                TelemetryRow.received_at < hi,
            )
            .order_by(TelemetryRow.device_id, TelemetryRow.seq)
        )
        for dev, payload in s.execute(stmt):
            prev, version = prior.get(dev), versions[dev]
            m = None if prev is None else interval_metrics(prev, payload, model, version)
            if m is not None:
                out[dev].metrics = out[dev].metrics.merge(m)
                out[dev].outputs = out[dev].outputs.merge(report_outputs(payload, model, version))
            prior[dev] = payload
