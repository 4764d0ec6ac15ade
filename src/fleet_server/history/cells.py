"""Rollup cells: the exact, mergeable totals of one device on one model version in one bucket.

Owns: ``RollupCell`` (counter differences as ``WindowMetrics``, rejects and events by kind,
merged tier-A views per tensor and role), ``fold_rows`` (raw rows of one bucket, plus each
device's last report before it, into cells), ``merge_cells`` (cells of finer buckets into one
coarser cell) and the cells' JSON form for the ``telemetry_rollups`` table. Does not own:
reading or writing the database (``job``, ``queries``), scoring drift (``fleet_drift``).

Pure: values in, values out; no clock, files or database.

Exactness: counters fold by the same rule as a rollout observation
(``rollout_metrics.interval_metrics``: a report counts its difference to the device's previous
report, received in any earlier bucket), so summing the cells of any bucket split of a time
range gives the same totals as observing the raw rows of that range. Tier-A views merge by
integer addition (``fleet_drift.merge_windows``); only the float ``sum``/``sumsq`` may differ in
the last bits with the order of addition.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from edge_agent.drift import TierAView
from edge_agent.errors import ContractError
from fleet_server.errors import DriftMismatchError
from fleet_server.fleet_drift import merge_windows
from fleet_server.rollout_metrics import WindowMetrics, interval_metrics, reject_deltas

__all__ = [
    "CellKey",
    "DriftPart",
    "RawRow",
    "RollupCell",
    "fold_rows",
    "merge_cells",
]

#: (device_id, model, version)
CellKey = tuple[str, str, int]
_COUNTERS = tuple(f.name for f in fields(WindowMetrics) if f.name not in ("max_psi",))


@dataclass(frozen=True)
class RawRow:
    """The fields of a stored telemetry row a fold reads."""

    device_id: str
    seq: int
    kind: str
    received_at: datetime
    payload: Mapping[str, Any]


@dataclass
class DriftPart:
    """Merged tier-A views of one tensor and role (``windows``: how many were merged)."""

    view: TierAView
    windows: int


@dataclass
class RollupCell:
    """Totals of one (device, model, version) in one bucket (mutable while folding)."""

    group: str
    metrics: WindowMetrics = field(default_factory=WindowMetrics)
    rejects: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    drift: dict[tuple[str, str], DriftPart] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    # ------------------------------------------------------------------ merging
    def add_drift(self, tensor: str, role: str, view: TierAView, windows: int = 1) -> None:
        """Merge a view into this cell's (tensor, role) part; other edges are counted skipped."""
        part = self.drift.get((tensor, role))
        if part is None:
            self.drift[(tensor, role)] = DriftPart(view, windows)
            return
        try:
            part.view = merge_windows([part.view, view])
        except DriftMismatchError as exc:
            self._skip(f"{exc.reason}_mismatch", windows)
            return
        part.windows += windows

    def merge(self, other: RollupCell) -> None:
        """Add ``other`` into this cell (same key; the later group wins)."""
        self.group = other.group
        self.metrics = self.metrics.merge(other.metrics)
        for target, source in ((self.rejects, other.rejects), (self.events, other.events)):
            for k, v in source.items():
                target[k] = target.get(k, 0) + v
        for (tensor, role), part in other.drift.items():
            self.add_drift(tensor, role, part.view, part.windows)
        for k, v in other.skipped.items():
            self._skip(k, v)

    def _skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    # ------------------------------------------------------------------ storage form
    def metrics_doc(self) -> dict[str, Any]:
        """The ``metrics`` JSON column."""
        m = self.metrics
        doc: dict[str, Any] = {k: getattr(m, k) for k in _COUNTERS if k != "latency_buckets"}
        doc["latency_buckets"] = list(m.latency_buckets)
        doc["rejects"] = dict(self.rejects)
        doc["events"] = dict(self.events)
        return doc

    def drift_doc(self) -> dict[str, Any]:
        """The ``drift`` JSON column."""
        parts = [
            {
                "tensor": t,
                "role": r,
                "windows": p.windows,
                "view": base64.b64encode(p.view.to_bytes()).decode("ascii"),
            }
            for (t, r), p in sorted(self.drift.items())
        ]
        return {"parts": parts, "skipped": dict(self.skipped)}

    @classmethod
    def from_docs(
        cls,
        group: str,
        max_psi: float | None,
        metrics: Mapping[str, Any],
        drift: Mapping[str, Any] | None,
    ) -> RollupCell:
        """Rebuild a cell from its row (``drift`` None: leave the views out, cheaper).

        Raises:
            ContractError: a stored view does not decode (the row was not written by us).
        """
        counters = {k: int(metrics.get(k, 0)) for k in _COUNTERS if k != "latency_buckets"}
        wm = WindowMetrics(
            **counters,
            max_psi=max_psi,
            latency_buckets=tuple(int(x) for x in metrics.get("latency_buckets", ())),
        )
        cell = cls(
            group,
            wm,
            {str(k): int(v) for k, v in (metrics.get("rejects") or {}).items()},
            {str(k): int(v) for k, v in (metrics.get("events") or {}).items()},
        )
        if drift is not None:
            for p in drift.get("parts") or ():
                try:
                    view = TierAView.from_bytes(base64.b64decode(p["view"], validate=True))
                except (KeyError, TypeError, binascii.Error, ValueError) as exc:
                    raise ContractError(f"stored rollup view does not decode: {exc}") from exc
                cell.drift[(str(p["tensor"]), str(p["role"]))] = DriftPart(view, int(p["windows"]))
            cell.skipped = {str(k): int(v) for k, v in (drift.get("skipped") or {}).items()}
        return cell


# --------------------------------------------------------------------------- folding
def fold_rows(
    rows: Iterable[RawRow],
    previous: Mapping[str, Mapping[str, Any]],
    groups: Mapping[str, str],
) -> dict[CellKey, RollupCell]:
    """Fold one bucket's raw rows into cells.

    Args:
        rows: Every stored row received in the bucket (reports and events), any order.
        previous: Per device, the payload of its last report received before the bucket (the
            baseline of its first counter difference); absent devices have none.
        groups: Each device's group (``"(unknown)"`` when missing).

    Returns:
        Cells by (device, model, version); malformed payloads are counted or skipped, never
        raised.
    """
    cells: dict[CellKey, RollupCell] = {}
    by_device: dict[str, list[RawRow]] = {}
    for r in rows:
        by_device.setdefault(r.device_id, []).append(r)

    def cell(device: str, model: str, version: int) -> RollupCell:
        key = (device, model, version)
        found = cells.get(key)
        if found is None:
            found = cells[key] = RollupCell(groups.get(device, "(unknown)"))
        return found

    for device, own in by_device.items():
        prev = previous.get(device)
        for r in sorted(own, key=lambda x: x.seq):
            if r.kind == "event":
                _fold_event(r, cell)
            elif r.kind == "report":
                _fold_report(device, prev, r.payload, cell)
                prev = r.payload
    return cells


def _fold_event(r: RawRow, cell: Any) -> None:
    p = r.payload
    model, version, kind = p.get("model"), p.get("version"), p.get("kind")
    if not isinstance(model, str) or not isinstance(version, int) or isinstance(version, bool):
        return
    target: RollupCell = cell(r.device_id, model, version)
    name = str(kind)[:64]
    target.events[name] = target.events.get(name, 0) + 1


def _fold_report(
    device: str, prev: Mapping[str, Any] | None, payload: Mapping[str, Any], cell: Any
) -> None:
    models = payload.get("models")
    if not isinstance(models, Mapping):
        return
    for model, stats in models.items():
        if not isinstance(stats, Mapping):
            continue
        version = stats.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            continue
        target: RollupCell = cell(device, str(model), version)
        if prev is not None:
            delta = interval_metrics(prev, payload, str(model), version)
            if delta is not None:
                target.metrics = target.metrics.merge(delta)
                for k, v in reject_deltas(prev, payload, str(model)).items():
                    target.rejects[k] = target.rejects.get(k, 0) + v
        _fold_drift(target, stats.get("drift"))


def _fold_drift(target: RollupCell, windows: Any) -> None:
    for w in windows or ():
        try:
            tensor, role = w["tensor"], w["role"]
            if not isinstance(tensor, str) or role not in ("input", "output"):
                raise ContractError("bad tensor or role")
            view = TierAView.from_bytes(base64.b64decode(w["view"], validate=True))
        except (ContractError, KeyError, TypeError, binascii.Error, ValueError):
            target._skip("bad_window")
            continue
        target.add_drift(tensor, role, view)


def merge_cells(
    parts: Sequence[tuple[CellKey, RollupCell]],
) -> dict[CellKey, RollupCell]:
    """Merge finer cells into one cell per key (the coarser bucket's)."""
    out: dict[CellKey, RollupCell] = {}
    for key, c in parts:
        found = out.get(key)
        if found is None:
            out[key] = RollupCell(c.group)
            found = out[key]
        found.merge(c)
    return out
