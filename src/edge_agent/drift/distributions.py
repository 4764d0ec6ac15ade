"""Null distributions of the drift tests: chi-square and normal tails and quantiles.

Owns: the scalar tails and quantiles the thresholds need (``norm_sf``, ``norm_isf``,
``chi2_sf``, ``chi2_isf``, ``wilson_hilferty_isf``) and their array forms for the p-values of
many features and windows at once (``chi2_sf_array``, ``norm_two_sided_array``). Here because
scipy is not a device dependency. Does not own the scores (``scores``) or what a p-value
decides (``thresholds``). Pure: no I/O, no clock.

Tails: ``chi2_sf(x, k) = Q(k/2, x/2)``, the regularized upper incomplete gamma, from its power
series for ``P`` (``Q = 1 - P``, in logs) below ``x/2 < k/2 + 1`` and from its continued
fraction (modified Lentz) above (Numerical Recipes 6.2), to about 1e-14 relative. The array
form ``chi2_sf_array`` uses that the drift tests' degrees of freedom are integers (kept cells
minus one): ``Q`` is then a finite sum of positive terms (plus ``erfc`` for odd ``k``), with no
iteration to converge, so a whole report's features and cells take a few array operations per
distinct ``k``. It agrees with ``chi2_sf`` to about 1e-13 relative down to 1e-300
(``tests/unit/test_drift_distributions.py``). The two-sided normal p-value is ``math.erfc``
element by element: numpy has no erfc, and the scalar one is exact and cheap.

Quantiles: ``chi2_isf`` starts at Wilson-Hilferty and refines by Newton steps on
``ln Q(k/2, x/2)`` to ~1e-12 relative; ``norm_isf`` is Acklam's approximation plus one Halley
step.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from edge_agent.drift._wire import frozen

__all__ = [
    "chi2_isf",
    "chi2_sf",
    "chi2_sf_array",
    "norm_isf",
    "norm_sf",
    "norm_two_sided_array",
    "wilson_hilferty_isf",
]

F64 = npt.NDArray[np.float64]

_A = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02,
      1.383577518672690e02, -3.066479806614716e01, 2.506628277459239e00)  # fmt: skip
_B = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02,
      6.680131188771972e01, -1.328068155288572e01)  # fmt: skip
_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00,
      -2.549732539343734e00, 4.374664141464968e00, 2.938163982698783e00)  # fmt: skip
_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
_ITERATIONS = 1000
_EPS = 1e-16
_TINY = 1e-300


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
        for _ in range(_ITERATIONS):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * _EPS:
                break
        return math.log1p(-min(1.0, total * math.exp(log_front)))
    b = x + 1.0 - a  # modified Lentz continued fraction for Q
    c, d = 1.0 / _TINY, 1.0 / b
    h = d
    for i in range(1, _ITERATIONS):
        an = -i * (i - a)
        b += 2.0
        d = 1.0 / max(an * d + b, _TINY, key=abs)
        c = max(b + an / c, _TINY, key=abs)
        h *= d * c
        if abs(d * c - 1.0) < _EPS:
            break
    return log_front + math.log(h)


def chi2_sf(x: float, dof: int) -> float:
    """Upper tail ``P(X > x)`` of chi-square with ``dof >= 1`` degrees of freedom."""
    if math.isnan(x) or math.isinf(x):
        return math.nan if math.isnan(x) else (0.0 if x > 0 else 1.0)
    return math.exp(_log_gamma_q(dof / 2.0, x / 2.0)) if x > 0 else 1.0


_erfc = np.frompyfunc(math.erfc, 1, 1)


def _erfc_array(x: F64) -> F64:
    """``math.erfc`` element by element (no vector erfc without scipy; bit-identical)."""
    return np.asarray(_erfc(x), dtype=np.float64) if x.size else np.empty_like(x)


@lru_cache(maxsize=512)
def _log_factorials(dof: int) -> F64:
    """``lgamma(j + s + 1)`` for the ``j`` of ``_tail_sum`` (``s = 0`` or ``1/2`` by parity)."""
    s = 0.0 if dof % 2 == 0 else 0.5
    return frozen(np.asarray([math.lgamma(j + s + 1.0) for j in range(dof // 2)], np.float64))


def _chi2_sf_one_dof(x: F64, dof: int) -> F64:
    """``Q(dof/2, x)`` for half the chi-square statistic ``x`` (positive, finite), exactly.

    Integer ``dof``: even, ``Q = e^-x sum_{j<dof/2} x^j / j!``; odd,
    ``Q = erfc(sqrt x) + e^-x sum_{j<(dof-1)/2} x^(j+1/2) / Gamma(j+3/2)``. Every term is
    positive (no cancellation) and built in logs, so neither ``e^-x`` underflowing nor
    ``x^j`` overflowing loses a term that the sum keeps.
    """
    base = np.zeros_like(x) if dof % 2 == 0 else _erfc_array(np.sqrt(x))
    lg = _log_factorials(dof)
    if lg.size == 0:
        return base
    s = 0.0 if dof % 2 == 0 else 0.5
    powers = np.arange(lg.size, dtype=np.float64) + s
    log_terms = np.log(x)[:, None] * powers[None, :] - x[:, None] - lg[None, :]
    return np.asarray(base + np.exp(log_terms).sum(axis=1), dtype=np.float64)


def chi2_sf_array(x: npt.ArrayLike, dof: npt.ArrayLike) -> F64:
    """``chi2_sf`` element by element (broadcast), by closed forms; 1 where ``dof < 1``.

    NaN gives NaN, ``inf`` gives 0, ``x <= 0`` gives 1, as ``chi2_sf`` does. Agrees with
    ``chi2_sf`` to about 1e-13 relative (both are within a few 1e-14 of the exact tail; the
    closed form rounds ``-x + j ln x``, whose magnitude reaches ~1,500 before the tail
    underflows).
    """
    xs, ks = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(dof, np.int64))
    xs, ks = xs.ravel(), ks.ravel()
    out = np.where(np.isnan(xs), np.nan, np.where(np.isinf(xs) & (xs > 0), 0.0, 1.0))
    work = np.isfinite(xs) & (xs / 2.0 > 0) & (ks >= 1)  # x / 2 of 5e-324 is 0: Q = 1
    if work.any():
        wx, wk = xs[work] / 2.0, ks[work]
        got = np.empty_like(wx)
        for d in np.unique(wk).tolist():
            sel = wk == d
            got[sel] = _chi2_sf_one_dof(wx[sel], d)
        out[work] = np.minimum(got, 1.0)
    shape = np.broadcast_shapes(np.shape(x), np.shape(dof))
    return np.asarray(out.reshape(shape), dtype=np.float64)


def norm_two_sided_array(z: npt.ArrayLike) -> F64:
    """``2 * norm_sf(|z|)`` element by element, bit-identical to it (NaN gives NaN)."""
    zs = np.abs(np.asarray(z, np.float64))
    return _erfc_array(zs / math.sqrt(2.0))


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
