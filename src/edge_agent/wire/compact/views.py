"""The packed form of a tier-A drift view: what a drift window's ``view`` costs on a link.

Owns ``pack_view`` and ``unpack_view``. ``TierAView.to_bytes`` (``EFTA``) spends eight bytes
on every bucket count, including the buckets a feature does not have, and on every edge; the
counts are small integers over fixed edges and most edges are integers or point masses. The
packed form is lossless: ``unpack_view(pack_view(v)) == v`` bit for bit (counts exactly, so
views still merge exactly; edges and float64 moments to the bit, NaN payloads included), so
``to_bytes`` of the unpacked view is the ``EFTA`` bytes the JSON form carries.

Layout (varints are unsigned LEB128, floats are ``varint.put_float`` codes)::

    u8 version (1)
    varint n_bins, varint f
    per feature: varint m (edges, 2..n_bins+1), m float codes (each after the previous edge)
    per feature: the m + 1 used bucket counts (underflow, m - 1 bins, overflow), varints
    per feature: varint nan, varint (bucketed - count)
    per feature: float code sum, float code sumsq

Counts in buckets a feature does not have are zero by the view's invariant and are not sent.

``unpack_view`` is bounded: before it allocates the ``f x (n_bins + 2)`` count matrix it checks
that the view's ``EFTA`` form stays within ``max_bytes`` and that the input has at least one
byte for every feature and count it declares; every failure is a ``ContractError``. Does not
own the tier-A maths (``edge_agent.drift.view``) or the message around the views
(``edge_agent.wire.compact.message``).
"""

from __future__ import annotations

import functools
from typing import Final

import numpy as np
import numpy.typing as npt

from edge_agent.drift import FeatureEdges, TierAView
from edge_agent.drift._wire import MAX_BINS, MAX_FEATURES
from edge_agent.errors import ContractError, DriftError
from edge_agent.wire.compact.varint import Reader, put_float, put_uvarint

__all__ = ["VIEW_FORMAT", "efta_size", "pack_view", "unpack_view"]

#: The packed view's version byte.
VIEW_FORMAT: Final = 1
_INT64_MAX: Final = (1 << 63) - 1
#: Edge sections remembered by ``_read_edges`` (the windows of one baseline share theirs).
_EDGE_CACHE_SIZE: Final = 256
_EDGE_KEY_BYTES: Final = 64
# (n_bins, f, the section's first bytes) -> (the whole section, its validated edges, edge count)
_edge_cache: dict[tuple[int, int, bytes], tuple[bytes, FeatureEdges, int]] = {}


def efta_size(n_bins: int, f: int, n_edges: int) -> int:
    """Bytes of ``TierAView.to_bytes`` for a view of that shape (header 12 bytes)."""
    return 12 + 2 * f + 8 * (n_edges + f * (n_bins + 2) + 4 * f)


def pack_view(view: TierAView) -> bytes:
    """The packed form of ``view`` (see the module docstring)."""
    out = bytearray((VIEW_FORMAT,))
    edges = view.edges
    put_uvarint(out, edges.n_bins)
    put_uvarint(out, edges.n_features)
    for row in edges.edges:
        put_uvarint(out, len(row))
        prev: float | None = None
        for e in row:
            put_float(out, e, prev)
            prev = e
    counts = view.counts.tolist()
    for row, m in zip(counts, (len(r) for r in edges.edges), strict=True):
        for c in (*row[:m], row[-1]):
            put_uvarint(out, c)
    bucketed = view.counts.sum(axis=1).tolist()
    for nan, count, total in zip(view.nan.tolist(), view.count.tolist(), bucketed, strict=True):
        put_uvarint(out, nan)
        put_uvarint(out, total - count)
    for s, sq in zip(view.sum.tolist(), view.sumsq.tolist(), strict=True):
        put_float(out, s)
        put_float(out, sq)
    return bytes(out)


def unpack_view(data: bytes, *, max_bytes: int) -> TierAView:
    """Parse ``pack_view`` output strictly.

    Args:
        data: the packed view, nothing before or after it.
        max_bytes: the largest ``EFTA`` form accepted (bounds what the view allocates).

    Raises:
        ContractError: an unknown version, truncated or trailing bytes, a shape beyond the
            sketch bounds or ``max_bytes``, or a view ``TierAView`` itself refuses.
    """
    r = Reader(bytes(data), "packed tier-A view")
    version = r.uvarint()
    if version != VIEW_FORMAT:
        raise r.fail(f"version {version} is not supported")
    n_bins = r.uvarint(MAX_BINS)
    f = r.uvarint(MAX_FEATURES)
    if n_bins < 1 or f < 1:
        raise r.fail("a view needs at least one bin and one feature")
    # Every feature costs at least 2 edges, 3 counts and 4 moment bytes in the input, and at
    # least efta_size(n_bins, f, 2f) in memory: refuse before reading or allocating.
    if 9 * f > r.remaining or efta_size(n_bins, f, 2 * f) > max_bytes:
        raise r.fail(f"{f} features of {n_bins} bins exceed the input or {max_bytes} bytes")
    edges, n_edges = _read_edges(r, n_bins, f)
    if efta_size(n_bins, f, n_edges) > max_bytes:
        raise r.fail(f"the view's EFTA form exceeds {max_bytes} bytes")
    used = np.array(r.uvarints(n_edges + f, _INT64_MAX), dtype=np.int64)
    counts = np.zeros((f, n_bins + 2), dtype=np.int64)
    counts[_count_cells(n_bins, tuple(len(row) for row in edges.edges))] = used
    bucketed = counts.sum(axis=1, dtype=np.uint64)
    if np.any(bucketed > _INT64_MAX):
        raise r.fail("bucket counts overflow 64 bits")
    pairs = np.array(r.uvarints(2 * f, _INT64_MAX), dtype=np.int64)  # (nan, missing) each
    nan, missing = pairs[0::2].copy(), pairs[1::2].astype(np.uint64)
    if np.any(missing > bucketed):
        raise r.fail("more infinite values than bucketed ones")
    count = (bucketed - missing).astype(np.int64)
    moments = np.array(r.floats(2 * f), dtype=np.float64)  # (sum, sumsq) per feature
    sums, sumsq = moments[0::2].copy(), moments[1::2].copy()
    if r.remaining:
        raise r.fail(f"{r.remaining} trailing bytes")
    try:
        return TierAView(edges, counts, nan, count, sums, sumsq)
    except (ContractError, DriftError) as exc:
        raise r.fail(f"invalid view: {exc}") from exc


def _read_edges(r: Reader, n_bins: int, f: int) -> tuple[FeatureEdges, int]:
    """The edge section of a view: validated ``FeatureEdges`` and the number of edges.

    Every window of one tensor of one baseline carries the same section, on every device, so
    a section seen before (the same bytes: they decode to the same edges) is skipped and its
    validated edges reused; anything else is decoded and validated here.

    Raises:
        ContractError: truncated, fewer than 2 or more than ``n_bins + 1`` edges in a row, or
            edges ``FeatureEdges`` refuses.
    """
    key = (n_bins, f, r.peek(_EDGE_KEY_BYTES))
    hit = _edge_cache.get(key)
    if hit is not None and r.startswith(hit[0]):
        r.skip(len(hit[0]))
        return hit[1], hit[2]
    start = r.position
    rows: list[tuple[float, ...]] = []
    n_edges = 0
    for _ in range(f):
        m = r.uvarint(n_bins + 1)
        if m < 2:
            raise r.fail("a feature needs at least 2 edges")
        n_edges += m
        row: list[float] = []
        prev: float | None = None
        for _ in range(m):
            prev = r.float(prev)
            row.append(prev)
        rows.append(tuple(row))
    try:
        edges = FeatureEdges(n_bins, tuple(rows))
    except (ContractError, DriftError) as exc:
        raise r.fail(f"invalid edges: {exc}") from exc
    if len(_edge_cache) >= _EDGE_CACHE_SIZE:
        _edge_cache.clear()
    _edge_cache[key] = (r.consumed_since(start), edges, n_edges)
    return edges, n_edges


@functools.lru_cache(maxsize=_EDGE_CACHE_SIZE)
def _count_cells(
    n_bins: int, lengths: tuple[int, ...]
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Row and column of each count the packed form sends, in its order (see the layout)."""
    rows: list[int] = []
    cols: list[int] = []
    for j, m in enumerate(lengths):
        rows.extend([j] * (m + 1))
        cols.extend([*range(m), n_bins + 1])
    return np.array(rows, dtype=np.intp), np.array(cols, dtype=np.intp)
