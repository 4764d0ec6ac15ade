"""The packed views' batch readers give exactly what the one-at-a-time readers give.

``Reader.uvarints`` and ``Reader.floats`` (numpy and inline fast paths, used by
``unpack_view`` for a view's counts and moments) are checked against ``k`` calls of
``uvarint``/``float`` on the same bytes, property-based: the same values and final position, or
the same failure (a ``ContractError`` at the same position). The edge-section cache of
``unpack_view`` is checked to give the same views as decoding from scratch and never to reuse a
section whose bytes differ.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.drift import FeatureEdges, TierAView
from edge_agent.errors import ContractError
from edge_agent.wire.compact import pack_view, unpack_view
from edge_agent.wire.compact import views as views_module
from edge_agent.wire.compact.varint import Reader, put_float, put_uvarint

BIG = 1 << 20


def _scalar(data: bytes, k: int, read: str, hi: int | None = None) -> tuple[object, int]:
    r = Reader(data, "t")
    out: list[object] = []
    try:
        for _ in range(k):
            out.append(
                r.uvarint(hi) if read == "uvarint" and hi is not None else getattr(r, read)()
            )
    except ContractError:
        return "error", r.position
    return out, r.position


def _batch(data: bytes, k: int, read: str, hi: int | None = None) -> tuple[object, int]:
    r = Reader(data, "t")
    try:
        out = r.uvarints(k, hi) if read == "uvarint" and hi is not None else None
        if out is None:
            out = r.uvarints(k) if read == "uvarint" else r.floats(k)
    except ContractError:
        return "error", r.position
    return list(out), r.position


def _varint_bytes(values: list[int]) -> bytes:
    out = bytearray()
    for v in values:
        put_uvarint(out, v)
    return bytes(out)


_UINT = st.one_of(st.integers(0, 127), st.integers(0, 1 << 20), st.integers(0, (1 << 64) - 1))


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(_UINT, min_size=0, max_size=80),
    cut=st.integers(0, 12),
    extra=st.binary(max_size=12),
)
def test_uvarints_match_the_scalar_reader(values: list[int], cut: int, extra: bytes) -> None:
    data = _varint_bytes(values)
    data = data[: max(0, len(data) - cut)] + extra  # truncated and/or followed by garbage
    k = len(values)
    assert _batch(data, k, "uvarint") == _scalar(data, k, "uvarint")
    for hi in (100, (1 << 63) - 1):
        assert _batch(data, k, "uvarint", hi) == _scalar(data, k, "uvarint", hi)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=0, max_size=400), k=st.integers(0, 60))
def test_uvarints_match_on_arbitrary_bytes(data: bytes, k: int) -> None:
    assert _batch(data, k, "uvarint") == _scalar(data, k, "uvarint")
    assert _batch(data, k, "uvarint", (1 << 63) - 1) == _scalar(data, k, "uvarint", (1 << 63) - 1)


_FLOAT = st.one_of(
    st.integers(-(1 << 40), 1 << 40).map(float),
    st.integers(-(1 << 53) + 1, (1 << 53) - 1).map(float),
    st.floats(allow_nan=False, allow_infinity=True, width=32),
    st.floats(allow_nan=True, allow_infinity=True),
)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(_FLOAT, min_size=0, max_size=70), cut=st.integers(0, 10))
def test_floats_match_the_scalar_reader_bit_for_bit(values: list[float], cut: int) -> None:
    out = bytearray()
    for v in values:
        put_float(out, v)
    data = bytes(out[: max(0, len(out) - cut)])
    k = len(values)
    got, scalar = _batch(data, k, "float"), _scalar(data, k, "float")
    assert got[1] == scalar[1]
    if scalar[0] == "error":
        assert got[0] == "error"
        return
    assert isinstance(got[0], list)
    assert isinstance(scalar[0], list)
    pack = struct.Struct("<d").pack
    assert [pack(x) for x in got[0]] == [pack(x) for x in scalar[0]]
    if not cut:
        assert [pack(x) for x in got[0]] == [pack(x) for x in values]


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=0, max_size=400), k=st.integers(0, 60))
def test_floats_match_on_arbitrary_bytes(data: bytes, k: int) -> None:
    got, scalar = _batch(data, k, "float"), _scalar(data, k, "float")
    assert got[1] == scalar[1]
    if scalar[0] == "error":
        assert got[0] == "error"
    else:
        pack = struct.Struct("<d").pack
        assert [pack(x) for x in got[0]] == [pack(x) for x in scalar[0]]  # type: ignore[union-attr]


def _view(seed: int, f: int = 30, n_bins: int = 8) -> TierAView:
    rng = np.random.default_rng(seed)
    edges = FeatureEdges(
        n_bins, tuple(tuple(float(e) for e in range(n_bins + 1)) for _ in range(f))
    )
    counts = np.zeros((f, n_bins + 2), dtype=np.int64)
    counts[:, :] = rng.integers(0, 3000, size=(f, n_bins + 2))
    total = counts.sum(axis=1)
    return TierAView(
        edges,
        counts,
        rng.integers(0, 5, size=f).astype(np.int64),
        total.astype(np.int64),
        rng.normal(size=f) * 1e3,
        np.abs(rng.normal(size=f)) * 1e6,
    )


def test_views_decode_alike_with_and_without_the_edge_cache() -> None:
    views = [_view(s) for s in range(6)]
    packed = [pack_view(v) for v in views]
    views_module._edge_cache.clear()
    cold = [unpack_view(p, max_bytes=BIG) for p in packed]  # the first fills the cache
    warm = [unpack_view(p, max_bytes=BIG) for p in packed]
    assert cold == views
    assert warm == views


def test_a_cached_section_is_never_reused_for_other_edges() -> None:
    f, n_bins = 30, 8
    base = _view(1, f, n_bins)
    views_module._edge_cache.clear()
    assert unpack_view(pack_view(base), max_bytes=BIG) == base
    # Same shape and same first bytes, another last edge: must decode to its own edges.
    rows = list(base.edges.edges)
    rows[-1] = (*rows[-1][:-1], rows[-1][-1] + 0.5)
    other = TierAView(
        FeatureEdges(n_bins, tuple(rows)), base.counts, base.nan, base.count, base.sum, base.sumsq
    )
    assert unpack_view(pack_view(other), max_bytes=BIG) == other
    # And a section that fails validation is refused every time (never cached).
    bad = bytearray(pack_view(base))
    assert bad[3] == 9  # the first feature's edge count (n_bins + 1)
    bad[3] = 1
    for _ in range(2):
        with pytest.raises(ContractError):
            unpack_view(bytes(bad), max_bytes=BIG)
