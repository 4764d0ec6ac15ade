"""Per-feature drift scores of a tier-A window against the baseline, vectorised over features.

Owns: ``FeatureScores`` (value object, ``to_dict/from_dict``) and ``score`` (window view vs
baseline view with the same edges). Does not own: counting (``tier_a``), critical values and
alert decisions (``thresholds``) or when windows close (``monitor``). Pure: arrays in, values out.

Cells. PSI and JS compare the *folded* distribution: the underflow column is added to the first
bin and the overflow column to the feature's last bin, i.e. the outer bins are open-ended
``(-inf, e_1)`` and ``[e_{m-1}, +inf)``. The baseline's own under/overflow are empty by
construction (its edges are its minimum and maximum), so as separate cells they would hold a
window count against a baseline zero that is an artefact of fitting, not evidence: under no
drift a window of ``n`` values lands ``~2n/(N+1)`` of them outside a baseline of ``N``
(exchangeability), which inflates PSI at small ``N``. Folded, every cell has a real baseline
count and the chi-square calibration in ``thresholds`` holds. Out-of-range traffic is not lost:
``out_of_range_diff`` reports it, and the mean-shift test sees it.

Smoothing. Cells empty in both views are dropped (they carry no evidence and, for point-mass
features, are empty by construction). Every remaining cell gets ``EPSILON = 0.5`` pseudo-counts
on both sides (the Jeffreys / Krichevsky-Trofimov prior): ``p_i = (c_i + 0.5) / (N + 0.5 k)``.
So PSI and JS are always finite, a cell seen on one side only still counts as strong evidence,
and the bias at realistic counts (hundreds per cell) is negligible. ``cells`` records ``k``,
which the thresholds use for the degrees of freedom.

Scores per feature (NaN where either view has no value to compare):

- ``psi``: ``sum (q - p) ln(q / p)`` over kept cells (window ``q``, baseline ``p``).
- ``js``: Jensen-Shannon divergence in bits (base 2), in ``[0, 1]``.
- ``ks``: the *binned* two-sample KS statistic ``max |F_w - F_b|`` over the bucket boundaries
  (unfolded, so ``e_0`` and ``e_m`` count). It evaluates the empirical CDFs at a subset of
  points, so it is a lower bound of the continuous KS statistic; its critical value (the
  continuous one) is therefore conservative.
- ``mean_shift``: ``(mean_w - mean_b) / std_b`` in baseline sigmas (finite values only). Where
  ``std_b`` is 0 the pooled std of both views is used instead, and 0 where both are constant
  and equal, so it is always finite for a comparable feature.
- ``mean_z``: the test statistic for the mean, ``(mean_w - mean_b) / se`` with
  ``se^2 = max(s_b^2, s^2) / N + max(s_w^2, s^2) / n`` where ``s^2`` is the pooled variance
  (the permutation variance under no drift). Under no drift and well-behaved data all three
  variances agree and this is the textbook ``delta / (sigma_b sqrt(1/n + 1/N))``; the floor
  at the pooled variance keeps it honest for rare-event features (a pixel almost always 0),
  where one side's sample variance is 0 by chance.
- ``nan_rate_diff`` and ``nan_z``: NaN rate (NaN / all values) of the window minus the
  baseline's, and its z statistic with the same standard error rule on Bernoulli variances.
- ``out_of_range_diff``: rate of values outside ``[e_0, e_m]`` (incl. infinities), window minus
  baseline. Reported, not tested (see above).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from edge_agent.drift._wire import (
    MAX_FEATURES,
    check_keys,
    float_vector,
    floats_out,
    frozen,
    get,
    read_schema_version,
    require_mapping,
)
from edge_agent.drift.view import TierAStack, TierAView, check_same_edges
from edge_agent.errors import ContractError

SCHEMA_VERSION = 1
#: Pseudo-count added to every kept cell on both sides before PSI and JS (see module docs).
EPSILON = 0.5
# Differences of means below this fraction of their magnitude are float64 summation noise.
_REL_NOISE = 1e-9
_FLOATS = (
    "psi",
    "js",
    "ks",
    "mean_shift",
    "mean_z",
    "nan_rate_diff",
    "nan_z",
    "out_of_range_diff",
)
_INTS = ("n", "baseline_n", "total", "baseline_total", "cells")

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class FeatureScores:
    """Drift scores of one window, one entry per feature (see the module docstring).

    Attributes:
        psi: Population stability index over the folded, smoothed cells.
        js: Jensen-Shannon divergence, base 2, in ``[0, 1]``.
        ks: Binned two-sample KS statistic (a lower bound of the continuous one).
        mean_shift: ``(mean_w - mean_b) / std_b`` (baseline sigmas; pooled std if ``std_b`` is 0).
        mean_z: z statistic of the mean difference (robust standard error).
        nan_rate_diff: NaN rate of the window minus the baseline's.
        nan_z: z statistic of the NaN rate difference.
        out_of_range_diff: Rate outside the baseline's ``[e_0, e_m]``, window minus baseline.
        n: Window values in buckets (finite or infinite, NaN excluded): the ``n`` of the tests.
        baseline_n: Baseline values in buckets: the ``N`` of the tests.
        total: Window values including NaN.
        baseline_total: Baseline values including NaN.
        cells: Cells kept for PSI/JS (``k``; degrees of freedom are ``k - 1``).
        schema_version: Version of the ``to_dict`` layout.

    Raises:
        ContractError: (from the constructor) arrays of different lengths or of the wrong kind.
    """

    psi: F64
    js: F64
    ks: F64
    mean_shift: F64
    mean_z: F64
    nan_rate_diff: F64
    nan_z: F64
    out_of_range_diff: F64
    n: I64
    baseline_n: I64
    total: I64
    baseline_total: I64
    cells: I64
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ContractError(f"feature scores schema_version {self.schema_version} unsupported")
        f = np.asarray(self.psi).shape
        if len(f) != 1 or not 1 <= f[0] <= MAX_FEATURES:
            raise ContractError("feature scores: 'psi' must be a 1-D array of 1+ features")
        for name in (*_FLOATS, *_INTS):
            arr = np.asarray(getattr(self, name))
            if arr.shape != f or arr.dtype.kind not in ("f" if name in _FLOATS else "iu"):
                raise ContractError(f"feature scores: field {name!r} must match 'psi' in shape")
            dtype = np.float64 if name in _FLOATS else np.int64
            object.__setattr__(self, name, frozen(arr.astype(dtype)))

    @property
    def n_features(self) -> int:
        """Number of features."""
        return int(self.psi.shape[0])

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FeatureScores):
            return NotImplemented
        return all(
            np.array_equal(getattr(self, f.name), getattr(other, f.name), equal_nan=True)
            for f in fields(self)
            if f.name != "schema_version"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of lists; non-finite floats are ``"NaN"``, ``"Infinity"``..."""
        out: dict[str, Any] = {"schema_version": self.schema_version}
        out.update({name: floats_out(getattr(self, name)) for name in _FLOATS})
        out.update({name: getattr(self, name).tolist() for name in _INTS})
        return out

    @classmethod
    def from_dict(cls, d: Any) -> FeatureScores:
        """Parse ``to_dict`` output strictly.

        Raises:
            ContractError: a field is missing, unknown, of the wrong type or length.
        """
        d = require_mapping(d, "feature scores")
        check_keys(d, ("schema_version", *_FLOATS, *_INTS), "feature scores")
        read_schema_version(d, "feature scores", SCHEMA_VERSION)
        raw = get(d, "psi", "feature scores")
        f = len(raw) if isinstance(raw, list) else -1
        floats = {n: float_vector(get(d, n, "feature scores"), n, f) for n in _FLOATS}
        ints: dict[str, I64] = {}
        for name in _INTS:
            value = get(d, name, "feature scores")
            if not isinstance(value, list) or len(value) != f:
                raise ContractError(f"field {name!r} must be a list of {f} counts")
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
                raise ContractError(f"field {name!r} must hold non-negative integers")
            ints[name] = np.asarray(value, dtype=np.int64).reshape(f)
        return cls(**floats, **ints)  # type: ignore[arg-type]


def score(window: TierAView, baseline: TierAView, epsilon: float = EPSILON) -> FeatureScores:
    """Score every feature of ``window`` against ``baseline``.

    Args:
        window: The window's tier-A view.
        baseline: The baseline view of the same tensor (same edges).
        epsilon: Pseudo-count per kept cell and side (must be > 0 so PSI stays finite).

    Returns:
        The scores; features where either view has no value get NaN scores.

    Raises:
        DriftError: the views have different edges (different baselines or tensors).
        ValueError: ``epsilon`` is not positive and finite.
    """
    return FeatureScores(**score_arrays(window, baseline, epsilon)._asdict())


class ScoreArrays(NamedTuple):
    """``FeatureScores``' fields as bare arrays of any leading shape (``score_arrays``)."""

    psi: F64
    js: F64
    ks: F64
    mean_shift: F64
    mean_z: F64
    nan_rate_diff: F64
    nan_z: F64
    out_of_range_diff: F64
    n: I64
    baseline_n: I64
    total: I64
    baseline_total: I64
    cells: I64


def score_arrays(
    window: TierAView | TierAStack, baseline: TierAView, epsilon: float = EPSILON
) -> ScoreArrays:
    """``score``'s arrays: ``(f,)`` for a view, ``(c, f)`` for a stack of ``c`` windows.

    Every reduction runs along the last axis, so row ``i`` of a stack's scores is, bit for
    bit, the score of the stack's view ``i`` alone (``tests/unit/test_drift_scores.py``).

    Raises:
        DriftError: the window's edges are not the baseline's.
        ValueError: ``epsilon`` is not positive and finite.
    """
    check_same_edges(window.edges, baseline.edges)
    if not (np.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be positive and finite, got {epsilon}")
    cw = window.counts.astype(np.float64)
    cb = baseline.counts.astype(np.float64)
    n_w, n_b = cw.sum(axis=-1), cb.sum(axis=-1)
    empty = (n_w == 0) | (n_b == 0)
    used = window.edges.bins_used()
    fw, fb = _fold(cw, used), _fold(cb, used)
    kept = (fw + fb) > 0
    k = kept.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(kept, (fw + epsilon) / (n_w + epsilon * k)[..., None], 0.0)
        p = np.where(kept, (fb + epsilon) / (n_b + epsilon * k)[..., None], 0.0)
        safe_q, safe_p = np.where(kept, q, 1.0), np.where(kept, p, 1.0)
        psi = np.sum((q - p) * np.log(safe_q / safe_p), axis=-1)
        mid = 0.5 * (safe_q + safe_p)
        js = 0.5 * np.sum(q * np.log2(safe_q / mid) + p * np.log2(safe_p / mid), axis=-1)
        # CDFs at every bucket boundary: the cumulative counts before the overflow column.
        cdf_w = np.cumsum(cw[..., :-1], axis=-1) / n_w[..., None]
        cdf_b = np.cumsum(cb[..., :-1], axis=-1) / n_b[..., None]
        ks = np.max(np.abs(cdf_w - cdf_b), axis=-1)
        outside_w = (cw[..., 0] + cw[..., -1]) / n_w
        outside_b = (cb[..., 0] + cb[..., -1]) / n_b
    nan_mask = np.where(empty, np.nan, 0.0)
    shift, mean_z = _mean_scores(window, baseline)
    nan_diff, nan_z = _nan_scores(window, baseline)
    shape = n_w.shape
    return ScoreArrays(
        psi=np.maximum(psi, 0.0) + nan_mask,
        js=np.clip(js, 0.0, 1.0) + nan_mask,
        ks=ks + nan_mask,
        mean_shift=shift,
        mean_z=mean_z,
        nan_rate_diff=nan_diff,
        nan_z=nan_z,
        out_of_range_diff=outside_w - outside_b + nan_mask,
        n=n_w.astype(np.int64),
        baseline_n=np.broadcast_to(n_b.astype(np.int64), shape),
        total=window.total(),
        baseline_total=np.broadcast_to(baseline.total(), shape),
        cells=np.where(empty, 0, k).astype(np.int64),
    )


def _fold(counts: F64, used: I64) -> F64:
    """The ``(..., f, n_bins)`` bin counts with underflow added to bin 0, overflow to the last."""
    out = counts[..., 1:-1].copy()
    out[..., 0] += counts[..., 0]
    out[..., np.arange(counts.shape[-2]), used - 1] += counts[..., -1]
    return out


def _robust_z(
    diff: F64, var_w: F64, var_b: F64, var_pool: F64, n_w: F64, n_b: F64, scale: F64
) -> F64:
    """``diff / se`` with each side's variance floored at the pooled one (module docstring)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(np.maximum(var_b, var_pool) / n_b + np.maximum(var_w, var_pool) / n_w)
        noise = np.abs(diff) <= _REL_NOISE * scale
        z = np.where(noise, 0.0, diff / np.where(se > 0, se, 1.0))
        # A non-noise difference with zero spread: two different constants, infinite evidence.
        z = np.where(~noise & (se == 0), np.copysign(np.inf, diff), z)
    return np.asarray(np.where((n_w > 0) & (n_b > 0), z, np.nan), dtype=np.float64)


def _mean_scores(window: TierAView | TierAStack, baseline: TierAView) -> tuple[F64, F64]:
    n_w = window.count.astype(np.float64)
    n_b = baseline.count.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m_w, m_b = window.mean(), baseline.mean()
        var_w, var_b = window.std() ** 2, baseline.std() ** 2
        n = n_w + n_b
        m = (window.sum + baseline.sum) / n
        var_pool = np.maximum((window.sumsq + baseline.sumsq) / n - m * m, 0.0)
        diff = m_w - m_b
        scale = np.maximum(np.abs(m_w), np.abs(m_b))
        noise = np.abs(diff) <= _REL_NOISE * scale
        sigma = np.where(var_b > 0, np.sqrt(var_b), np.sqrt(var_pool))
        shift = np.where(noise | (sigma == 0), 0.0, diff / np.where(sigma > 0, sigma, 1.0))
    shift = np.where((n_w > 0) & (n_b > 0), shift, np.nan)
    return shift, _robust_z(diff, var_w, var_b, var_pool, n_w, n_b, scale)


def _nan_scores(window: TierAView | TierAStack, baseline: TierAView) -> tuple[F64, F64]:
    t_w = window.total().astype(np.float64)
    t_b = baseline.total().astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        r_w = window.nan / t_w
        r_b = baseline.nan / t_b
        r = (window.nan + baseline.nan) / (t_w + t_b)
    diff = np.asarray(r_w - r_b, dtype=np.float64)
    z = _robust_z(diff, r_w * (1 - r_w), r_b * (1 - r_b), r * (1 - r), t_w, t_b, np.ones_like(r))
    return diff, z
