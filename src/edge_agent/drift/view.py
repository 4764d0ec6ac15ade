"""``TierAView``: the immutable, shippable tier-A sketch of one tensor, and its wire formats.

Owns: the view value object, its exact merge, ``to_dict/from_dict`` (JSON-safe, strict) and
``to_bytes/from_bytes`` (compact, versioned), and the summaries scores will be built on
(``probabilities``, ``mean``, ``std``). Does not own: counting a batch (``tier_a``), fitting
edges (``edges``) or any score or threshold (a later module; it will use ``probabilities``).

Fields, per feature ``j`` (see ``edges`` for the bucket convention):

- ``counts[j]``: ``n_bins + 2`` int64 counts ``[underflow, bin 0, ..., overflow]``; infinities
  are counted in under/overflow, NaN in none.
- ``nan[j]``: NaN values seen.
- ``count[j]``: finite values seen, the ``n`` behind ``sum`` and ``sumsq``.
- ``sum[j]``, ``sumsq[j]``: float64 sum and sum of squares of the finite values.

Merging adds every field. Counts merge exactly; ``sum``/``sumsq`` are float64 additions and so
equal a single-pass sketch up to rounding (a few ulps relative), not bit for bit.
"""

from __future__ import annotations

import functools
import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.drift._wire import (
    MAX_BINS,
    MAX_FEATURES,
    check_keys,
    count_matrix,
    count_vector,
    float_vector,
    floats_out,
    frozen,
    get,
    read_schema_version,
    require_mapping,
)
from edge_agent.drift.edges import FeatureEdges
from edge_agent.errors import ContractError, DriftError

SCHEMA_VERSION = 1
#: Binary layout, little-endian: magic, format version, n_bins, n_features; then uint16 edge
#: counts (f), float64 edges (their sum), int64 counts (f * (n_bins + 2)), int64 nan (f),
#: int64 count (f), float64 sum (f), float64 sumsq (f).
_MAGIC = b"EFTA"
_HEADER = struct.Struct("<4sHHI")
_KEYS = ("schema_version", "edges", "counts", "nan", "count", "sum", "sumsq")


@dataclass(frozen=True, eq=False)
class TierAView:
    """Tier-A counts and moments of one tensor's features; immutable (arrays are read-only).

    Construct with ``zero``, ``TierASketch.view``, ``from_dict`` or ``from_bytes``; the
    constructor checks shapes and invariants and copies the arrays.

    Raises:
        ContractError: (from the constructor) arrays of the wrong shape or dtype, negative
            counts, a non-zero count in a bin the feature does not have, or more finite values
            than bucketed ones.
    """

    edges: FeatureEdges
    counts: npt.NDArray[np.int64]
    nan: npt.NDArray[np.int64]
    count: npt.NDArray[np.int64]
    sum: npt.NDArray[np.float64]
    sumsq: npt.NDArray[np.float64]

    def __post_init__(self) -> None:
        f, width = self.edges.n_features, self.edges.width
        for name, shape, kind in (
            ("counts", (f, width), "i"),
            ("nan", (f,), "i"),
            ("count", (f,), "i"),
            ("sum", (f,), "f"),
            ("sumsq", (f,), "f"),
        ):
            arr = np.asarray(getattr(self, name))
            if arr.shape != shape or arr.dtype.kind not in (kind, "u" if kind == "i" else kind):
                raise ContractError(f"tier-A view: field {name!r} must be {kind} of shape {shape}")
            dtype = np.int64 if kind == "i" else np.float64
            if kind == "i" and arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int64).max):
                raise ContractError(f"tier-A view: field {name!r} must be non-negative")
            object.__setattr__(self, name, frozen(arr.astype(dtype)))
        unused = np.arange(width)[None, :] > self.edges.bins_used()[:, None]
        unused[:, -1] = False
        if np.any(self.counts[unused]):
            raise ContractError("tier-A view: field 'counts' has counts in bins without edges")
        if np.any(self.count > self.counts.sum(axis=1)):
            raise ContractError("tier-A view: field 'count' exceeds the bucketed values")

    @classmethod
    def zero(cls, edges: FeatureEdges) -> TierAView:
        """The empty view for ``edges`` (the monoid's identity)."""
        f = edges.n_features
        z = np.zeros(f, dtype=np.int64)
        zf = np.zeros(f, dtype=np.float64)
        return cls(edges, np.zeros((f, edges.width), np.int64), z, z, zf, zf)

    @property
    def n_features(self) -> int:
        """Number of features."""
        return self.edges.n_features

    # Arrays make a view unhashable, like the mutable arrays it is built from.
    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TierAView):
            return NotImplemented
        return (
            self.edges == other.edges
            and np.array_equal(self.counts, other.counts)
            and np.array_equal(self.nan, other.nan)
            and np.array_equal(self.count, other.count)
            and np.array_equal(self.sum, other.sum, equal_nan=True)
            and np.array_equal(self.sumsq, other.sumsq, equal_nan=True)
        )

    def merge(self, other: TierAView) -> TierAView:
        """The view of both streams together (exact for counts).

        Raises:
            DriftError: the views have different edges.
        """
        check_same_edges(self.edges, other.edges)
        return TierAView(
            self.edges,
            self.counts + other.counts,
            self.nan + other.nan,
            self.count + other.count,
            self.sum + other.sum,
            self.sumsq + other.sumsq,
        )

    def total(self) -> npt.NDArray[np.int64]:
        """Values seen per feature: every bucket plus NaN."""
        return _total(self.counts, self.nan)

    def probabilities(self) -> npt.NDArray[np.float64]:
        """Bucket probabilities ``(f, n_bins + 2)`` incl. under/overflow, excluding NaN.

        Rows of features with no bucketed value are all NaN (no distribution to compare).
        """
        n = self.counts.sum(axis=1, keepdims=True).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.asarray(self.counts / n, dtype=np.float64)

    def mean(self) -> npt.NDArray[np.float64]:
        """Mean of the finite values per feature; NaN where there are none."""
        return _mean(self.count, self.sum)

    def std(self) -> npt.NDArray[np.float64]:
        """Population standard deviation (ddof 0) of the finite values; NaN where none."""
        return _std(self.count, self.sum, self.sumsq)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; non-finite sums are the strings ``"Infinity"``, ``"NaN"``..."""
        return {
            "schema_version": SCHEMA_VERSION,
            "edges": self.edges.to_dict(),
            "counts": self.counts.tolist(),
            "nan": self.nan.tolist(),
            "count": self.count.tolist(),
            "sum": floats_out(self.sum),
            "sumsq": floats_out(self.sumsq),
        }

    @classmethod
    def from_dict(cls, d: Any) -> TierAView:
        """Parse ``to_dict`` output strictly.

        Raises:
            ContractError: a field is missing, unknown, of the wrong type, shape or range, or
                the schema version is not supported.
        """
        d = require_mapping(d, "tier-A view")
        check_keys(d, _KEYS, "tier-A view")
        read_schema_version(d, "tier-A view", SCHEMA_VERSION)
        edges = FeatureEdges.from_dict(get(d, "edges", "tier-A view"))
        f = edges.n_features
        return cls(
            edges,
            count_matrix(get(d, "counts", "tier-A view"), "counts", f, edges.width),
            count_vector(get(d, "nan", "tier-A view"), "nan", f),
            count_vector(get(d, "count", "tier-A view"), "count", f),
            float_vector(get(d, "sum", "tier-A view"), "sum", f),
            float_vector(get(d, "sumsq", "tier-A view"), "sumsq", f),
        )

    def to_bytes(self) -> bytes:
        """Compact little-endian binary form (see ``_HEADER``); versioned by its header."""
        f = self.n_features
        lengths = np.asarray([len(r) for r in self.edges.edges], dtype="<u2")
        flat_edges = np.asarray([v for r in self.edges.edges for v in r], dtype="<f8")
        return b"".join(
            (
                _HEADER.pack(_MAGIC, SCHEMA_VERSION, self.edges.n_bins, f),
                lengths.tobytes(),
                flat_edges.tobytes(),
                self.counts.astype("<i8").tobytes(),
                self.nan.astype("<i8").tobytes(),
                self.count.astype("<i8").tobytes(),
                self.sum.astype("<f8").tobytes(),
                self.sumsq.astype("<f8").tobytes(),
            )
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> TierAView:
        """Parse ``to_bytes`` output; the length must match the header exactly.

        Raises:
            ContractError: wrong magic or version, truncated or trailing bytes, or invalid
                content (as ``from_dict`` would reject it).
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ContractError("tier-A view bytes must be bytes")
        buf = bytes(data)
        if len(buf) < _HEADER.size:
            raise ContractError("tier-A view bytes are truncated (no header)")
        magic, version, n_bins, f = _HEADER.unpack_from(buf)
        if magic != _MAGIC:
            raise ContractError("tier-A view bytes do not start with the tier-A magic")
        if version != SCHEMA_VERSION:
            raise ContractError(f"tier-A view bytes version {version} is not supported")
        if not 1 <= n_bins <= MAX_BINS or not 1 <= f <= MAX_FEATURES:
            raise ContractError(f"tier-A view bytes declare {n_bins} bins, {f} features")
        pos = _HEADER.size
        if len(buf) < pos + 2 * f:
            raise ContractError("tier-A view bytes are truncated (edge counts)")
        lengths = np.frombuffer(buf, dtype="<u2", count=f, offset=pos).astype(np.int64)
        pos += 2 * f
        n_edges = int(lengths.sum())
        expected = pos + 8 * (n_edges + f * (n_bins + 2) + 4 * f)
        if len(buf) != expected:
            raise ContractError(f"tier-A view bytes have {len(buf)} bytes, expected {expected}")
        pos += 8 * n_edges
        # Windows of one baseline share their edges: build (and validate) them once.
        edges = _edges_from(n_bins, f, buf[_HEADER.size : pos])

        def take(dtype: str, count: int) -> npt.NDArray[Any]:
            nonlocal pos
            out = np.frombuffer(buf, dtype=dtype, count=count, offset=pos)
            pos += 8 * count
            return out

        counts = take("<i8", f * (n_bins + 2)).reshape(f, n_bins + 2)
        return cls(edges, counts, take("<i8", f), take("<i8", f), take("<f8", f), take("<f8", f))


@functools.lru_cache(maxsize=256)
def _edges_from(n_bins: int, f: int, section: bytes) -> FeatureEdges:
    """``FeatureEdges`` from the edge section of ``to_bytes`` (lengths, then the edges).

    Cached by the section's bytes: ``FeatureEdges`` is immutable, so equal bytes may share one
    validated object. A section that fails validation raises every time (nothing is cached).

    Raises:
        ContractError: the edges are invalid (as ``FeatureEdges`` rejects them).
    """
    lengths = np.frombuffer(section, dtype="<u2", count=f).astype(np.int64)
    flat_edges = np.frombuffer(section, dtype="<f8", offset=2 * f)
    bounds = np.concatenate(([0], np.cumsum(lengths))).tolist()
    return FeatureEdges(
        n_bins,
        tuple(tuple(flat_edges[a:b].tolist()) for a, b in itertools.pairwise(bounds)),
    )


def _total(counts: npt.NDArray[np.int64], nan: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    return np.asarray(counts.sum(axis=-1) + nan, dtype=np.int64)


def _mean(count: npt.NDArray[np.int64], total: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(np.where(count > 0, total / count, np.nan))


def _std(
    count: npt.NDArray[np.int64], total: npt.NDArray[np.float64], sumsq: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        n = count.astype(np.float64)
        var = (sumsq - total * (total / n)) / n
        # Cancellation can push a zero variance slightly negative.
        return np.asarray(np.where(count > 0, np.sqrt(np.maximum(var, 0.0)), np.nan))


@dataclass(frozen=True, eq=False)
class TierAStack:
    """Tier-A views of ``c`` windows over the same edges, stacked for scoring them at once.

    ``counts`` is ``(c, f, n_bins + 2)``, the other arrays ``(c, f)``; row ``i`` is one view.
    ``scores.score`` takes it where it takes a view, and scores every row exactly as it would
    score that row's view alone. Not a wire format: no validation (build it with ``of`` from
    views or from exact sums of them) and no serialisation.
    """

    edges: FeatureEdges
    counts: npt.NDArray[np.int64]
    nan: npt.NDArray[np.int64]
    count: npt.NDArray[np.int64]
    sum: npt.NDArray[np.float64]
    sumsq: npt.NDArray[np.float64]

    @classmethod
    def of(cls, views: Sequence[TierAView]) -> TierAStack:
        """The views stacked in order.

        Raises:
            DriftError: a view has other edges than the first, or no view was given.
        """
        if not views:
            raise DriftError("no view to stack")
        for v in views:
            check_same_edges(v.edges, views[0].edges)
        return cls(
            views[0].edges,
            *(np.stack([getattr(v, k) for v in views]) for k in _STACKED),
        )

    def total(self) -> npt.NDArray[np.int64]:
        """``(c, f)``: values seen per row and feature, as ``TierAView.total``."""
        return _total(self.counts, self.nan)

    def mean(self) -> npt.NDArray[np.float64]:
        """``(c, f)``: as ``TierAView.mean``."""
        return _mean(self.count, self.sum)

    def std(self) -> npt.NDArray[np.float64]:
        """``(c, f)``: as ``TierAView.std``."""
        return _std(self.count, self.sum, self.sumsq)


_STACKED = ("counts", "nan", "count", "sum", "sumsq")


def check_same_edges(a: FeatureEdges, b: FeatureEdges) -> None:
    """Sketches combine only over identical edges.

    Raises:
        DriftError: the edges (or bin counts, or feature counts) differ.
    """
    if a is b or a == b:
        return
    if a.n_features != b.n_features:
        raise DriftError(f"sketches have {a.n_features} and {b.n_features} features")
    raise DriftError("sketches have different bin edges; they come from different baselines")
