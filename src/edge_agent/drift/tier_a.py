"""``TierASketch``: the mutable tier-A tracker that counts batches on the request hot path.

Owns: vectorised binning of an ``(n, f)`` batch into preallocated counters, merging, and
snapshots as ``TierAView``. Does not own: the bucket convention (``edges``), the wire formats
(``view``) or flattening tensors (``features``). The builder fills the baseline with this same
class, so baseline and device counts are computed by identical code.

One ``update`` is a handful of numpy calls whatever ``f`` (and, for up to 128 rows at 16
features or 93 at 64, whatever ``n``; larger batches take one step per chunk of rows): compare
the batch against the thresholds, pre-tiled ``(n_bins + 1, rows, f)`` so numpy's inner loop is
long, sum the comparisons into a bucket column, route NaN to an extra column, offset by feature
and count everything with a single ``np.bincount``. Batches without NaN/Inf skip the masking
work. No Python loop runs over rows or features.

A one-row batch takes a shorter path: its flat indices are distinct (one bucket per feature),
so a fancy-indexed ``+= 1`` replaces the tiling and the whole-table ``bincount``. For a row
and for batches of up to 4,096 values one ``np.vdot`` decides the all-finite case, and a
running bound on the moments lets them be added without an ``errstate`` block while no
addition can overflow. Every path gives the counts and moments of the plain algorithm bit for
bit (``tests/property/test_property_tier_a.py``); ``bench/bench_sketch.py`` measures them.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from edge_agent.drift.edges import FeatureEdges
from edge_agent.drift.view import TierAView, check_same_edges
from edge_agent.errors import DriftError

_TILE_VALUES = 1 << 16
_MAX_CHUNK_ROWS = 128
_GROUP_VALUES = 1 << 16
# np.vdot decides "all finite" in one call up to this many values; OpenBLAS computes a dot
# product on one thread up to 10,000 values and spreads longer ones over threads.
_VDOT_MAX_VALUES = 4096
# Moments whose bound stays below this cannot overflow float64 (max ~1.8e308) when added to.
_SAFE_MOMENTS = 1e300


class TierASketch:
    """Accumulates tier-A counts for one tensor. Not thread-safe; one per tensor and window.

    Internally one int64 ``(f, n_bins + 3)`` table holds the ``n_bins + 2`` bucket columns and,
    last, the NaN column, so a single ``bincount`` fills both.
    """

    __slots__ = (
        "_bound",
        "_chunk",
        "_col_dtype",
        "_count",
        "_edges",
        "_finite_rows",
        "_group",
        "_nan_col",
        "_offsets",
        "_row_offsets",
        "_sum",
        "_sumsq",
        "_table",
        "_table_flat",
        "_thresholds_t",
        "_tiled",
    )

    def __init__(self, edges: FeatureEdges) -> None:
        """An empty tracker for ``edges``; prefer ``TierASketch.zero``."""
        f = edges.n_features
        self._edges = edges
        k = edges.n_bins + 1
        # Rows binned per step: bounds the tiled thresholds (and each comparison) to about
        # _TILE_VALUES values (512 KiB) while covering a typical device batch in few steps:
        # each step costs more than its share (bench/bench_sketch.py: 2**16 against 2**15 is
        # 1.3x faster at 64 features, 64 and 256 rows; 2**17 gained nothing more).
        self._chunk = min(_MAX_CHUNK_ROWS, max(1, _TILE_VALUES // (k * f)))
        self._tiled = np.ascontiguousarray(
            np.broadcast_to(edges.thresholds.T[:, None, :], (k, self._chunk, f))
        )
        # Rows counted per bincount: bounds its intp index array to about _GROUP_VALUES values.
        self._group = max(self._chunk, _GROUP_VALUES // f)
        self._col_dtype = np.uint8 if k < 256 else np.uint16
        self._nan_col = edges.width
        self._offsets = (np.arange(f, dtype=np.intp) * (edges.width + 1))[None, :]
        self._row_offsets = self._offsets[0]
        self._thresholds_t = np.ascontiguousarray(edges.thresholds.T)
        self._table = np.zeros((f, edges.width + 1), dtype=np.int64)
        self._table_flat = self._table.reshape(-1)
        self._count = np.zeros(f, dtype=np.int64)
        self._finite_rows = 0
        # Upper bound on every |sum| and sumsq so far; see _add_moments.
        self._bound = 0.0
        self._sum = np.zeros(f, dtype=np.float64)
        self._sumsq = np.zeros(f, dtype=np.float64)

    @classmethod
    def zero(cls, edges: FeatureEdges) -> TierASketch:
        """An empty tracker for ``edges``."""
        return cls(edges)

    @classmethod
    def from_view(cls, view: TierAView) -> TierASketch:
        """A tracker that continues from ``view`` (e.g. a window restored after a restart)."""
        out = cls(view.edges)
        out.merge(view)
        return out

    @property
    def edges(self) -> FeatureEdges:
        """The edges this tracker bins with."""
        return self._edges

    @property
    def n_features(self) -> int:
        """Features per sample this tracker expects."""
        return self._edges.n_features

    def update(self, batch2d: npt.ArrayLike) -> None:
        """Count a batch of feature rows.

        NaN is counted in ``nan`` only. ``-inf``/``+inf`` are counted in under/overflow and
        excluded from ``count``, ``sum`` and ``sumsq`` (which cover finite values). An empty
        batch is a no-op.

        Args:
            batch2d: Shape ``(n, f)`` with ``f == n_features`` (``flatten_features`` output);
                any real dtype, compared in float64.

        Raises:
            DriftError: the batch is not 2-D, has the wrong feature count or a non-real dtype.
        """
        x = np.asarray(batch2d)
        if x.ndim != 2 or x.shape[1] != self._edges.n_features:
            raise DriftError(
                f"expected a batch of shape (n, {self._edges.n_features}), got {x.shape}"
            )
        if x.dtype.kind not in "biuf":
            raise DriftError(f"drift needs real numeric values, got dtype {x.dtype}")
        if x.shape[0] == 0:
            return
        if x.dtype != np.float64:
            if x.dtype.itemsize > 8:  # long double: a value past float64's range becomes inf
                with np.errstate(over="ignore"):
                    x = x.astype(np.float64)
            else:
                x = x.astype(np.float64)  # exact for every real dtype up to 64 bits; never warns
        if x.shape[0] == 1:
            self._update_row(x[0])
            return
        # The common batch holds only finite values: then no NaN routing, no mask, no errstate.
        # A small batch proves it with one vdot (as _update_row does; a finite sum of squares
        # also means no column sum can overflow), a large one with its column sums (a finite
        # sum proves the column holds no NaN/Inf, as they propagate). A sum that overflowed
        # only sends the batch down the careful path, which is exact either way.
        total: npt.NDArray[np.float64] | None
        grow = math.inf
        if x.size <= _VDOT_MAX_VALUES:
            squares = float(np.vdot(x, x))
            total = x.sum(axis=0) if math.isfinite(squares) else None
            grow = x.shape[0] + squares  # |x| <= 1 + x * x
        else:
            # inf - inf and overflowing sums are expected on bad input: counted, not warned.
            with np.errstate(over="ignore", invalid="ignore"):
                total = x.sum(axis=0)
            if not np.isfinite(total).all():
                total = None
        if total is not None:
            for start in range(0, x.shape[0], self._group):
                self._bin(x[start : start + self._group], True)
            self._count += x.shape[0]
            # einsum raises no overflow warning; after a vdot, the growth is bounded by it.
            self._add_moments(total, np.einsum("ij,ij->j", x, x), grow)
            return
        with np.errstate(over="ignore", invalid="ignore"):
            for start in range(0, x.shape[0], self._group):
                self._bin(x[start : start + self._group], False)
            finite = np.isfinite(x)
            xf = np.where(finite, x, 0.0)
            self._count += finite.sum(axis=0)
            self._add_moments(xf.sum(axis=0), np.einsum("ij,ij->j", xf, xf), math.inf)

    def _update_row(self, row: npt.NDArray[np.float64]) -> None:
        # One row: every feature lands in one bucket of its own table row, so the flat indices
        # are distinct and a fancy-indexed += 1 counts them exactly, without tiling the
        # thresholds or bincounting the whole table. The moments add the same terms as the
        # batch path (a one-row column sum is the row, its einsum the row squared).
        idx = np.add.reduce(row >= self._thresholds_t, axis=0, dtype=np.intp)
        idx += self._row_offsets
        # A finite sum of squares proves every value finite and no square overflowing (NaN
        # and inf propagate; the terms are non-negative), so the common case needs neither an
        # isfinite mask nor an errstate block. np.vdot (unlike np.dot) and einsum raise no
        # floating-point warnings (test_one_row_with_overflowing_square_does_not_warn pins
        # it); vdot is the cheaper but goes to BLAS, which may spread long vectors over
        # threads on the request path, so long rows take einsum's own loop.
        if row.shape[0] <= _VDOT_MAX_VALUES:
            squares = float(np.vdot(row, row))
        else:
            squares = float(np.einsum("i,i", row, row))
        if math.isfinite(squares):
            self._table_flat[idx] += 1
            self._finite_rows += 1  # folded into _count by view(); saves an array op per row
            self._add_moments(row, row * row, 1.0 + squares)
            return
        # NaN passes no threshold (column 0); move it to the NaN column.
        idx += np.isnan(row) * self._nan_col
        self._table_flat[idx] += 1
        finite = np.isfinite(row)
        xf = np.where(finite, row, 0.0)
        self._count += finite
        with np.errstate(over="ignore"):
            squared = xf * xf
        self._add_moments(xf, squared, math.inf)

    def _add_moments(
        self, total: npt.NDArray[np.float64], squares: npt.NDArray[np.float64], grow: float
    ) -> None:
        # Add column sums and sums of squares. ``grow`` bounds how much any |sum| or sumsq can
        # grow (inf when unknown); while the running bound stays far from the float64 range,
        # no addition can overflow and the errstate block is skipped.
        bound = self._bound + grow
        if bound < _SAFE_MOMENTS:
            self._bound = bound
            self._sum += total
            self._sumsq += squares
            return
        # Overflowing moments are expected on bad input: counted as inf, not warned.
        with np.errstate(over="ignore", invalid="ignore"):
            self._sum += total
            self._sumsq += squares
            self._bound = float(np.abs(self._sum).max() + self._sumsq.max())

    def _bin(self, x: npt.NDArray[np.float64], all_finite: bool) -> None:
        # Compare against thresholds laid out (k, rows, f) so numpy's inner loop runs over the
        # contiguous rows*f values, then sum the k planes: the bucket column per value. The
        # comparison goes in steps of _chunk rows (bounded tile); offsetting, NaN routing and
        # the bincount run once for the whole group, which is cheaper than once per step.
        n = x.shape[0]
        if n <= self._chunk:
            passed = x[None, :, :] >= self._tiled[:, :n, :]
            col = np.add.reduce(passed.view(np.uint8), axis=0, dtype=self._col_dtype)
        else:
            col = np.empty(x.shape, dtype=self._col_dtype)
            for start in range(0, n, self._chunk):
                part = x[start : start + self._chunk]
                passed = part[None, :, :] >= self._tiled[:, : part.shape[0], :]
                np.add.reduce(
                    passed.view(np.uint8),
                    axis=0,
                    dtype=self._col_dtype,
                    out=col[start : start + self._chunk],
                )
        idx = col + self._offsets
        if not all_finite:
            # NaN passes no threshold (column 0); move it to the NaN column.
            idx += np.isnan(x) * self._nan_col
        self._table_flat += np.bincount(idx.ravel(), minlength=self._table_flat.size)

    def merge(self, other: TierASketch | TierAView) -> None:
        """Add another tracker's or view's counts into this one (exact for counts).

        Raises:
            DriftError: the edges differ.
        """
        check_same_edges(self._edges, other.edges)
        view = other.view() if isinstance(other, TierASketch) else other
        self._table[:, : self._nan_col] += view.counts
        self._table[:, self._nan_col] += view.nan
        self._count += view.count
        self._sum += view.sum
        self._sumsq += view.sumsq
        with np.errstate(over="ignore", invalid="ignore"):
            self._bound = float(np.abs(self._sum).max() + self._sumsq.max())

    def reset(self) -> None:
        """Forget everything counted (start a new window) without reallocating."""
        self._table.fill(0)
        self._count.fill(0)
        self._finite_rows = 0
        self._bound = 0.0
        self._sum.fill(0.0)
        self._sumsq.fill(0.0)

    def view(self) -> TierAView:
        """An immutable snapshot; later updates do not change it."""
        if self._finite_rows:
            self._count += self._finite_rows
            self._finite_rows = 0
        return TierAView(
            self._edges,
            self._table[:, : self._nan_col],
            self._table[:, self._nan_col],
            self._count,
            self._sum,
            self._sumsq,
        )
