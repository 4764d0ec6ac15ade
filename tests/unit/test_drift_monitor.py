"""DriftMonitor: windows by count and by time with an injected clock, verdicts, snapshots."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import load_digits

from edge_agent.drift import (
    DriftBaseline,
    DriftMonitor,
    MonitorPolicy,
    TierASketch,
    TierAView,
    build_baseline,
    score,
)
from edge_agent.errors import DriftError


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """The digits images, shuffled once: the file is grouped by writer, so a plain head/tail
    split would be a real distribution shift."""
    images = np.asarray(load_digits().data, dtype=np.float32).reshape(-1, 8, 8)
    return images[np.random.default_rng(0).permutation(len(images))]


def model(images: np.ndarray) -> np.ndarray:
    """A stand-in output tensor: per-row brightness of the image (8 features)."""
    return np.asarray(images.mean(axis=2))


@pytest.fixture(scope="module")
def baseline(digits: np.ndarray) -> DriftBaseline:
    ref = digits[:1000]
    return build_baseline({"image": ref}, {"rows": model(ref)}, n_bins=10)


def live(digits: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` distinct held-out digits: the baseline's distribution, not its rows."""
    held = digits[1000:]
    return held[np.random.default_rng(seed).permutation(len(held))[:n]]


def view_of(baseline: DriftBaseline, name: str, x: np.ndarray) -> TierAView:
    tracker = TierASketch.zero(baseline.view(name).edges)
    tracker.update(baseline.features(x))
    return tracker.view()


def test_windows_close_by_count_and_split_batches(
    baseline: DriftBaseline, digits: np.ndarray
) -> None:
    mon = DriftMonitor(baseline, MonitorPolicy(max_values=100, max_seconds=1e9))
    x = live(digits, 64 * 5, seed=1)
    closed = [w for i in range(5) for w in mon.observe("image", x[64 * i : 64 * (i + 1)], i)]
    # 320 rows: windows at rows 100, 200, 300, each exactly 100 rows, 20 rows left open.
    assert [w.rows for w in closed] == [100, 100, 100]
    assert [w.reason for w in closed] == ["count"] * 3
    assert [(w.start, w.end) for w in closed] == [(0, 1), (1, 3), (3, 4)]
    for k, w in enumerate(closed):
        assert w.view == view_of(baseline, "image", x[100 * k : 100 * (k + 1)])
        assert w.tensor == "image"
        assert w.role == "input"
    assert mon.snapshot()["image"].open_rows == 20
    # One batch spanning several windows closes all of them in order.
    many = mon.observe("image", live(digits, 250, seed=2), 5.0)
    assert [w.rows for w in many] == [100, 100]
    assert mon.snapshot()["image"].open_rows == 70


def test_windows_close_by_time_with_an_injected_clock(
    baseline: DriftBaseline, digits: np.ndarray
) -> None:
    mon = DriftMonitor(baseline, MonitorPolicy(max_values=1000, max_seconds=60, min_values=50))
    x = live(digits, 200, seed=3)
    assert mon.observe("image", x[:40], 100.0) == ()
    assert mon.observe("image", x[40:80], 130.0) == ()
    assert mon.tick(159.9) == ()  # not yet 60 s
    (w,) = mon.observe("image", x[80:90], 160.0)  # due: closes before the batch is added
    assert (w.start, w.end, w.rows, w.reason) == (100.0, 160.0, 80, "time")
    assert w.view == view_of(baseline, "image", x[:80])
    snap = mon.snapshot()["image"]
    assert (snap.open_rows, snap.open_since, snap.windows_closed) == (10, 160.0, 1)
    # A due window with fewer than min_values rows stays open until it has them.
    assert mon.tick(500.0) == ()
    assert mon.observe("image", x[90:120], 501.0) == ()  # 40 rows: still too few
    assert mon.observe("image", x[120:140], 502.0) == ()  # 60 rows after this batch
    (w2,) = mon.observe("image", x[140:190], 503.0)  # due and large enough: closes first
    assert (w2.start, w2.end, w2.rows) == (160.0, 503.0, 60)
    (w3,) = mon.tick(563.0)
    assert (w3.start, w3.end, w3.rows, w3.reason) == (503.0, 563.0, 50, "time")


def test_a_clock_that_goes_back_only_delays_time_closes(
    baseline: DriftBaseline, digits: np.ndarray
) -> None:
    mon = DriftMonitor(baseline, MonitorPolicy(max_seconds=60, min_values=1))
    mon.observe("image", live(digits, 10, seed=4), 1000.0)
    assert mon.observe("image", live(digits, 10, seed=5), 10.0) == ()
    assert mon.tick(1059.0) == ()
    assert len(mon.tick(1060.0)) == 1


def test_flush_closes_every_open_window(baseline: DriftBaseline, digits: np.ndarray) -> None:
    mon = DriftMonitor(baseline)
    x = live(digits, 30, seed=6)
    mon.observe("image", x, 1.0)
    mon.observe("rows", model(x), 1.0)
    windows = mon.flush(2.0)
    assert sorted((w.tensor, w.role, w.reason, w.rows) for w in windows) == [
        ("image", "input", "flush", 30),
        ("rows", "output", "flush", 30),
    ]
    # 30 rows is below DEFAULT_MIN_N: scored, reported, never judged.
    assert all(not w.verdict.judged.any() and not w.verdict.alert for w in windows)
    assert mon.flush(3.0) == ()


def test_same_distribution_passes_and_shifted_traffic_alerts(
    baseline: DriftBaseline, digits: np.ndarray
) -> None:
    mon = DriftMonitor(baseline, MonitorPolicy(max_values=500))
    x = live(digits, 500, seed=7)
    (ok,) = mon.observe("image", x, 0.0)
    (ok_out,) = mon.observe("rows", model(x), 0.0)
    assert not ok.verdict.alert
    assert not ok_out.verdict.alert
    brighter = np.minimum(live(digits, 500, seed=8) * 1.3, 16.0)
    (bad,) = mon.observe("image", brighter, 1.0)
    (bad_out,) = mon.observe("rows", model(brighter), 1.0)
    assert bad.verdict.alert
    assert bad_out.verdict.alert
    assert len(bad.verdict.drifted_features()) >= 20
    snap = mon.snapshot()
    assert (snap["image"].windows_closed, snap["image"].windows_alerted) == (2, 1)
    last = snap["image"].last
    assert last is bad
    assert last.scores.n_features == 64
    assert bad.scores == score(bad.view, baseline.view("image"))
    json.dumps(bad.to_dict(), allow_nan=False)


def test_merged_windows_score_like_the_merged_data(
    baseline: DriftBaseline, digits: np.ndarray
) -> None:
    mon = DriftMonitor(baseline, MonitorPolicy(max_values=128))
    x = live(digits, 384, seed=9)
    windows = mon.observe("image", x, 0.0)
    assert len(windows) == 3
    merged = windows[0].view.merge(windows[1].view).merge(windows[2].view)
    assert merged == view_of(baseline, "image", x)
    a, b = (
        score(merged, baseline.view("image")),
        score(view_of(baseline, "image", x), baseline.view("image")),
    )
    np.testing.assert_allclose(a.psi, b.psi, rtol=1e-12)
    np.testing.assert_allclose(a.mean_z, b.mean_z, rtol=1e-9)


def test_bad_input_raises_and_counts_nothing(baseline: DriftBaseline, digits: np.ndarray) -> None:
    mon = DriftMonitor(baseline, MonitorPolicy(max_seconds=60, min_values=1))
    mon.observe("image", live(digits, 10, seed=10), 0.0)
    with pytest.raises(DriftError, match="no tensor"):
        mon.observe("nope", live(digits, 10, seed=10), 1.0)
    with pytest.raises(DriftError, match="features"):
        mon.observe("image", np.zeros((5, 7, 7)), 100.0)  # also due: must not close
    with pytest.raises(DriftError):
        mon.observe("image", np.array(["a", "b"]), 100.0)
    with pytest.raises(ValueError, match="now"):
        mon.observe("image", live(digits, 1, seed=10), float("nan"))
    assert mon.snapshot()["image"].open_rows == 10
    assert mon.snapshot()["image"].windows_closed == 0


def test_nan_rows_are_counted_and_tested_when_asked(baseline: DriftBaseline) -> None:
    mon = DriftMonitor(baseline, MonitorPolicy(max_values=200, tests=("psi", "mean", "nan")))
    x = np.asarray(load_digits().data[:200], dtype=np.float32).reshape(-1, 8, 8)
    x[:, 3, 3] = np.nan  # a dead pixel
    (w,) = mon.observe("image", x, 0.0)
    assert w.scores.nan_rate_diff[27] == 1.0
    assert w.verdict.drifted[27]
    assert w.verdict.by_test["nan"][27]


@pytest.mark.parametrize(
    "kwargs",
    [{"max_values": 0}, {"min_values": 0}, {"min_values": 2000}, {"max_seconds": 0.0},
     {"max_seconds": float("inf")}, {"alpha": 1.5}, {"tests": ()}, {"tests": ("x",)},
     {"correction": "none"}],
)  # fmt: skip
def test_policy_is_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        MonitorPolicy(**kwargs)  # type: ignore[arg-type]


def test_monitor_lists_its_tensors(baseline: DriftBaseline) -> None:
    mon = DriftMonitor(baseline)
    assert mon.tensors == ("image", "rows")
    assert mon.policy == MonitorPolicy()
    snap = mon.snapshot()
    assert snap["rows"].role == "output"
    assert snap["rows"].last is None
    assert snap["image"].open_since is None
