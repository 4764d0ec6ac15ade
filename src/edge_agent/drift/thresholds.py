"""Alert thresholds calibrated to the window and baseline sizes, and the drift verdict.

Owns: ``DriftThresholds`` (per-feature critical values for one window), ``DriftVerdict`` and
``judge``. Does not own the scores (``scores``), their null distributions (chi-square and normal
tails and quantiles, ``distributions``) or windowing (``monitor``). Pure: no I/O, no clock.
The derivations are in ``docs/drift.md``.

With ``n`` window and ``N`` baseline values, ``k`` kept cells and ``h = nN / (n + N)``, under
no drift: ``h * PSI`` and ``8 ln2 * h * JS_bits`` are asymptotically chi-square(``k - 1``)
(both expand to Pearson's ``sum (q - p)^2 / p``; ``2 ln2`` would be the one-sample G scale);
the KS critical value is ``c * sqrt((n + N) / (n N))`` with ``c = sqrt(-ln(level / 2) / 2)``
(conservative for the binned KS); ``mean_z`` and ``nan_z`` are standard normal (two-sided).
One kept cell (a constant feature) has no PSI/JS/KS test: critical ``inf``, p-value 1.

Correction: ``alpha`` is the family-wise false-alarm rate per window over ``m`` features (one
tensor's). A feature alerts when any test in ``tests`` (default PSI OR mean) rejects;
Bonferroni over features and tests gives each test the level ``alpha / (m * len(tests))``.
``m=1`` makes ``alpha`` the per-feature-window rate. ``correction="holm"`` uses Holm's
step-down over features instead (same guarantee, never fewer detections) on each feature's
p-value ``min(1, len(tests) * min_t p_t)``.

p-values are computed for all features at once (``distributions.chi2_sf_array`` and
``norm_two_sided_array``), agreeing with the scalar ``chi2_sf`` and ``2 * norm_sf(|z|)`` to
about 1e-13 relative.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from edge_agent.drift._wire import floats_out, frozen
from edge_agent.drift.distributions import (
    chi2_isf,
    chi2_sf_array,
    norm_isf,
    norm_two_sided_array,
)
from edge_agent.drift.scores import FeatureScores, ScoreArrays

TESTS = ("psi", "js", "ks", "mean", "nan")
DEFAULT_TESTS = ("psi", "mean")
DEFAULT_ALPHA = 0.01
#: Fewer window (or baseline) values than this and a feature is not judged.
DEFAULT_MIN_N = 50
CORRECTIONS = ("bonferroni", "holm")
_JS_SCALE = 8.0 * math.log(2.0)

F64 = npt.NDArray[np.float64]


def _as_array(value: npt.ArrayLike, what: str) -> F64:
    arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if arr.ndim != 1 or np.any(~np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{what} must be non-negative finite numbers (scalar or 1-D)")
    return arr


@dataclass(frozen=True, eq=False)
class DriftThresholds:
    """Critical values per feature for one window (see the module docstring for the math).

    Attributes:
        alpha: Family-wise false-alarm rate per window over ``m`` features.
        m: Features in the family (``1``: ``alpha`` is the per-feature-window rate).
        tests: The tests OR-ed into an alert (subset of ``TESTS``).
        correction: ``"bonferroni"`` or ``"holm"`` (over features; tests are Bonferroni).
        level: Per-test level ``alpha / (m * len(tests))``.
        psi, js, ks: Critical scores per feature (``inf`` where there is no test).
        mean_shift: ``|mean_shift|`` (baseline sigmas) at which the mean test fires (display).
        z: Critical ``|mean_z|`` and ``|nan_z|``.
        min_n: Features with fewer window or baseline values are not judged.
    """

    alpha: float
    m: int
    tests: tuple[str, ...]
    correction: str
    level: float
    psi: F64
    js: F64
    ks: F64
    mean_shift: F64
    z: float
    min_n: int

    @classmethod
    def for_window(
        cls,
        n: npt.ArrayLike,
        baseline_n: npt.ArrayLike,
        bins: npt.ArrayLike,
        m: int,
        alpha: float = DEFAULT_ALPHA,
        *,
        tests: Sequence[str] = DEFAULT_TESTS,
        correction: str = "bonferroni",
        min_n: int = DEFAULT_MIN_N,
    ) -> DriftThresholds:
        """Critical values for windows of ``n`` values against a baseline of ``baseline_n``.

        Args:
            n: Window values per feature (scalar or one per feature).
            baseline_n: Baseline values per feature (scalar or one per feature).
            bins: Kept cells ``k`` per feature (``FeatureScores.cells``); ``k - 1`` d.o.f.
            m: Number of features in the family the ``alpha`` covers.
            alpha: Family-wise false-alarm rate per window.
            tests: Tests whose rejection raises an alert.
            correction: ``"bonferroni"`` or ``"holm"``.
            min_n: Minimum values on each side for a feature to be judged.

        Returns:
            The thresholds (arrays broadcast to a common length).

        Raises:
            ValueError: ``alpha`` not in ``(0, 1)``, ``m < 1``, unknown or no tests, unknown
                correction, or negative / non-finite sizes.
        """
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if m < 1:
            raise ValueError(f"m must be >= 1, got {m}")
        chosen = tuple(dict.fromkeys(tests))
        if not chosen or any(t not in TESTS for t in chosen):
            raise ValueError(f"tests must be a non-empty subset of {TESTS}, got {tests}")
        if correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
        nw, nb, k = np.broadcast_arrays(
            _as_array(n, "n"), _as_array(baseline_n, "baseline_n"), _as_array(bins, "bins")
        )
        level = alpha / (m * len(chosen))
        dof = np.maximum(k.astype(np.int64) - 1, 0)
        distinct, at = np.unique(dof, return_inverse=True)
        q = np.asarray([chi2_isf(level, d) if d > 0 else math.inf for d in distinct.tolist()])
        q = q[at.reshape(dof.shape)] if q.size else np.zeros(dof.shape)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = nw * nb / (nw + nb)
            psi = np.where(h > 0, q / h, np.inf)
            c = math.sqrt(-math.log(level / 2.0) / 2.0)
            ks = np.where((h > 0) & (dof > 0), c / np.sqrt(h), np.inf)
            z = norm_isf(level / 2.0)
            shift = np.where(h > 0, z / np.sqrt(h), np.inf)
        return cls(
            alpha, m, chosen, correction, level,
            frozen(psi), frozen(psi / _JS_SCALE), frozen(ks), frozen(shift), z, min_n,
        )  # fmt: skip

    @classmethod
    def for_scores(
        cls,
        scores: FeatureScores,
        alpha: float = DEFAULT_ALPHA,
        *,
        m: int | None = None,
        tests: Sequence[str] = DEFAULT_TESTS,
        correction: str = "bonferroni",
        min_n: int = DEFAULT_MIN_N,
    ) -> DriftThresholds:
        """``for_window`` with sizes and cells from ``scores``; ``m`` defaults to its features.

        Raises:
            ValueError: as ``for_window``.
        """
        return cls.for_window(
            scores.n, scores.baseline_n, scores.cells, scores.n_features if m is None else m,
            alpha, tests=tests, correction=correction, min_n=min_n,
        )  # fmt: skip


@dataclass(frozen=True, eq=False)
class DriftVerdict:
    """Which features drifted in one window, and by which test.

    Attributes:
        drifted: Per feature: an alert after the correction.
        judged: Per feature: enough values to be judged (``min_n`` on both sides).
        by_test: Per alerting test, per feature: that test rejected at the feature's level.
        p_values: Per alerting test, per feature (NaN where not judged); the margins cover
            every test.
        margins: Per test, ``|statistic| / critical``: above 1 means past the Bonferroni
            critical value (useful on dashboards even under Holm).
        thresholds: The thresholds it was judged against.
    """

    drifted: npt.NDArray[np.bool_]
    judged: npt.NDArray[np.bool_]
    by_test: Mapping[str, npt.NDArray[np.bool_]]
    p_values: Mapping[str, F64]
    margins: Mapping[str, F64]
    thresholds: DriftThresholds

    @property
    def alert(self) -> bool:
        """True if any feature drifted."""
        return bool(self.drifted.any())

    def drifted_features(self) -> list[int]:
        """Indices of the features that drifted."""
        return [int(i) for i in np.flatnonzero(self.drifted)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (p-values and margins as lists, NaN as ``"NaN"``)."""
        t = self.thresholds
        return {
            "alert": self.alert,
            "drifted": self.drifted_features(),
            "judged": int(self.judged.sum()),
            "alpha": t.alpha,
            "m": t.m,
            "tests": list(t.tests),
            "correction": t.correction,
            "by_test": {k: [int(i) for i in np.flatnonzero(v)] for k, v in self.by_test.items()},
            "p_values": {k: floats_out(v) for k, v in self.p_values.items()},
            "margins": {k: floats_out(v) for k, v in self.margins.items()},
        }


def _p_values(s: FeatureScores | ScoreArrays, tests: Sequence[str], min_n: int) -> dict[str, F64]:
    """p-values of the alerting tests; NaN where a feature has too few values to judge."""
    h = s.n * s.baseline_n / np.maximum(s.n + s.baseline_n, 1)
    out: dict[str, F64] = {}
    for name in tests:
        if name in ("psi", "js"):
            stat = h * (s.psi if name == "psi" else _JS_SCALE * s.js)
            p = chi2_sf_array(stat, s.cells - 1)
        elif name == "ks":
            p = np.where(s.cells > 1, np.minimum(1.0, 2.0 * np.exp(-2.0 * h * s.ks**2)), 1.0)
        else:
            p = norm_two_sided_array(s.mean_z if name == "mean" else s.nan_z)
        n, big_n = (s.total, s.baseline_total) if name == "nan" else (s.n, s.baseline_n)
        p[(n < min_n) | (big_n < min_n) | np.isnan(p)] = np.nan
        out[name] = p
    return out


def _decide(
    p: Mapping[str, F64], tests: Sequence[str], alpha: float, m: int, correction: str
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_], dict[str, npt.NDArray[np.bool_]]]:
    """``(drifted, judged, by_test)`` from p-values of shape ``(..., f)``, one family per row."""
    n_tests = len(tests)
    alerting = np.stack([p[name] for name in tests])
    judged = ~np.all(np.isnan(alerting), axis=0)
    best = np.min(np.where(np.isnan(alerting), np.inf, alerting), axis=0)
    combined = np.where(judged, np.minimum(1.0, n_tests * best), np.nan)
    f = combined.shape[-1]
    # Per-feature level: alpha/m (Bonferroni) or Holm's step-down alpha/(m - rank).
    feature_level = np.full(combined.shape, alpha / m)
    if correction == "holm":
        order = np.argsort(np.where(judged, combined, np.inf), axis=-1, kind="stable")
        steps = alpha / np.maximum(m - np.arange(f), 1)
        ranked = np.take_along_axis(np.where(judged, combined, np.inf), order, axis=-1)
        passed = ranked <= steps
        stop = np.where(passed.all(axis=-1), f, np.argmin(passed, axis=-1))
        levels = np.where(np.arange(f) < stop[..., None], steps, 0.0)
        np.put_along_axis(feature_level, order, levels, axis=-1)
    with np.errstate(invalid="ignore"):
        drifted = judged & (combined <= feature_level)
        by_test = {name: drifted & (p[name] * n_tests <= feature_level) for name in tests}
    return drifted, judged, by_test


def judge(scores: FeatureScores, thresholds: DriftThresholds) -> DriftVerdict:
    """Decide which features drifted (see the module docstring for the rule).

    Args:
        scores: The window's scores.
        thresholds: Thresholds for this window (``DriftThresholds.for_scores(scores)``).

    Returns:
        The verdict.

    Raises:
        ValueError: the thresholds have a different number of features than the scores.
    """
    t = thresholds
    f = scores.n_features
    if t.psi.shape[0] not in (1, f):
        raise ValueError(f"thresholds cover {t.psi.shape[0]} features, scores {f}")
    p = _p_values(scores, t.tests, t.min_n)
    drifted, judged, by_test = _decide(p, t.tests, t.alpha, t.m, t.correction)
    with np.errstate(invalid="ignore"):
        stats = {
            "psi": scores.psi / t.psi, "js": scores.js / t.js, "ks": scores.ks / t.ks,
            "mean": np.abs(scores.mean_z) / t.z, "nan": np.abs(scores.nan_z) / t.z,
        }  # fmt: skip
    return DriftVerdict(
        frozen(drifted),
        frozen(judged),
        MappingProxyType({k: frozen(v) for k, v in by_test.items()}),
        MappingProxyType({k: frozen(v) for k, v in p.items()}),
        MappingProxyType({k: frozen(np.broadcast_to(v, (f,))) for k, v in stats.items()}),
        thresholds,
    )


class StackVerdict(NamedTuple):
    """``judge_stack``'s decisions, ``(c, f)`` each: one row per stacked window.

    ``psi``/``ks``/``mean_shift`` are the critical values (``DriftThresholds``' fields).
    """

    drifted: npt.NDArray[np.bool_]
    judged: npt.NDArray[np.bool_]
    by_test: Mapping[str, npt.NDArray[np.bool_]]
    psi: F64
    ks: F64
    mean_shift: F64


def judge_stack(
    scores: ScoreArrays,
    alpha: float = DEFAULT_ALPHA,
    *,
    tests: Sequence[str] = DEFAULT_TESTS,
    correction: str = "bonferroni",
    min_n: int = DEFAULT_MIN_N,
) -> StackVerdict:
    """``judge(s, DriftThresholds.for_scores(s, ...))`` for every row of ``(c, f)`` scores.

    Each row is its own family of ``f`` features (``m = f``), decided exactly as ``judge``
    decides one window's scores: the same p-values, critical values and correction, on arrays.

    Raises:
        ValueError: as ``DriftThresholds.for_window``, or scores that are not ``(c, f)``.
    """
    if scores.psi.ndim != 2:
        raise ValueError(f"stacked scores must be (windows, features), got {scores.psi.shape}")
    shape = scores.psi.shape
    t = DriftThresholds.for_window(
        scores.n.ravel(), scores.baseline_n.ravel(), scores.cells.ravel(), shape[1], alpha,
        tests=tests, correction=correction, min_n=min_n,
    )  # fmt: skip
    p = _p_values(scores, t.tests, t.min_n)
    drifted, judged, by_test = _decide(p, t.tests, t.alpha, t.m, t.correction)
    return StackVerdict(
        drifted, judged, by_test,
        *(np.broadcast_to(a, (shape[0] * shape[1],)).reshape(shape)
          for a in (t.psi, t.ks, t.mean_shift)),
    )  # fmt: skip
