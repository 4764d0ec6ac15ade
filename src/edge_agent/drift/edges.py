"""Per-feature bin edges fitted at baseline quantiles, and the binning convention they define.

Owns: ``FeatureEdges`` (the value object), ``fit_edges`` (quantiles of a baseline batch) and
the comparison matrix the tracker bins with. Does not own: counting (``tier_a``) or scores.

Convention. Feature ``j`` has strictly increasing finite edges ``e_0 < e_1 < ... < e_m``
(``m >= 1`` bins, ``m <= n_bins``). A value ``x`` lands in exactly one bucket:

- underflow:  ``x < e_0`` (including ``-inf``),
- bin ``i``:   ``e_i <= x < e_{i+1}`` for ``i < m - 1``,
- last bin:   ``e_{m-1} <= x <= e_m`` (closed on the right, as in ``numpy.histogram``),
- overflow:   ``x > e_m`` (including ``+inf``).

So a value equal to an edge belongs to the bin that edge opens, except the top edge, which
closes the last bin. NaN is in no bucket (sketches count it apart). Counts are laid out in
``n_bins + 2`` columns: ``[underflow, bin 0, ..., bin n_bins-1, overflow]``; a feature with
fewer than ``n_bins`` bins leaves its trailing bin columns at zero.

Fitting. Edges are the baseline's quantiles at ranks ``0, 1/n_bins, ..., 1`` (the
``inverted_cdf`` method, so every edge is an observed value), over finite values only, with
duplicates removed. A value that several quantiles collapse onto is a point mass (digit pixels
that are mostly 0, a constant feature); it gets its own bin ``[v, nextafter(v, +inf))``, which
holds exactly ``v``, so the mass is not smeared into a neighbouring bin. A constant feature
``c`` therefore has edges ``[c, nextafter(c)]``: one bin holding ``c``, under- and overflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.drift._wire import (
    MAX_BINS,
    MAX_FEATURES,
    check_keys,
    frozen,
    get,
    read_int,
    require_mapping,
)
from edge_agent.errors import ContractError, DriftError


@dataclass(frozen=True)
class FeatureEdges:
    """Bin edges for every feature of one tensor; see the module docstring for the convention.

    Attributes:
        n_bins: Bin columns per feature (the most bins any feature may have).
        edges: Per feature, the strictly increasing finite edges (2 to ``n_bins + 1`` of them).
    """

    n_bins: int
    edges: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        if isinstance(self.n_bins, bool) or not isinstance(self.n_bins, int):
            raise ContractError("edges: field 'n_bins' must be an integer")
        if not 1 <= self.n_bins <= MAX_BINS:
            raise ContractError(f"edges: field 'n_bins' must be in [1, {MAX_BINS}]")
        if not 1 <= len(self.edges) <= MAX_FEATURES:
            raise ContractError(f"edges: need 1 to {MAX_FEATURES} features, got {len(self.edges)}")
        for j, row in enumerate(self.edges):
            _check_row(row, j, self.n_bins)

    @property
    def n_features(self) -> int:
        """Number of features."""
        return len(self.edges)

    @property
    def width(self) -> int:
        """Count columns per feature: underflow, ``n_bins`` bins, overflow."""
        return self.n_bins + 2

    def bins_used(self) -> npt.NDArray[np.int64]:
        """Real bins per feature (``len(edges[j]) - 1``); columns beyond stay zero. Read-only."""
        return self._bins_used

    @cached_property
    def _bins_used(self) -> npt.NDArray[np.int64]:
        return frozen(np.asarray([len(r) - 1 for r in self.edges], dtype=np.int64))

    @cached_property
    def thresholds(self) -> npt.NDArray[np.float64]:
        """The ``(f, n_bins + 1)`` matrix ``T`` with bucket column ``= sum(x >= T[j])``.

        Row ``j`` is ``[e_0, ..., e_{m-1}, u, ..., u]`` with ``u = nextafter(e_m, +inf)``, so
        ``x >= u`` is exactly ``x > e_m``: a value on the top edge stays in the last bin, a
        value above it passes every threshold and lands in the overflow column ``n_bins + 1``.
        NaN passes none (the tracker routes it apart). Read-only; computed once.
        """
        out = np.empty((self.n_features, self.n_bins + 1), dtype=np.float64)
        for j, row in enumerate(self.edges):
            m = len(row) - 1
            out[j, :m] = row[:m]
            with np.errstate(over="ignore"):  # top edge = max float: u = inf, still exact
                out[j, m:] = np.nextafter(row[m], np.inf)
        return frozen(out)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (edges are finite, so plain numbers)."""
        return {"n_bins": self.n_bins, "edges": [list(r) for r in self.edges]}

    @classmethod
    def from_dict(cls, d: Any) -> FeatureEdges:
        """Parse ``to_dict`` output strictly.

        Raises:
            ContractError: a field is missing, unknown, of the wrong type or out of range.
        """
        d = require_mapping(d, "edges")
        check_keys(d, ("n_bins", "edges"), "edges")
        n_bins = read_int(d, "n_bins", "edges", 1, MAX_BINS)
        rows = get(d, "edges", "edges")
        if not isinstance(rows, list):
            raise ContractError("edges: field 'edges' must be a list of lists")
        parsed: list[tuple[float, ...]] = []
        for j, row in enumerate(rows):
            if not isinstance(row, list) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in row
            ):
                raise ContractError(f"edges: field 'edges[{j}]' must be a list of numbers")
            parsed.append(tuple(float(v) for v in row))
        return cls(n_bins, tuple(parsed))


def _check_row(row: Any, j: int, n_bins: int) -> None:
    if not isinstance(row, tuple) or not 2 <= len(row) <= n_bins + 1:
        raise ContractError(f"edges: feature {j} needs a tuple of 2 to {n_bins + 1} edges")
    arr = np.asarray(row, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ContractError(f"edges: feature {j} has a non-finite edge")
    if not np.all(np.diff(arr) > 0):
        raise ContractError(f"edges: feature {j} edges are not strictly increasing")


def fit_edges(x2d: npt.ArrayLike, n_bins: int = 10) -> FeatureEdges:
    """Fit per-feature edges at the quantiles of a baseline batch (see the module docstring).

    Args:
        x2d: Baseline features, shape ``(n, f)`` (``flatten_features`` output). NaN and
            infinities are ignored for fitting.
        n_bins: Bins wanted per feature; features with ties or few distinct values get fewer.

    Returns:
        The fitted edges.

    Raises:
        DriftError: ``x2d`` is not 2-D, or a feature has no finite value to fit on.
        ValueError: ``n_bins`` is outside ``[1, MAX_BINS]``.
    """
    if not 1 <= n_bins <= MAX_BINS:
        raise ValueError(f"n_bins must be in [1, {MAX_BINS}], got {n_bins}")
    x = np.asarray(x2d, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 1:
        raise DriftError(f"fit_edges needs an (n, f) batch with f >= 1, got shape {x.shape}")
    finite = np.isfinite(x)
    empty = np.flatnonzero(~finite.any(axis=0))
    if empty.size:
        raise DriftError(f"features {empty[:10].tolist()} have no finite baseline value")
    ranks = np.linspace(0.0, 1.0, n_bins + 1)
    q = np.nanquantile(np.where(finite, x, np.nan), ranks, axis=0, method="inverted_cdf")
    return FeatureEdges(n_bins, tuple(_edges_from_quantiles(q[:, j]) for j in range(x.shape[1])))


def _edges_from_quantiles(q: npt.NDArray[np.float64]) -> tuple[float, ...]:
    values, hits = np.unique(q, return_counts=True)
    edges: list[float] = []
    for v, c in zip(values.tolist(), hits.tolist(), strict=True):
        edges.append(v)
        if c >= 2:  # a point mass: isolate it in [v, nextafter(v)), which holds only v
            with np.errstate(over="ignore"):  # nextafter(max float) is inf: handled below
                up = float(np.nextafter(v, np.inf))
            edges.append(up if np.isfinite(up) else float(np.nextafter(v, -np.inf)))
    # nextafter can meet the next quantile; dedup again. Each extra edge is paid for by a
    # collapsed quantile, so there are never more than n_bins + 1 edges.
    return tuple(np.unique(np.asarray(edges, dtype=np.float64)).tolist())
