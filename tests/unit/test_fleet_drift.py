"""fleet_server.drift.fleet: exact merges and the agent's own scoring, on real sketches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_agent.drift import DriftMonitor, MonitorPolicy, TierASketch, TierAView, build_baseline
from edge_agent.drift.edges import FeatureEdges
from fleet_server.drift.cohorts import FLEET, CohortSpec, DeviceInfo, FleetWindow
from fleet_server.drift.fleet import (
    STACK_CELLS,
    FleetAccumulator,
    merge_windows,
    score_fleet,
)
from fleet_server.errors import DriftMismatchError, FleetDriftError

F = 6


@pytest.fixture(scope="module")
def baseline() -> TierAView:
    x = np.random.default_rng(1).normal(size=(4000, F))
    return build_baseline({"x": x}, {}, n_bins=10).view("x")


def _view(baseline: TierAView, rows: np.ndarray) -> TierAView:
    sketch = TierASketch.zero(baseline.edges)
    sketch.update(rows)
    return sketch.view()


def _window(device: str, view: TierAView, version: int = 1, at: float = 100.0) -> FleetWindow:
    return FleetWindow(device, "m", version, "x", "input", at, view)


def test_merge_of_device_views_equals_the_view_of_all_rows(baseline: TierAView) -> None:
    rng = np.random.default_rng(2)
    parts = [rng.normal(size=(int(rng.integers(1, 400)), F)) for _ in range(25)]
    parts[3][5, 2] = np.nan
    parts[4][0, 1] = np.inf
    merged = merge_windows(_view(baseline, p) for p in parts)
    whole = _view(baseline, np.concatenate(parts))
    assert np.array_equal(merged.counts, whole.counts)
    assert np.array_equal(merged.nan, whole.nan)
    assert np.array_equal(merged.count, whole.count)
    np.testing.assert_allclose(merged.sum, whole.sum, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(merged.sumsq, whole.sumsq, rtol=1e-12)
    # And exactly the agent's own monoid fold.
    folded = _view(baseline, parts[0])
    for p in parts[1:]:
        folded = folded.merge(_view(baseline, p))
    assert merged == folded


@pytest.mark.parametrize(
    ("edges", "reason"),
    [
        (FeatureEdges(10, tuple((0.0, 1.0, 2.0) for _ in range(F))), "edges"),
        (FeatureEdges(10, tuple((0.0, 1.0) for _ in range(F + 1))), "features"),
    ],
)
def test_mismatched_views_are_refused_and_counted(
    baseline: TierAView, edges: FeatureEdges, reason: str
) -> None:
    other = TierAView.zero(edges)
    with pytest.raises(DriftMismatchError) as info:
        merge_windows([baseline, other])
    assert info.value.reason == reason
    acc = FleetAccumulator(CohortSpec())
    assert not acc.add(_window("d1", other), None, baseline)
    assert acc.add(_window("d2", baseline), None, baseline)
    assert acc.skipped == {f"{reason}_mismatch": 1}
    cells, _ = acc.merged()
    assert [c.devices for c in cells.values()] == [("d2",)]


def test_merge_of_nothing_is_an_error() -> None:
    with pytest.raises(FleetDriftError):
        merge_windows([])


def test_single_device_scores_exactly_as_the_agent(baseline: TierAView) -> None:
    base = build_baseline({"x": np.random.default_rng(1).normal(size=(4000, F))}, {}, n_bins=10)
    policy = MonitorPolicy(max_values=500)
    monitor = DriftMonitor(base, policy)
    rows = np.random.default_rng(3).normal(size=(500, F)) + np.array([0, 0.4, 0, 0, 0, 0])
    (window,) = monitor.observe("x", rows, now=1.0)
    acc = FleetAccumulator(CohortSpec("device"))
    acc.add(_window("dev-1", window.view), None, base.view("x"))
    cells, _ = acc.merged()
    result = score_fleet(cells, {("m", 1, "x", "input"): base.view("x")}, policy)
    assert {c.key.cohort for c in result.cohorts} == {FLEET, "dev-1"}
    for cohort in result.cohorts:
        assert [f.psi for f in cohort.features] == window.scores.psi.tolist()
        assert [f.mean_shift for f in cohort.features] == window.scores.mean_shift.tolist()
        assert [f.ks for f in cohort.features] == window.scores.ks.tolist()
        assert list(cohort.drifted) == window.verdict.drifted_features()
    assert window.verdict.drifted_features() == [1]


def test_a_shifted_cohort_is_flagged_and_the_others_are_not(baseline: TierAView) -> None:
    rng = np.random.default_rng(4)
    devices = {
        f"d{i:02d}": DeviceInfo("a" if i < 10 else "b", {"site": f"s{i % 2}"}) for i in range(20)
    }
    acc = FleetAccumulator(CohortSpec("group"), bucket_seconds=3600.0)
    shift = np.zeros(F)
    shift[2] = 0.5
    for name, info in devices.items():
        for k in range(3):
            rows = rng.normal(size=(200, F)) + (shift if info.group == "a" else 0.0)
            acc.add(_window(name, _view(baseline, rows), at=7200.0 + 60 * k), info, baseline)
    cells, device_cells = acc.merged()
    result = score_fleet(
        cells, {("m", 1, "x", "input"): baseline}, spec=CohortSpec("group"),
        device_cells=device_cells, skipped=acc.skipped,
    )  # fmt: skip
    by_cohort = {c.key.cohort: c for c in result.cohorts}
    assert set(by_cohort) == {FLEET, "a", "b"}
    assert by_cohort["a"].drifted == (2,)
    assert by_cohort["b"].drifted == ()
    assert 2 in by_cohort[FLEET].drifted
    assert {c.key.bucket for c in result.cohorts} == {7200.0}
    assert by_cohort["a"].windows == 30
    assert len(by_cohort["a"].devices) == 10
    flagged = {d.key.cohort for d in result.device_alerts}
    assert flagged
    assert flagged <= {n for n, i in devices.items() if i.group == "a"}
    (row,) = [r for r in result.drifted_features() if r["feature"] == 2]
    assert row["cohorts"] == [FLEET, "a"]
    assert set(row["devices"]) == flagged
    body = result.to_dict(include_views=True)
    json.dumps(body, allow_nan=False)  # the admin API's JSONResponse refuses NaN
    assert body["cohorts"][0]["view"] == by_cohort[FLEET].view.to_dict()
    assert len(body["baselines"]) == 1


@pytest.mark.parametrize(
    ("text", "device", "info", "label"),
    [
        (None, "d1", DeviceInfo("g"), None),
        ("fleet", "d1", DeviceInfo("g"), None),
        ("group", "d1", DeviceInfo("g"), "g"),
        ("device", "d1", None, "d1"),
        ("tag:site", "d1", DeviceInfo("g", {"site": "berlin"}), "berlin"),
        ("tag:site", "d1", DeviceInfo("g", {}), "(none)"),
        ("tag:rack", "d1", DeviceInfo("g", {"rack": 7}), "7"),
        ("group", "d1", None, "(unknown device)"),
    ],
)
def test_cohort_labels(
    text: str | None, device: str, info: DeviceInfo | None, label: str | None
) -> None:
    assert CohortSpec.parse(text).label(device, info) == label


@pytest.mark.parametrize("text", ["tag:", "site", "groups"])
def test_bad_cohort_specs_are_refused(text: str) -> None:
    with pytest.raises(FleetDriftError):
        CohortSpec.parse(text)


@pytest.mark.parametrize("bucket", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_buckets_are_refused(bucket: float) -> None:
    with pytest.raises(FleetDriftError):
        FleetAccumulator(CohortSpec(), bucket_seconds=bucket)


def test_the_accumulator_takes_no_window_after_handing_its_cells_over(
    baseline: TierAView,
) -> None:
    """merged() shares the running sums with its cells: a later add would change them."""
    acc = FleetAccumulator(CohortSpec())
    assert acc.add(_window("d1", baseline), None, baseline)
    cells, _ = acc.merged()
    before = {k: c.arrays()[0].copy() for k, c in cells.items()}
    with pytest.raises(FleetDriftError, match="handed over"):
        acc.add(_window("d2", baseline), None, baseline)
    assert all((cells[k].arrays()[0] == v).all() for k, v in before.items())


def test_a_fleet_larger_than_one_stack_is_scored_as_cell_by_cell(baseline: TierAView) -> None:
    """Cells are scored in stacks of STACK_CELLS (bounded memory): the answers of a group that
    spans several stacks are those of each cell scored alone."""
    rng = np.random.default_rng(5)
    acc = FleetAccumulator(CohortSpec("device"))
    n = STACK_CELLS + 7
    for i in range(n):
        rows = rng.normal(loc=0.8 if i % 50 == 0 else 0.0, size=(300, F))
        assert acc.add(_window(f"d{i:04d}", _view(baseline, rows)), None, baseline)
    cells, _ = acc.merged()
    assert len(cells) == n + 1  # every device and the fleet
    stacked = score_fleet(cells, {("m", 1, "x", "input"): baseline})
    assert len(stacked.cohorts) == n + 1
    drifted = 0
    for result in stacked.cohorts:
        alone = score_fleet({result.key: cells[result.key]}, {("m", 1, "x", "input"): baseline})
        assert repr(result.features) == repr(alone.cohorts[0].features)  # NaN-safe, bit for bit
        drifted += any(f.drifted for f in result.features)
    assert drifted >= 6  # the shifted devices (1 in 50) alert, in several stacks
