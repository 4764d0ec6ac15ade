"""Tier A: the tracker's fast paths give bit-identical counts and moments to the plain algorithm.

``reference_update`` is the original single-path ``TierASketch.update`` (compare against the
tiled thresholds, sum the comparisons, route NaN apart, one ``bincount``; moments from the
column sums and an ``einsum``), kept here verbatim as the oracle. Random batches of 1 to 300
rows with NaN, infinities, values on and next to every edge, huge values that overflow the
moments, integer and float32 dtypes go through both; every field must match bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.drift import FeatureEdges, TierASketch, fit_edges


@dataclass
class Reference:
    """The plain algorithm's state: one int64 table with the NaN column last, and moments."""

    edges: FeatureEdges
    table: npt.NDArray[np.int64] = field(init=False)
    count: npt.NDArray[np.int64] = field(init=False)
    sum: npt.NDArray[np.float64] = field(init=False)
    sumsq: npt.NDArray[np.float64] = field(init=False)

    def __post_init__(self) -> None:
        f = self.edges.n_features
        self.table = np.zeros((f, self.edges.width + 1), dtype=np.int64)
        self.count = np.zeros(f, dtype=np.int64)
        self.sum = np.zeros(f, dtype=np.float64)
        self.sumsq = np.zeros(f, dtype=np.float64)


def reference_update(ref: Reference, batch: np.ndarray) -> None:
    """The original ``TierASketch.update``, one path for every batch size."""
    edges = ref.edges
    f, k = edges.n_features, edges.n_bins + 1
    chunk = min(128, max(1, (1 << 15) // (k * f)))
    tiled = np.ascontiguousarray(np.broadcast_to(edges.thresholds.T[:, None, :], (k, chunk, f)))
    col_dtype = np.uint8 if k < 256 else np.uint16
    offsets = (np.arange(f, dtype=np.intp) * (edges.width + 1))[None, :]
    x = np.asarray(batch)
    if x.shape[0] == 0:
        return
    with np.errstate(over="ignore", invalid="ignore"):
        if x.dtype != np.float64:
            x = x.astype(np.float64)
        total = x.sum(axis=0)
        all_finite = bool(np.isfinite(total).all())
        for start in range(0, x.shape[0], chunk):
            part = x[start : start + chunk]
            passed = part[None, :, :] >= tiled[:, : part.shape[0], :]
            col = np.add.reduce(passed.view(np.uint8), axis=0, dtype=col_dtype)
            idx = col + offsets
            if not all_finite:
                idx += np.isnan(part) * edges.width
            flat = ref.table.reshape(-1)
            flat += np.bincount(idx.ravel(), minlength=flat.size)
        if all_finite:
            ref.count += x.shape[0]
            ref.sum += total
            ref.sumsq += np.einsum("ij,ij->j", x, x)
        else:
            finite = np.isfinite(x)
            xf = np.where(finite, x, 0.0)
            ref.count += finite.sum(axis=0)
            ref.sum += xf.sum(axis=0)
            ref.sumsq += np.einsum("ij,ij->j", xf, xf)


def assert_same(sketch: TierASketch, ref: Reference) -> None:
    view = sketch.view()
    w = ref.edges.width
    np.testing.assert_array_equal(view.counts, ref.table[:, :w])
    np.testing.assert_array_equal(view.nan, ref.table[:, w])
    np.testing.assert_array_equal(view.count, ref.count)
    # Bit patterns, so -0.0 against 0.0 or one NaN payload against another would show.
    assert view.sum.tobytes() == ref.sum.tobytes()
    assert view.sumsq.tobytes() == ref.sumsq.tobytes()


def _edges(seed: int, f: int, n_bins: int) -> FeatureEdges:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(400, f)) * rng.uniform(0.1, 100.0, size=f)
    base[:, ::3] = np.round(base[:, ::3])  # point masses and repeated edges
    return fit_edges(base, n_bins=n_bins)


@st.composite
def edges_and_batches(draw: st.DrawFn) -> tuple[FeatureEdges, list[np.ndarray]]:
    f = draw(st.sampled_from([1, 3, 16, 64]))
    n_bins = draw(st.sampled_from([1, 4, 10, 300]))
    edges = _edges(draw(st.integers(0, 2**32 - 1)), f, n_bins)
    flat_edges = np.concatenate([np.asarray(r) for r in edges.edges])
    pool = np.concatenate(
        [
            flat_edges,
            np.nextafter(flat_edges, np.inf),
            np.nextafter(flat_edges, -np.inf),
            [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e200, -1e200, 1.7e308, 5e-324],
        ]
    )
    batches = []
    for _ in range(draw(st.integers(1, 3))):
        n = draw(st.sampled_from([1, 1, 2, 7, 64, 129, 300]))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        x = rng.normal(size=(n, f)) * 10
        take = rng.random((n, f)) < draw(st.sampled_from([0.0, 0.05, 0.5, 1.0]))
        x[take] = rng.choice(pool, size=int(take.sum()))
        dtype = draw(st.sampled_from(["float64", "float64", "float32", "int64", "int8", "uint16"]))
        if dtype.startswith(("int", "uint")):
            x = np.nan_to_num(np.clip(x, -100, 100), nan=0.0)
            if dtype.startswith("u"):
                x = np.abs(x)
        elif dtype == "float32":
            with np.errstate(invalid="ignore"):
                x = np.where(np.abs(x) > 1e38, np.sign(x) * np.inf, x)
        batch = x.astype(dtype)
        if draw(st.booleans()) and f > 1:  # a strided, non-contiguous batch
            batch = np.repeat(batch, 2, axis=1)[:, ::2]
        batches.append(batch)
    return edges, batches


@given(edges_and_batches())
def test_update_equals_the_reference_algorithm_bit_for_bit(
    case: tuple[FeatureEdges, list[np.ndarray]],
) -> None:
    edges, batches = case
    sketch, ref = TierASketch.zero(edges), Reference(edges)
    for batch in batches:
        sketch.update(batch)
        reference_update(ref, batch)
        assert_same(sketch, ref)


def test_one_row_updates_equal_one_batch_update() -> None:
    # Row by row (the one-row path) against the batch path, on dirty data: same counts; the
    # moments add the same terms in the same order, so they match too.
    edges = _edges(3, 16, 10)
    x = np.random.default_rng(4).normal(size=(50, 16)) * 20
    x[::7, 2] = np.nan
    x[3, :] = np.inf
    x[5, 4] = -np.inf
    rows, batch, ref = TierASketch.zero(edges), TierASketch.zero(edges), Reference(edges)
    for r in x:
        rows.update(r[None, :])
    batch.update(x)
    reference_update(ref, x)
    assert_same(batch, ref)
    assert rows.view().counts.tolist() == batch.view().counts.tolist()
    assert rows.view().nan.tolist() == batch.view().nan.tolist()
    assert rows.view().count.tolist() == batch.view().count.tolist()
    assert int(rows.view().counts.sum() + rows.view().nan.sum()) == 50 * 16


def test_one_row_with_overflowing_square_does_not_warn() -> None:
    edges = _edges(5, 3, 4)
    sketch = TierASketch.zero(edges)
    with np.errstate(all="raise"):
        sketch.update(np.array([[1e200, -1e200, np.nan]]))
        sketch.update(np.array([[1e200, 2.0, 3.0]]))
    ref = Reference(edges)
    reference_update(ref, np.array([[1e200, -1e200, np.nan]]))
    reference_update(ref, np.array([[1e200, 2.0, 3.0]]))
    assert_same(sketch, ref)
    assert np.isinf(sketch.view().sumsq[0])


def test_one_row_counts_survive_merge_and_vanish_on_reset() -> None:
    # The one-row path counts finite rows apart until a view is taken: merging such a tracker
    # into another, or resetting it, must see those rows (or forget them) all the same.
    edges = _edges(6, 4, 4)
    rows = np.random.default_rng(7).normal(size=(5, 4))
    a, b = TierASketch.zero(edges), TierASketch.zero(edges)
    for r in rows:
        a.update(r[None, :])
    b.merge(a)
    assert b.view().count.tolist() == [5, 5, 5, 5]
    assert a.view() == b.view()
    a.update(rows[:1])
    a.reset()
    assert a.view() == TierASketch.zero(edges).view()
    a.update(rows[:1])
    assert a.view().count.tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("f", [4096, 4097])
def test_one_row_of_many_features_equals_the_reference(f: int) -> None:
    # Rows longer than 4,096 values check finiteness with einsum instead of vdot.
    edges = _edges(8, f, 4)
    rng = np.random.default_rng(9)
    sketch, ref = TierASketch.zero(edges), Reference(edges)
    clean = rng.normal(size=(1, f))
    dirty = rng.normal(size=(1, f))
    dirty[0, ::5] = np.nan
    dirty[0, 1] = np.inf
    huge = rng.normal(size=(1, f)) * 1e200
    with np.errstate(all="raise"):
        for row in (clean, dirty, huge):
            sketch.update(row)
            reference_update(ref, row)
            assert_same(sketch, ref)
    assert sketch.view().nan.sum() == len(range(0, f, 5))


@pytest.mark.parametrize("rows", [2, 64, 65, 300])  # 64 x 64 = 4,096 values: vdot up to there
def test_batches_with_huge_and_non_finite_values_do_not_warn(rows: int) -> None:
    edges = _edges(10, 64, 10)
    x = np.random.default_rng(11).normal(size=(rows, 64))
    x[0, :3] = [1e200, 1.7e308, -1.7e308]
    x[1, 3:6] = [np.nan, np.inf, -np.inf]
    x[-1, 0] = 1.7e308  # the column sum overflows
    sketch, ref = TierASketch.zero(edges), Reference(edges)
    with np.errstate(all="raise"):
        for batch in (x, x[2:], np.abs(x[:, :1]) @ np.ones((1, 64)) * 0.5):
            sketch.update(batch)
            reference_update(ref, batch)
            assert_same(sketch, ref)
    assert sketch.view().nan[3] == 1


def test_moments_that_overflow_across_updates_do_not_warn() -> None:
    # Each update alone is finite; the running sum and sum of squares overflow only when
    # accumulated, on the one-row and on the batch path alike, then keep counting exactly.
    edges = _edges(12, 2, 4)
    sketch, ref = TierASketch.zero(edges), Reference(edges)
    big = np.array([[1.7e308, 1e154]])
    with np.errstate(all="raise"):
        for batch in (big, big, np.vstack([big, big]), np.array([[1.0, 2.0]]), big[:, ::-1]):
            sketch.update(batch)
            reference_update(ref, batch)
            assert_same(sketch, ref)
    assert np.isinf(sketch.view().sum[0])
    assert np.isinf(sketch.view().sumsq[1])
    sketch.reset()
    sketch.update(np.array([[1.0, 2.0]]))
    assert sketch.view().sum.tolist() == [1.0, 2.0]
