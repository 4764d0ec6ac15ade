"""Fleet-wide drift: exact merges of device tier-A windows, scored like the agent scores them.

Owns: the exact merge of tier-A views (``merge_windows``), the accumulator that groups device
windows by (model, version, tensor, cohort, time bucket) (``FleetAccumulator``), and
``score_fleet``, which scores every merged cell against the bundle's baseline with the agent's own
rule (``score``, ``DriftThresholds.for_scores`` and ``judge``) under the agent's
``MonitorPolicy``, so a single device's fleet score equals its own window verdict. The cells of
one baseline are scored as one stack (``score_arrays``, ``judge_stack``: the same code, each
row decided bit for bit as its view alone), not one round of small array operations per cell.
Does not own: cohort labels, device windows and merge keys (``drift.cohorts``), the result value
types and their JSON form (``drift.results``), reading telemetry or bundle files
(``drift.service``), charts (``drift.report``).
Pure: values in, values out; no clock, files or database.

Multiple testing: ``alpha`` is, as on the device, the family-wise false-alarm rate per scored
cell over the tensor's features. Many cohorts and buckets are many families: with 50 cohorts
expect about ``50 * alpha`` false cohort alarms per report, exactly as 50 devices would raise.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from edge_agent.drift import MonitorPolicy, TierAView
from edge_agent.drift.edges import FeatureEdges
from edge_agent.drift.scores import ScoreArrays, score_arrays
from edge_agent.drift.thresholds import StackVerdict, judge_stack
from edge_agent.drift.view import TierAStack
from fleet_server.drift.cohorts import FLEET, CohortSpec, DeviceInfo, FleetKey, FleetWindow
from fleet_server.drift.results import (
    CohortResult,
    DeviceAlert,
    FeatureResult,
    FleetDriftResult,
)
from fleet_server.errors import DriftMismatchError, FleetDriftError

__all__ = [
    "STACK_CELLS",
    "FleetAccumulator",
    "MergedCell",
    "check_compatible",
    "merge_windows",
    "score_fleet",
]

STACK_CELLS: Final = 256  # cells scored in one stack: bounds scoring's memory, not its answers


def check_compatible(window: FeatureEdges, reference: FeatureEdges) -> None:
    """Refuse a window whose edges are not the reference's (typed, with a reason).

    Raises:
        DriftMismatchError: different feature counts (``features``) or edges (``edges``).
    """
    if window is reference or window == reference:
        return
    if window.n_features != reference.n_features:
        raise DriftMismatchError(
            f"window has {window.n_features} features, the baseline {reference.n_features}",
            reason="features",
        )
    raise DriftMismatchError("window bin edges differ from the baseline's", reason="edges")


class _Sum:
    """Mutable running sum of views with one set of edges (no per-add allocation)."""

    __slots__ = ("count", "counts", "devices", "edges", "nan", "sum", "sumsq", "windows")

    def __init__(self, edges: FeatureEdges) -> None:
        f = edges.n_features
        self.edges = edges
        self.counts = np.zeros((f, edges.width), np.int64)
        self.nan = np.zeros(f, np.int64)
        self.count = np.zeros(f, np.int64)
        self.sum = np.zeros(f, np.float64)
        self.sumsq = np.zeros(f, np.float64)
        self.devices: set[str] = set()
        self.windows = 0

    def add(self, view: TierAView, windows: int = 1) -> None:
        self.counts += view.counts
        self.nan += view.nan
        self.count += view.count
        self.sum += view.sum
        self.sumsq += view.sumsq
        self.windows += windows

    def view(self) -> TierAView:
        return TierAView(self.edges, self.counts, self.nan, self.count, self.sum, self.sumsq)


def merge_windows(views: Iterable[TierAView]) -> TierAView:
    """The exact merge of tier-A views with identical edges (counts add; sums in order).

    Raises:
        DriftMismatchError: a view has other edges or another feature count than the first.
        FleetDriftError: no view was given.
    """
    acc: _Sum | None = None
    for view in views:
        if acc is None:
            acc = _Sum(view.edges)
        check_compatible(view.edges, acc.edges)
        acc.add(view)
    if acc is None:
        raise FleetDriftError("no drift window to merge")
    return acc.view()


class MergedCell:
    """A merged cell: the view, the devices that contributed and how many windows.

    Holds the exact sums; the view (a validated value object) is built when first asked for:
    scoring reads the sums of every cell at once and a report keeps only its cohort cells'
    views, so most device cells never need one.
    """

    __slots__ = ("_sum", "_view", "devices", "windows")

    def __init__(self, sums: _Sum, devices: tuple[str, ...], windows: int) -> None:
        self._sum = sums
        self._view: TierAView | None = None
        self.devices = devices
        self.windows = windows

    @property
    def edges(self) -> FeatureEdges:
        """The cell's bin edges."""
        return self._sum.edges

    @property
    def view(self) -> TierAView:
        """The merged view (validated once, when first read)."""
        if self._view is None:
            self._view = self._sum.view()
        return self._view

    def arrays(self) -> tuple[npt.NDArray[Any], ...]:
        """``(counts, nan, count, sum, sumsq)`` of the merge (read them, do not change them)."""
        s = self._sum
        return s.counts, s.nan, s.count, s.sum, s.sumsq


class FleetAccumulator:
    """Groups device windows into merge cells (mutable; ``merged()`` snapshots it).

    Every window goes into the fleet cell (cohort ``FLEET``), its cohort's cell (if the spec
    splits) and, with ``per_device``, its device's own cell. Windows that do not match their
    baseline are counted in ``skipped`` by reason, never merged.
    """

    def __init__(
        self, spec: CohortSpec, *, bucket_seconds: float | None = None, per_device: bool = True
    ) -> None:
        """Group by ``spec``; ``bucket_seconds`` splits time (None: one bucket for the range).

        Raises:
            FleetDriftError: ``bucket_seconds`` is not a positive finite number.
        """
        if bucket_seconds is not None and not (
            math.isfinite(bucket_seconds) and bucket_seconds > 0
        ):
            raise FleetDriftError(f"bucket must be a positive number of seconds: {bucket_seconds}")
        self._spec = spec
        self._bucket = bucket_seconds
        self._per_device = per_device and spec.kind != "device"
        self._cells: dict[FleetKey, _Sum] = {}
        self._devices: dict[FleetKey, _Sum] = {}
        self._handed_over = False
        self.skipped: Counter[str] = Counter()

    def skip(self, reason: str, n: int = 1) -> None:
        """Count windows dropped before they got here (bad bytes, no baseline...)."""
        self.skipped[reason] += n

    def add(self, window: FleetWindow, device: DeviceInfo | None, baseline: TierAView) -> bool:
        """Merge one window; False (and counted) when its edges are not the baseline's.

        Raises:
            FleetDriftError: ``merged()`` was called: its cells share these sums.
        """
        if self._handed_over:
            raise FleetDriftError("the accumulator's cells were handed over by merged()")
        try:
            check_compatible(window.view.edges, baseline.edges)
        except DriftMismatchError as exc:
            self.skipped[f"{exc.reason}_mismatch"] += window.windows
            return False
        bucket = (
            None if self._bucket is None else math.floor(window.at / self._bucket) * self._bucket
        )
        base = (window.model, window.version, window.tensor, window.role)
        cohort = self._spec.label(window.device_id, device)
        targets = [(self._cells, FLEET)]
        if cohort is not None:
            targets.append((self._cells, cohort))
        if self._per_device:
            targets.append((self._devices, window.device_id))
        for cells, label in targets:
            key = FleetKey(*base, label, bucket)
            acc = cells.get(key)
            if acc is None:
                acc = cells[key] = _Sum(baseline.edges)
            acc.add(window.view, window.windows)
            acc.devices.add(window.device_id)
        return True

    def merged(self) -> tuple[dict[FleetKey, MergedCell], dict[FleetKey, MergedCell]]:
        """The cells, ``(cohort cells incl. FLEET, per-device cells)``, keys sorted.

        The cells share the running sums (no copy of a fleet's worth of arrays), so the
        accumulator takes no window after this: ``add`` raises.
        """
        self._handed_over = True

        def snap(cells: dict[FleetKey, _Sum]) -> dict[FleetKey, MergedCell]:
            return {
                k: MergedCell(cells[k], tuple(sorted(cells[k].devices)), cells[k].windows)
                for k in sorted(cells, key=_sort_key)
            }

        return snap(self._cells), snap(self._devices)


def _sort_key(k: FleetKey) -> tuple[Any, ...]:
    return (k.model, k.version, k.role, k.tensor, k.cohort != FLEET, k.cohort, k.bucket or 0.0)


def _features(s: ScoreArrays, v: StackVerdict, row: int) -> tuple[FeatureResult, ...]:
    f = s.psi.shape[1]
    tests = [tuple(name for name, hit in v.by_test.items() if hit[row, j]) for j in range(f)]
    columns = (s.psi, s.js, s.ks, s.mean_shift, v.psi, v.ks, v.mean_shift, s.n, v.judged,
               v.drifted)  # fmt: skip
    rows = zip(*(c[row].tolist() for c in columns), strict=True)
    return tuple(
        FeatureResult(j, psi, js, ks, ms, pt, kt, mt, int(n), bool(ok), bool(hit), tests[j])
        for j, (psi, js, ks, ms, pt, kt, mt, n, ok, hit) in enumerate(rows)
    )


def _judge_stack(
    cells: list[MergedCell], baseline: TierAView, p: MonitorPolicy
) -> tuple[ScoreArrays, StackVerdict]:
    """The agent's window close (``DriftMonitor._close``: ``score``, ``for_scores``, ``judge``)
    for every cell at once: row ``i`` is decided exactly as cell ``i``'s view alone."""
    columns = zip(*(c.arrays() for c in cells), strict=True)
    stack = TierAStack(baseline.edges, *(np.stack(col) for col in columns))
    scores = score_arrays(stack, baseline)
    return scores, judge_stack(scores, p.alpha, tests=p.tests, correction=p.correction)


def score_fleet(
    cells: Mapping[FleetKey, MergedCell],
    baselines: Mapping[tuple[str, int, str, str], TierAView],
    policy: MonitorPolicy | None = None,
    *,
    spec: CohortSpec | None = None,
    device_cells: Mapping[FleetKey, MergedCell] | None = None,
    skipped: Mapping[str, int] | None = None,
) -> FleetDriftResult:
    """Score every merged cell against its baseline view with the agent's rule.

    The cells of one baseline (cohorts and devices alike) are scored together, in stacks of
    at most ``STACK_CELLS`` windows (``score_arrays``, ``judge_stack``): the same decisions as
    one ``judge`` per cell, without a round of small array operations per cell, and a peak
    memory that does not grow with the fleet (scoring holds about 15 temporaries of a stack).

    Args:
        cells: Cohort cells (``FleetAccumulator.merged()[0]``).
        baselines: Baseline view per ``FleetKey.baseline_key()``.
        policy: The agent's policy (``alpha``, ``tests``, ``correction``); default as the agent.
        spec: The cohort spec the cells were grouped by (reported back).
        device_cells: Per-device cells; only the devices that alert are kept.
        skipped: Windows skipped while merging, by reason (reported back).

    Returns:
        The result, cells in key order.

    Raises:
        DriftMismatchError: a cell's edges are not its baseline's.
        FleetDriftError: a cell has no baseline.
    """
    p = policy or MonitorPolicy()
    groups: dict[tuple[str, int, str, str], list[tuple[bool, FleetKey, MergedCell]]] = {}
    for is_device, mapping in ((False, cells), (True, device_cells or {})):
        for k, cell in mapping.items():
            base = baselines.get(k.baseline_key())
            if base is None:
                raise FleetDriftError(f"no baseline for {k.model} v{k.version} {k.role} {k.tensor}")
            check_compatible(cell.edges, base.edges)
            groups.setdefault(k.baseline_key(), []).append((is_device, k, cell))
    by_key: dict[FleetKey, CohortResult] = {}
    alert_of: dict[FleetKey, DeviceAlert] = {}
    for bkey, group in groups.items():
        for start in range(0, len(group), STACK_CELLS):
            members = group[start : start + STACK_CELLS]
            scores, verdict = _judge_stack([c for _d, _k, c in members], baselines[bkey], p)
            alerting = [bool(a) for a in np.any(verdict.drifted, axis=1)]
            for row, (is_device, k, cell) in enumerate(members):
                if not is_device:
                    features = _features(scores, verdict, row)
                    by_key[k] = CohortResult(k, cell.devices, cell.windows, features, cell.view)
                elif alerting[row]:
                    drifted = tuple(int(j) for j in np.flatnonzero(verdict.drifted[row]))
                    alert_of[k] = DeviceAlert(k, drifted, cell.windows)
    results = [by_key[k] for k in cells]
    alerts = [alert_of[k] for k in (device_cells or {}) if k in alert_of]
    used = {k.baseline_key() for k in cells}
    return FleetDriftResult(
        spec or CohortSpec(),
        tuple(results),
        tuple(alerts),
        len({k.cohort for k in (device_cells or {})}),
        dict(skipped or {}),
        {k: v for k, v in baselines.items() if k in used},
    )
