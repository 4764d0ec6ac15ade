"""Drift scores and thresholds: hand-computed values, quantiles against scipy, calibration."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from scipy import stats
from sklearn.datasets import load_digits

from edge_agent.drift import (
    DriftThresholds,
    FeatureEdges,
    FeatureScores,
    TierASketch,
    TierAView,
    fit_edges,
    judge,
    score,
)
from edge_agent.drift.distributions import (
    chi2_isf,
    chi2_sf,
    norm_isf,
    norm_sf,
    wilson_hilferty_isf,
)
from edge_agent.errors import ContractError, DriftError

# --- helpers ---------------------------------------------------------------------------------


def view_of(edges: FeatureEdges, x: np.ndarray) -> TierAView:
    sketch = TierASketch.zero(edges)
    sketch.update(x)
    return sketch.view()


def baseline_and_window(
    base: np.ndarray, live: np.ndarray, n_bins: int = 10
) -> tuple[TierAView, TierAView]:
    edges = fit_edges(base, n_bins)
    return view_of(edges, base), view_of(edges, live)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return np.asarray(load_digits().data, dtype=np.float64)


# --- scores: hand-computed -------------------------------------------------------------------

EDGES3 = FeatureEdges(3, ((0.0, 1.0, 2.0, 3.0),))
# Baseline: bins [2, 3, 5], nothing outside. Window: 1 under, [4, 3, 1], 1 over, 2 NaN.
BASE = np.array([0.5, 0.5, 1.5, 1.5, 1.5, 2.5, 2.5, 2.5, 2.5, 2.5])[:, None]
LIVE_FINITE = np.array([-1.0, 0.2, 0.4, 0.6, 0.8, 1.2, 1.4, 1.6, 2.5, 4.0])
LIVE = np.concatenate([LIVE_FINITE, [np.nan, np.nan]])[:, None]


def test_scores_equal_hand_computed_values() -> None:
    s = score(view_of(EDGES3, LIVE), view_of(EDGES3, BASE))
    # Folded cells: baseline [2, 3, 5]; window [1 + 4, 3, 1 + 1] = [5, 3, 2]; +0.5 each.
    p = np.array([2.5, 3.5, 5.5]) / 11.5
    q = np.array([5.5, 3.5, 2.5]) / 11.5
    assert s.psi[0] == pytest.approx(2 * (3 / 11.5) * math.log(5.5 / 2.5), rel=1e-12)
    m = (p + q) / 2
    js = 0.5 * sum(q * np.log2(q / m)) + 0.5 * sum(p * np.log2(p / m))
    assert s.js[0] == pytest.approx(js, rel=1e-12)
    # Unfolded CDFs at e_0..e_3: baseline [0, .2, .5, 1], window [.1, .5, .8, .9].
    assert s.ks[0] == pytest.approx(0.3, rel=1e-12)
    mb, sb, mw = BASE.mean(), BASE.std(), LIVE_FINITE.mean()
    assert s.mean_shift[0] == pytest.approx((mw - mb) / sb, rel=1e-12)
    pooled = np.concatenate([BASE[:, 0], LIVE_FINITE]).var()
    se = math.sqrt(max(BASE.var(), pooled) / 10 + max(LIVE_FINITE.var(), pooled) / 10)
    assert s.mean_z[0] == pytest.approx((mw - mb) / se, rel=1e-12)
    assert s.nan_rate_diff[0] == pytest.approx(2 / 12)
    r_w, r = 2 / 12, 2 / 22
    se_nan = math.sqrt(r * (1 - r) / 10 + max(r_w * (1 - r_w), r * (1 - r)) / 12)
    assert s.nan_z[0] == pytest.approx(r_w / se_nan, rel=1e-12)
    assert s.out_of_range_diff[0] == pytest.approx(0.2)
    assert (s.n[0], s.baseline_n[0], s.total[0], s.baseline_total[0], s.cells[0]) == (
        10, 10, 12, 10, 3,
    )  # fmt: skip


def test_cells_empty_on_both_sides_are_dropped_and_psi_stays_finite() -> None:
    edges = FeatureEdges(4, ((0.0, 1.0, 2.0, 3.0, 4.0),))
    base = np.array([0.5] * 6 + [2.5] * 4)[:, None]  # bins 1 and 3 empty
    live = np.array([3.5] * 10)[:, None]  # everything in a bin the baseline never saw
    s = score(view_of(edges, live), view_of(edges, base))
    assert s.cells[0] == 3  # bin 1 is empty on both sides
    p = np.array([6.5, 4.5, 0.5]) / 11.5
    q = np.array([0.5, 0.5, 10.5]) / 11.5
    assert s.psi[0] == pytest.approx(float(np.sum((q - p) * np.log(q / p))), rel=1e-12)
    assert np.isfinite(s.psi[0])
    assert 0.0 < s.js[0] <= 1.0


@pytest.mark.parametrize("kind", ["normal", "uniform", "sparse"])
def test_identical_distributions_score_zero(kind: str) -> None:
    rng = np.random.default_rng(3)
    x = {
        "normal": rng.normal(size=(2000, 4)),
        "uniform": rng.random((2000, 4)),
        "sparse": np.where(rng.random((2000, 4)) < 0.9, 0.0, rng.integers(1, 16, (2000, 4))),
    }[kind]
    base, same = baseline_and_window(x, x[::-1].copy())  # same values, other order
    s = score(same, base)
    for name in ("psi", "js", "ks", "mean_shift", "mean_z", "nan_rate_diff", "nan_z"):
        np.testing.assert_allclose(getattr(s, name), 0.0, atol=1e-12, err_msg=name)


def test_fresh_samples_of_one_distribution_score_near_zero() -> None:
    rng = np.random.default_rng(4)
    base, live = baseline_and_window(rng.normal(size=(5000, 8)), rng.normal(size=(5000, 8)))
    s = score(live, base)
    assert np.all(s.psi < 0.01)
    assert np.all(s.js < 0.003)
    assert np.all(s.ks < 0.04)
    assert np.all(np.abs(s.mean_shift) < 0.08)


def test_constant_features_and_empty_windows() -> None:
    edges = fit_edges(np.array([[2.0, 0.1, 1.0]] * 100 + [[2.0, 0.1, 2.0]] * 100), 4)
    base = view_of(edges, np.array([[2.0, 0.1, 1.0]] * 100 + [[2.0, 0.1, 2.0]] * 100))
    live = view_of(edges, np.array([[2.0, 0.1, np.nan]] * 50 + [[3.0, 0.1, np.nan]] * 50))
    s = score(live, base)
    # Feature 0: a constant baseline; half the window is another value. Feature 1: a constant
    # 0.1 (whose float sums are inexact) on both sides. Feature 2: only NaN in the window.
    assert s.cells.tolist() == [1, 1, 0]
    assert s.psi[0] == 0.0
    assert s.mean_shift[0] > 0
    assert np.isfinite(s.mean_shift[0])
    assert s.mean_z[0] > 5
    assert s.mean_shift[1] == 0.0
    assert s.mean_z[1] == 0.0
    assert np.isnan(s.psi[2])
    assert np.isnan(s.mean_z[2])
    assert s.nan_rate_diff[2] == 1.0
    verdict = judge(s, DriftThresholds.for_scores(s))
    assert verdict.drifted.tolist() == [True, False, False]
    assert verdict.p_values["psi"][0] == 1.0  # no PSI test with one cell
    assert not verdict.judged[2]


def test_views_with_different_edges_cannot_be_scored() -> None:
    rng = np.random.default_rng(5)
    a, _ = baseline_and_window(rng.normal(size=(100, 2)), rng.normal(size=(10, 2)))
    b, _ = baseline_and_window(rng.normal(size=(100, 2)), rng.normal(size=(10, 2)))
    with pytest.raises(DriftError):
        score(a, b)
    with pytest.raises(ValueError, match="epsilon"):
        score(a, a, epsilon=0.0)


def test_merging_windows_then_scoring_equals_scoring_the_merged_data() -> None:
    rng = np.random.default_rng(6)
    base_x = rng.normal(size=(3000, 6))
    edges = fit_edges(base_x)
    base = view_of(edges, base_x)
    parts = [rng.normal(0.1, 1.1, size=(n, 6)) for n in (100, 437, 1)]
    parts[1][::7, 2] = np.nan
    merged = (
        view_of(edges, parts[0]).merge(view_of(edges, parts[1])).merge(view_of(edges, parts[2]))
    )
    whole = view_of(edges, np.concatenate(parts))
    a, b = score(merged, base), score(whole, base)
    for name in ("psi", "js", "ks", "mean_shift", "mean_z", "nan_rate_diff", "nan_z"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-9)
    assert np.array_equal(a.cells, b.cells)
    assert np.array_equal(a.n, b.n)


def test_feature_scores_round_trip_through_json() -> None:
    edges = fit_edges(np.array([[1.0, 0.0]] * 10 + [[2.0, 1.0]] * 10), 2)
    s = score(view_of(edges, np.array([[5.0, np.nan]] * 20)), view_of(edges, np.ones((20, 2))))
    text = json.dumps(s.to_dict(), allow_nan=False)
    assert FeatureScores.from_dict(json.loads(text)) == s
    bad = s.to_dict()
    bad["cells"] = [1]
    with pytest.raises(ContractError):
        FeatureScores.from_dict(bad)
    with pytest.raises(ContractError):
        FeatureScores.from_dict({**s.to_dict(), "extra": 1})


# --- quantiles against scipy -----------------------------------------------------------------

LEVELS = [0.5, 0.1, 0.05, 0.01, 0.005, 1e-3, 3e-4, 1e-5, 1e-8, 1e-12]


@pytest.mark.parametrize("dof", [1, 2, 3, 5, 9, 10, 11, 12, 20, 64, 255])
def test_chi2_quantiles_and_tails_match_scipy(dof: int) -> None:
    for p in LEVELS:
        assert chi2_isf(p, dof) == pytest.approx(stats.chi2.isf(p, dof), rel=1e-9)
        x = stats.chi2.isf(p, dof)
        assert chi2_sf(x, dof) == pytest.approx(p, rel=1e-9)
    assert chi2_sf(0.0, dof) == 1.0


@pytest.mark.parametrize("dof", [9, 10, 11, 12, 16, 20])
def test_wilson_hilferty_is_within_one_percent_in_the_range_used(dof: int) -> None:
    # 10 bins give 9-11 d.o.f.; levels down to alpha / (16 features * 2 tests) = 3e-4.
    for p in [0.05, 0.01, 0.005, 1e-3, 3e-4]:
        assert wilson_hilferty_isf(p, dof) == pytest.approx(stats.chi2.isf(p, dof), rel=0.01)
    # ...but not for 1 d.o.f. at small levels, which is why chi2_isf refines it.
    assert abs(wilson_hilferty_isf(1e-4, 1) / stats.chi2.isf(1e-4, 1) - 1) > 0.05


def test_normal_quantiles_and_tails_match_scipy() -> None:
    for p in [*LEVELS, 0.9, 0.975, 0.999999, 1e-30]:
        assert norm_isf(p) == pytest.approx(stats.norm.isf(p), rel=1e-12, abs=1e-12)
    for z in [-3.0, 0.0, 1.0, 2.807, 5.0, 10.0]:
        assert norm_sf(z) == pytest.approx(stats.norm.sf(z), rel=1e-12)
    with pytest.raises(ValueError):
        norm_isf(0.0)


def test_ks_constant_matches_the_kolmogorov_distribution() -> None:
    for level in [0.05, 0.01, 1e-3, 1e-5]:
        t = DriftThresholds.for_window(1000, 1000, 10, 1, level, tests=("ks",))
        assert t.ks[0] * math.sqrt(500) == pytest.approx(stats.kstwobign.isf(level), rel=1e-5)


# --- thresholds ------------------------------------------------------------------------------


def test_thresholds_follow_the_formulas() -> None:
    t = DriftThresholds.for_window([200, 10_000], 2000, [10, 12], m=16, alpha=0.01)
    level = 0.01 / 32
    assert t.level == level
    h = np.array([200 * 2000 / 2200, 10_000 * 2000 / 12_000])
    crit = np.array([stats.chi2.isf(level, 9), stats.chi2.isf(level, 11)])
    np.testing.assert_allclose(t.psi, crit / h, rtol=1e-9)
    np.testing.assert_allclose(t.js, crit / (8 * math.log(2) * h), rtol=1e-9)
    np.testing.assert_allclose(t.ks, math.sqrt(-math.log(level / 2) / 2) / np.sqrt(h))
    assert t.z == pytest.approx(stats.norm.isf(level / 2), rel=1e-12)
    np.testing.assert_allclose(t.mean_shift, t.z * np.sqrt(1 / np.array([200, 10_000]) + 1 / 2000))


def test_thresholds_shrink_with_window_and_baseline_size() -> None:
    sizes = [50, 200, 1000, 10_000, 100_000]
    t = DriftThresholds.for_window(sizes, 5000, 10, 1)
    for name in ("psi", "js", "ks", "mean_shift"):
        assert np.all(np.diff(getattr(t, name)) < 0), name
    u = DriftThresholds.for_window(1000, sizes, 10, 1)
    assert np.all(np.diff(u.psi) < 0)
    # ...and grow with the number of features corrected for.
    assert DriftThresholds.for_window(1000, 1000, 10, 64).psi[0] > t.psi[2]


@pytest.mark.parametrize(
    "kwargs",
    [{"alpha": 0.0}, {"alpha": 1.0}, {"m": 0}, {"tests": ()}, {"tests": ("psi", "x")},
     {"correction": "sidak"}, {"n": -1}, {"n": math.nan}],
)  # fmt: skip
def test_threshold_arguments_are_checked(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"n": 100, "baseline_n": 100, "bins": 10, "m": 1, **kwargs}
    with pytest.raises(ValueError):
        DriftThresholds.for_window(**args)  # type: ignore[arg-type]


def null_statistics(n: int, big_n: int, trials: int, seed: int) -> FeatureScores:
    """Scores of ``trials`` no-drift windows (one feature each), baseline drawn fresh."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(trials // 16):
        base, live = baseline_and_window(rng.normal(size=(big_n, 16)), rng.normal(size=(n, 16)))
        out.append(score(live, base))
    joined: dict[str, Any] = {
        f: np.concatenate([getattr(s, f) for s in out])
        for f in FeatureScores.__annotations__
        if f != "schema_version"
    }
    return FeatureScores(**joined)


@pytest.mark.parametrize(("n", "big_n"), [(300, 3000), (3000, 1000)])
def test_psi_and_js_scaled_are_chi_square_under_no_drift(n: int, big_n: int) -> None:
    s = null_statistics(n, big_n, 1600, seed=n)
    h = n * big_n / (n + big_n)
    dof = s.cells - 1  # 9 with 10 bins: outer bins are open-ended
    assert np.all(dof == 9)
    for stat in (h * s.psi, 8 * math.log(2) * h * s.js):
        assert stat.mean() == pytest.approx(9, rel=0.06)
        assert stat.var() == pytest.approx(18, rel=0.2)
        assert np.quantile(stat, 0.99) == pytest.approx(stats.chi2.isf(0.01, 9), rel=0.12)
    # The 2 ln2 scale sometimes quoted for JS would make the statistic a quarter of chi2(9).
    assert (2 * math.log(2) * h * s.js).mean() < 9 / 3


def test_false_alarm_rate_is_calibrated() -> None:
    s = null_statistics(500, 2000, 2400, seed=11)
    t = DriftThresholds.for_scores(s, alpha=0.05, m=1)
    v = judge(s, t)
    rate = v.drifted.mean()
    se = math.sqrt(0.05 * 0.95 / s.n_features)
    assert 0.02 < rate < 0.05 + 2 * se  # close to alpha, not needlessly conservative
    for name in ("psi", "mean"):
        per_test = np.mean(v.p_values[name] <= 0.025)
        assert 0.01 < per_test < 0.025 + 2 * math.sqrt(0.025 / s.n_features), name


def test_a_quarter_sigma_shift_is_detected_at_n_1000() -> None:
    rng = np.random.default_rng(12)
    base, live = baseline_and_window(rng.normal(size=(2000, 16)), rng.normal(0.25, 1, (1000, 16)))
    s = score(live, base)
    v = judge(s, DriftThresholds.for_scores(s))  # family-wise 1% over 16 features
    assert v.drifted.mean() >= 0.9
    assert v.by_test["mean"].sum() >= v.by_test["psi"].sum()


# --- judge -----------------------------------------------------------------------------------


def scores_with_mean_z(z: list[float], n: int = 1000) -> FeatureScores:
    f = len(z)
    zeros, ints = np.zeros(f), np.full(f, n)
    return FeatureScores(
        zeros, zeros, zeros, zeros, np.asarray(z), zeros, zeros, zeros,
        ints, ints, ints, ints, np.full(f, 10),
    )  # fmt: skip


def test_bonferroni_and_holm() -> None:
    # Two-sided p-values 1e-4, 1.5e-3, 0.2 with alpha 0.01, m = 3, one alerting test.
    z = [float(stats.norm.isf(p / 2)) for p in (1e-4, 1.5e-3, 0.2)]
    s = scores_with_mean_z(z)
    bonf = judge(s, DriftThresholds.for_scores(s, 0.01, tests=("mean",)))
    holm = judge(s, DriftThresholds.for_scores(s, 0.01, tests=("mean",), correction="holm"))
    # Bonferroni: level 0.01/3 = 3.3e-3 for all -> features 0 and 1.
    assert bonf.drifted_features() == [0, 1]
    # Holm: 1e-4 <= 0.01/3, 1.5e-3 <= 0.01/2, 0.2 > 0.01 -> the same two, never fewer.
    assert holm.drifted_features() == [0, 1]
    np.testing.assert_allclose(bonf.p_values["mean"], [1e-4, 1.5e-3, 0.2], rtol=1e-9)
    # Between Bonferroni and Holm: p = 4e-3 fails 0.01/3 but passes Holm's 0.01/2.
    z2 = [float(stats.norm.isf(p / 2)) for p in (1e-4, 4e-3, 0.2)]
    s2 = scores_with_mean_z(z2)
    assert judge(s2, DriftThresholds.for_scores(s2, 0.01, tests=("mean",))).drifted_features() == [
        0
    ]
    holm2 = judge(s2, DriftThresholds.for_scores(s2, 0.01, tests=("mean",), correction="holm"))
    assert holm2.drifted_features() == [0, 1]
    # Two OR-ed tests halve each test's level: p = 4e-3 * 2 > 0.01 / 3... now fails, as does
    # feature 1 under Holm (2 * 4e-3 > 0.01 / 2).
    holm3 = judge(s2, DriftThresholds.for_scores(s2, 0.01, correction="holm"))
    assert holm3.drifted_features() == [0]
    assert holm3.by_test["mean"].tolist() == [True, False, False]
    assert not holm3.by_test["psi"].any()


def test_small_windows_are_not_judged() -> None:
    s = scores_with_mean_z([50.0, 50.0], n=10)
    v = judge(s, DriftThresholds.for_scores(s))
    assert not v.judged.any()
    assert not v.alert
    assert np.isnan(v.p_values["mean"]).all()
    json.dumps(v.to_dict(), allow_nan=False)


def test_digits_halves_do_not_drift_and_brighter_digits_do(digits: np.ndarray) -> None:
    rng = np.random.default_rng(13)
    order = rng.permutation(len(digits))
    base_x, live_x = digits[order[:900]], digits[order[900:]]
    base, live = baseline_and_window(base_x, live_x)
    s = score(live, base)
    v = judge(s, DriftThresholds.for_scores(s))
    assert not v.alert, v.to_dict()["drifted"]
    bright = view_of(base.edges, np.minimum(live_x * 1.25, 16.0))
    s2 = score(bright, base)
    v2 = judge(s2, DriftThresholds.for_scores(s2))
    assert v2.drifted.sum() >= 20
    doc = v2.to_dict()
    assert doc["alert"] is True
    assert set(doc["drifted"]) == set(v2.drifted_features())
    json.dumps(doc, allow_nan=False)
