"""Alert thresholds calibrated to the window and baseline sizes, and the drift verdict.

Owns: the scores' null distributions (chi-square and normal quantiles and tails, here because
scipy is not a device dependency), ``DriftThresholds`` (per-feature critical values for one
window), ``DriftVerdict`` and ``judge``. Does not own the scores (``scores``) or windowing
(``monitor``). Pure: no I/O, no clock. The derivations are in ``docs/drift.md``.

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

Quantiles: ``chi2_isf`` starts at Wilson-Hilferty and refines by Newton steps on
``ln Q(k/2, x/2)`` (regularized upper incomplete gamma, series / continued fraction) to ~1e-12
relative; ``norm_isf`` is Acklam's approximation plus one Halley step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.drift._wire import floats_out, frozen
from edge_agent.drift.scores import FeatureScores

TESTS = ("psi", "js", "ks", "mean", "nan")
DEFAULT_TESTS = ("psi", "mean")
DEFAULT_ALPHA = 0.01
#: Fewer window (or baseline) values than this and a feature is not judged.
DEFAULT_MIN_N = 50
CORRECTIONS = ("bonferroni", "holm")
_JS_SCALE = 8.0 * math.log(2.0)

F64 = npt.NDArray[np.float64]

_A = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02,
      1.383577518672690e02, -3.066479806614716e01, 2.506628277459239e00)  # fmt: skip
_B = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02,
      6.680131188771972e01, -1.328068155288572e01)  # fmt: skip
_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00,
      -2.549732539343734e00, 4.374664141464968e00, 2.938163982698783e00)  # fmt: skip
_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)


def norm_sf(z: float) -> float:
    """Upper tail ``P(Z > z)`` of the standard normal."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def norm_isf(p: float) -> float:
    """``z`` with ``P(Z > z) = p`` (Acklam's approximation, one Halley refinement).

    Raises:
        ValueError: ``p`` is not in ``(0, 1)``.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    lo = min(p, 1.0 - p)  # lower-tail probability of -|z|
    if lo < 0.02425:
        q = math.sqrt(-2.0 * math.log(lo))
        x = (((((_C[0] * q + _C[1]) * q + _C[2]) * q + _C[3]) * q + _C[4]) * q + _C[5]) / (
            (((_D[0] * q + _D[1]) * q + _D[2]) * q + _D[3]) * q + 1.0
        )
    else:
        q = lo - 0.5
        r = q * q
        x = (
            (((((_A[0] * r + _A[1]) * r + _A[2]) * r + _A[3]) * r + _A[4]) * r + _A[5])
            * q
            / (((((_B[0] * r + _B[1]) * r + _B[2]) * r + _B[3]) * r + _B[4]) * r + 1.0)
        )
    e = 0.5 * math.erfc(-x / math.sqrt(2.0)) - lo
    u = e * math.sqrt(2.0 * math.pi) * math.exp(x * x / 2.0)
    x -= u / (1.0 + x * u / 2.0)
    return -x if p <= 0.5 else x


def _log_gamma_q(a: float, x: float) -> float:
    """``ln Q(a, x)``, the regularized upper incomplete gamma (Numerical Recipes 6.2)."""
    if x <= 0.0:
        return 0.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:  # series for P, then Q = 1 - P
        term = total = 1.0 / a
        ap = a
        for _ in range(1000):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-16:
                break
        return math.log1p(-min(1.0, total * math.exp(log_front)))
    tiny = 1e-300  # modified Lentz continued fraction for Q
    b = x + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2.0
        d = 1.0 / max(an * d + b, tiny, key=abs)
        c = max(b + an / c, tiny, key=abs)
        h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return log_front + math.log(h)


def chi2_sf(x: float, dof: int) -> float:
    """Upper tail ``P(X > x)`` of chi-square with ``dof >= 1`` degrees of freedom."""
    if math.isnan(x) or math.isinf(x):
        return math.nan if math.isnan(x) else (0.0 if x > 0 else 1.0)
    return math.exp(_log_gamma_q(dof / 2.0, x / 2.0)) if x > 0 else 1.0


def wilson_hilferty_isf(p: float, dof: int) -> float:
    """Wilson-Hilferty approximation of the chi-square upper quantile (start for ``chi2_isf``).

    Raises:
        ValueError: ``p`` is not in ``(0, 1)``.
    """
    v = 2.0 / (9.0 * dof)
    return float(dof * max(1.0 - v + norm_isf(p) * math.sqrt(v), 1e-3) ** 3)


@lru_cache(maxsize=4096)
def chi2_isf(p: float, dof: int) -> float:
    """``x`` with ``P(X > x) = p`` for chi-square(``dof``), to about 1e-12 relative.

    Raises:
        ValueError: ``p`` is not in ``(0, 1)`` or ``dof < 1``.
    """
    if dof < 1:
        raise ValueError(f"dof must be >= 1, got {dof}")
    x = wilson_hilferty_isf(p, dof)
    target = math.log(p)
    a = dof / 2.0
    for _ in range(100):
        log_q = _log_gamma_q(a, x / 2.0)
        # d ln Q / dx = -pdf(x) / Q(x), pdf of chi-square(dof) in logs.
        log_pdf = (a - 1.0) * math.log(x) - x / 2.0 - a * math.log(2.0) - math.lgamma(a)
        step = (log_q - target) * math.exp(log_q - log_pdf)
        new = x + step if x + step > 0 else x / 2.0
        if abs(new - x) <= 1e-13 * x:
            return new
        x = new
    return x


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
        q = np.asarray([chi2_isf(level, int(d)) if d > 0 else math.inf for d in dof.tolist()])
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


def _p_values(s: FeatureScores, t: DriftThresholds) -> dict[str, F64]:
    """p-values of the alerting tests; NaN where a feature has too few values to judge."""
    h = s.n * s.baseline_n / np.maximum(s.n + s.baseline_n, 1)
    dof = (s.cells - 1).tolist()
    out: dict[str, F64] = {}
    for name in t.tests:
        if name in ("psi", "js"):
            stat = (h * (s.psi if name == "psi" else _JS_SCALE * s.js)).tolist()
            p = np.asarray(
                [chi2_sf(x, d) if d > 0 else 1.0 for x, d in zip(stat, dof, strict=True)]
            )
        elif name == "ks":
            p = np.where(s.cells > 1, np.minimum(1.0, 2.0 * np.exp(-2.0 * h * s.ks**2)), 1.0)
        else:
            z = s.mean_z if name == "mean" else s.nan_z
            p = np.asarray([2.0 * norm_sf(abs(v)) for v in z.tolist()])
        n, big_n = (s.total, s.baseline_total) if name == "nan" else (s.n, s.baseline_n)
        p[(n < t.min_n) | (big_n < t.min_n) | np.isnan(p)] = np.nan
        out[name] = p
    return out


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
    p = _p_values(scores, t)
    n_tests = len(t.tests)
    alerting = np.stack([p[name] for name in t.tests])
    judged = ~np.all(np.isnan(alerting), axis=0)
    best = np.min(np.where(np.isnan(alerting), np.inf, alerting), axis=0)
    combined = np.where(judged, np.minimum(1.0, n_tests * best), np.nan)
    # Per-feature level: alpha/m (Bonferroni) or Holm's step-down alpha/(m - rank).
    feature_level = np.full(f, t.alpha / t.m)
    if t.correction == "holm":
        order = np.argsort(np.where(judged, combined, np.inf), kind="stable")
        steps = t.alpha / np.maximum(t.m - np.arange(f), 1)
        passed = np.where(judged[order], combined[order], np.inf) <= steps
        stop = int(np.argmin(passed)) if not passed.all() else f
        feature_level[order] = np.where(np.arange(f) < stop, steps, 0.0)
    with np.errstate(invalid="ignore"):
        drifted = judged & (combined <= feature_level)
        by_test = {name: drifted & (p[name] * n_tests <= feature_level) for name in t.tests}
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
