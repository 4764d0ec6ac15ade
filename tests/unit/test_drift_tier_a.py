"""Tier A: counting against brute force, NaN/Inf accounting, exact merge, wire formats."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from edge_agent.drift import FeatureEdges, TierASketch, TierAView, fit_edges
from edge_agent.errors import ContractError, DriftError

# --- helpers ---------------------------------------------------------------------------------


def brute_force_counts(edges: FeatureEdges, x: np.ndarray) -> np.ndarray:
    """Counts by the documented convention, via numpy.histogram (last bin closed)."""
    out = np.zeros((edges.n_features, edges.width), dtype=np.int64)
    for j, row in enumerate(edges.edges):
        e = np.asarray(row)
        col = x[:, j][~np.isnan(x[:, j])]
        inside = col[(col >= e[0]) & (col <= e[-1])]
        out[j, 0] = np.count_nonzero(col < e[0])
        out[j, 1 : len(e)] = np.histogram(inside, bins=e)[0]
        out[j, -1] = np.count_nonzero(col > e[-1])
    return out


def dataset(kind: str, n: int, f: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.normal(size=(n, f))
    if kind == "discrete":
        return rng.integers(0, 5, size=(n, f)).astype(np.float64)
    if kind == "sparse":  # digit-like: mostly exact zeros
        return np.where(rng.random((n, f)) < 0.85, 0.0, rng.random((n, f)))
    if kind == "dirty":  # finite values plus NaN and infinities
        x = rng.normal(size=(n, f)) * 3
        mask = rng.random((n, f))
        x[mask < 0.05] = np.nan
        x[(mask >= 0.05) & (mask < 0.08)] = np.inf
        x[(mask >= 0.08) & (mask < 0.10)] = -np.inf
        return x
    raise AssertionError(kind)


KINDS = ["normal", "discrete", "sparse", "dirty"]


@pytest.fixture
def edges16() -> FeatureEdges:
    return fit_edges(dataset("normal", 2000, 16, 0), n_bins=10)


# --- counting --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_bins", [1, 4, 10])
def test_counts_equal_brute_force_histogram(kind: str, n_bins: int) -> None:
    base = dataset(kind, 500, 8, 1)
    edges = fit_edges(np.where(np.isfinite(base), base, 0.0), n_bins=n_bins)
    live = dataset(kind, 300, 8, 2) * 1.3 + 0.2  # shifted: exercises under/overflow
    sketch = TierASketch.zero(edges)
    sketch.update(live)
    view = sketch.view()
    np.testing.assert_array_equal(view.counts, brute_force_counts(edges, live))
    np.testing.assert_array_equal(view.nan, np.isnan(live).sum(axis=0))
    np.testing.assert_array_equal(view.total(), np.full(8, 300))


def test_nan_and_inf_accounting() -> None:
    edges = FeatureEdges(2, ((0.0, 1.0, 2.0), (0.0, 1.0, 2.0)))
    x = np.array(
        [[np.nan, 0.5], [np.inf, 1.5], [-np.inf, 0.5], [0.5, np.nan], [1.5, 0.5], [np.nan, 3.0]]
    )
    sketch = TierASketch.zero(edges)
    sketch.update(x)
    view = sketch.view()
    assert view.nan.tolist() == [2, 1]
    assert view.counts.tolist() == [[1, 1, 1, 1], [0, 3, 1, 1]]
    assert view.count.tolist() == [2, 5]  # finite values only
    np.testing.assert_allclose(view.sum, [2.0, 6.0])
    np.testing.assert_allclose(view.sumsq, [0.25 + 2.25, 0.25 + 2.25 + 0.25 + 0.25 + 9.0])
    np.testing.assert_allclose(view.mean(), [1.0, 1.2])


@pytest.mark.parametrize("kind", KINDS)
def test_moments_match_numpy_on_finite_values(kind: str) -> None:
    x = dataset(kind, 400, 5, 7)
    sketch = TierASketch.zero(fit_edges(np.where(np.isfinite(x), x, 0.0), 10))
    sketch.update(x)
    view = sketch.view()
    finite = np.where(np.isfinite(x), x, np.nan)
    np.testing.assert_array_equal(view.count, np.isfinite(x).sum(axis=0))
    np.testing.assert_allclose(view.sum, np.nansum(finite, axis=0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(view.mean(), np.nanmean(finite, axis=0), rtol=1e-10)
    np.testing.assert_allclose(view.std(), np.nanstd(finite, axis=0), rtol=1e-8)


def test_float32_int_and_float64_batches_count_alike(edges16: FeatureEdges) -> None:
    x = np.random.default_rng(4).integers(-3, 4, size=(64, 16))
    views = []
    for dtype in (np.int32, np.float32, np.float64):
        sketch = TierASketch.zero(edges16)
        sketch.update(x.astype(dtype))
        views.append(sketch.view())
    assert views[0] == views[1] == views[2]


def test_batches_larger_than_one_chunk_count_every_row() -> None:
    # 256 features x 11 thresholds: the tracker bins 23 rows per step.
    base = dataset("normal", 300, 256, 5)
    edges = fit_edges(base, 10)
    live = dataset("dirty", 1000, 256, 6)
    sketch = TierASketch.zero(edges)
    sketch.update(live)
    np.testing.assert_array_equal(sketch.view().counts, brute_force_counts(edges, live))


def test_many_bins_count_past_a_byte() -> None:
    # 600 thresholds per feature: bucket columns above 255 must not wrap around.
    base = dataset("normal", 5000, 3, 8)
    edges = fit_edges(base, 599)
    live = dataset("dirty", 2000, 3, 9)
    sketch = TierASketch.zero(edges)
    sketch.update(live)
    np.testing.assert_array_equal(sketch.view().counts, brute_force_counts(edges, live))
    assert sketch.view().counts[:, 300:].sum() > 0


def test_non_contiguous_batches(edges16: FeatureEdges) -> None:
    x = dataset("dirty", 64, 32, 9)[:, ::2]
    a, b = TierASketch.zero(edges16), TierASketch.zero(edges16)
    a.update(x)
    b.update(np.ascontiguousarray(x))
    assert a.view() == b.view()


def test_empty_batch_is_a_no_op(edges16: FeatureEdges) -> None:
    sketch = TierASketch.zero(edges16)
    sketch.update(np.zeros((0, 16)))
    assert sketch.view() == TierAView.zero(edges16)


@pytest.mark.parametrize(
    "batch",
    [
        np.zeros(16),
        np.zeros((4, 15)),
        np.zeros((4, 17)),
        np.zeros((2, 4, 4)),
        np.zeros((4, 16), dtype=np.complex128),
        np.full((4, 16), "x"),
    ],
)
def test_update_rejects_structural_problems(edges16: FeatureEdges, batch: np.ndarray) -> None:
    sketch = TierASketch.zero(edges16)
    with pytest.raises(DriftError):
        sketch.update(batch)
    assert sketch.view() == TierAView.zero(edges16)


def test_huge_values_overflow_moments_but_not_counts() -> None:
    edges = FeatureEdges(1, ((0.0, 1.0),))
    sketch = TierASketch.zero(edges)
    with np.errstate(over="ignore"):
        sketch.update(np.array([[1e300], [1e300], [-1e308], [-1e308]]))
    view = sketch.view()
    assert view.counts.tolist() == [[2, 0, 2]]
    assert view.count.tolist() == [4]
    assert view.sumsq[0] == np.inf
    assert TierAView.from_dict(json.loads(json.dumps(view.to_dict(), allow_nan=False))) == view
    assert TierAView.from_bytes(view.to_bytes()) == view


# --- views, snapshots, reset -----------------------------------------------------------------


def test_view_is_an_immutable_snapshot(edges16: FeatureEdges) -> None:
    sketch = TierASketch.zero(edges16)
    sketch.update(dataset("normal", 10, 16, 1))
    view = sketch.view()
    before = view.counts.copy()
    sketch.update(dataset("normal", 10, 16, 2))
    np.testing.assert_array_equal(view.counts, before)
    for name in ("counts", "nan", "count", "sum", "sumsq"):
        with pytest.raises(ValueError, match="read-only"):
            getattr(view, name)[0] = 1
    with pytest.raises(AttributeError):
        view.count = view.nan  # type: ignore[misc]


def test_reset_and_from_view(edges16: FeatureEdges) -> None:
    sketch = TierASketch.zero(edges16)
    sketch.update(dataset("dirty", 50, 16, 1))
    saved = sketch.view()
    sketch.reset()
    assert sketch.view() == TierAView.zero(edges16)
    assert TierASketch.from_view(saved).view() == saved


def test_probabilities_and_empty_summaries(edges16: FeatureEdges) -> None:
    empty = TierAView.zero(edges16)
    assert np.isnan(empty.probabilities()).all()
    assert np.isnan(empty.mean()).all()
    assert np.isnan(empty.std()).all()
    sketch = TierASketch.zero(edges16)
    sketch.update(dataset("dirty", 200, 16, 3))
    p = sketch.view().probabilities()
    assert p.shape == (16, 12)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert (p >= 0).all()


def test_std_of_a_constant_is_zero_not_nan() -> None:
    edges = FeatureEdges(1, ((0.1, 0.2),))
    sketch = TierASketch.zero(edges)
    sketch.update(np.full((1000, 1), 0.1))
    assert sketch.view().std()[0] == 0.0


# --- merge -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("splits", [(0,), (1,), (37,), (10, 20, 30), (0, 99, 100, 250)])
def test_merge_equals_sketch_of_concatenation(kind: str, splits: tuple[int, ...]) -> None:
    x = dataset(kind, 300, 6, 11)
    edges = fit_edges(np.where(np.isfinite(x), x, 0.0), 7)
    whole = TierASketch.zero(edges)
    whole.update(x)
    parts = [TierASketch.zero(edges) for _ in range(len(splits) + 1)]
    for part, chunk in zip(parts, np.split(x, list(splits)), strict=True):
        part.update(chunk)
    merged_views = TierAView.zero(edges)
    merged_tracker = TierASketch.zero(edges)
    for part in parts:
        merged_views = merged_views.merge(part.view())
        merged_tracker.merge(part)
    for merged in (merged_views, merged_tracker.view()):
        expected = whole.view()
        np.testing.assert_array_equal(merged.counts, expected.counts)
        np.testing.assert_array_equal(merged.nan, expected.nan)
        np.testing.assert_array_equal(merged.count, expected.count)
        np.testing.assert_allclose(merged.sum, expected.sum, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(merged.sumsq, expected.sumsq, rtol=1e-12)


def test_merge_is_commutative_associative_with_zero_identity(edges16: FeatureEdges) -> None:
    views = []
    for seed in range(3):
        s = TierASketch.zero(edges16)
        s.update(dataset("discrete", 20, 16, seed))  # integer sums: float addition is exact
        views.append(s.view())
    a, b, c = views
    zero = TierAView.zero(edges16)
    assert a.merge(b) == b.merge(a)
    assert a.merge(b).merge(c) == a.merge(b.merge(c))
    assert a.merge(zero) == a == zero.merge(a)


@pytest.mark.parametrize(
    "other",
    [
        FeatureEdges(2, ((0.0, 1.0, 2.0),)),  # different edges
        FeatureEdges(3, ((0.0, 1.0, 3.0),)),  # different n_bins
        FeatureEdges(2, ((0.0, 1.0, 3.0), (0.0, 1.0))),  # different feature count
    ],
)
def test_merge_with_different_edges_raises(other: FeatureEdges) -> None:
    mine = FeatureEdges(2, ((0.0, 1.0, 3.0),))
    with pytest.raises(DriftError):
        TierAView.zero(mine).merge(TierAView.zero(other))
    sketch = TierASketch.zero(mine)
    with pytest.raises(DriftError):
        sketch.merge(TierAView.zero(other))
    with pytest.raises(DriftError):
        sketch.merge(TierASketch.zero(other))


def test_equal_edges_built_separately_merge() -> None:
    a = FeatureEdges(2, ((0.0, 1.0, 3.0),))
    b = FeatureEdges.from_dict(json.loads(json.dumps(a.to_dict())))
    assert a is not b
    TierAView.zero(a).merge(TierAView.zero(b))


# --- to_dict / from_dict ---------------------------------------------------------------------


@pytest.fixture
def dirty_view() -> TierAView:
    x = dataset("dirty", 300, 5, 21)
    sketch = TierASketch.zero(fit_edges(np.where(np.isfinite(x), x, 0.0), 6))
    sketch.update(x)
    return sketch.view()


def test_dict_round_trip_through_strict_json(dirty_view: TierAView) -> None:
    text = json.dumps(dirty_view.to_dict(), allow_nan=False)
    back = TierAView.from_dict(json.loads(text))
    assert back == dirty_view
    np.testing.assert_array_equal(back.sum, dirty_view.sum)  # bit-exact floats
    assert dirty_view.to_dict()["schema_version"] == 1


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        target: Any = d
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.pop(key)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (_delete("counts"), "'counts'"),
        (_delete("schema_version"), "'schema_version'"),
        (_delete("edges"), "'edges'"),
        (_set(("extra",), 1), "unknown field"),
        (_set(("schema_version",), 2), "schema_version 2"),
        (_set(("schema_version",), True), "'schema_version'"),
        (_set(("counts", 0, 0), -1), r"counts\[0\]"),
        (_set(("counts", 0, 0), 1.0), r"counts\[0\]"),
        (_set(("counts", 0, 0), True), r"counts\[0\]"),
        (_set(("counts", 0, 0), 1 << 63), r"counts\[0\]"),
        (_set(("counts", 1), [0, 1]), r"counts\[1\]"),
        (_set(("counts",), "nope"), "'counts'"),
        (_set(("nan",), [0, 0]), "'nan'"),
        (_set(("nan", 0), "0"), "'nan'"),
        (_set(("count",), None), "'count'"),
        (_set(("count", 0), 10**6), "'count' exceeds"),
        (_set(("sum", 0), "inf"), "'sum'"),
        (_set(("sum", 0), None), "'sum'"),
        (_set(("sumsq", 0), False), "'sumsq'"),
        (_set(("edges", "edges", 0, 1), -100.0), "strictly increasing"),
        (_set(("edges", "n_bins"), 0), "'n_bins'"),
        (_set(("edges", "edges"), []), "features"),
    ],
)
def test_from_dict_rejects_malformed(
    dirty_view: TierAView, mutate: Callable[[dict[str, Any]], None], match: str
) -> None:
    d = json.loads(json.dumps(dirty_view.to_dict()))
    mutate(d)
    with pytest.raises(ContractError, match=match):
        TierAView.from_dict(d)


def test_from_dict_rejects_counts_in_bins_a_feature_does_not_have() -> None:
    d = TierAView.zero(FeatureEdges(4, ((0.0, 1.0),))).to_dict()
    d["counts"][0][3] = 1
    with pytest.raises(ContractError, match="bins without edges"):
        TierAView.from_dict(d)


@pytest.mark.parametrize("value", [None, [], "x", 3])
def test_from_dict_rejects_non_objects(value: Any) -> None:
    with pytest.raises(ContractError):
        TierAView.from_dict(value)


# --- to_bytes / from_bytes -------------------------------------------------------------------


def test_bytes_round_trip(dirty_view: TierAView) -> None:
    data = dirty_view.to_bytes()
    assert data[:4] == b"EFTA"
    assert TierAView.from_bytes(data) == dirty_view
    assert TierAView.from_bytes(bytearray(data)) == dirty_view
    assert len(data) < len(json.dumps(dirty_view.to_dict()))


def test_bytes_reject_every_truncation_and_trailing_data(dirty_view: TierAView) -> None:
    data = dirty_view.to_bytes()
    for cut in range(len(data)):
        with pytest.raises(ContractError):
            TierAView.from_bytes(data[:cut])
    with pytest.raises(ContractError, match="expected"):
        TierAView.from_bytes(data + b"\x00")


@pytest.mark.parametrize(
    ("offset", "patch", "match"),
    [
        (0, b"XXXX", "magic"),
        (4, struct.pack("<H", 2), "version 2"),
        (6, struct.pack("<H", 0), "declare"),
        (8, struct.pack("<I", 0), "declare"),
        (8, struct.pack("<I", 6), "expected"),
        (12, struct.pack("<H", 1), "expected"),  # edge counts disagree with the length
    ],
)
def test_bytes_reject_bad_headers(
    dirty_view: TierAView, offset: int, patch: bytes, match: str
) -> None:
    data = bytearray(dirty_view.to_bytes())
    data[offset : offset + len(patch)] = patch
    with pytest.raises(ContractError, match=match):
        TierAView.from_bytes(bytes(data))


def test_bytes_reject_edge_counts_that_fit_the_length_but_not_the_rules(
    dirty_view: TierAView,
) -> None:
    lengths = [len(r) for r in dirty_view.edges.edges]
    data = bytearray(dirty_view.to_bytes())
    # Feature 0 claims one edge and feature 1 takes the rest: same total, invalid rows.
    data[12:16] = struct.pack("<HH", 1, lengths[0] + lengths[1] - 1)
    with pytest.raises(ContractError, match="feature 0 needs"):
        TierAView.from_bytes(bytes(data))


def test_bytes_reject_negative_counts_and_bad_edges(dirty_view: TierAView) -> None:
    f = dirty_view.n_features
    n_edges = sum(len(r) for r in dirty_view.edges.edges)
    counts_at = 12 + 2 * f + 8 * n_edges
    data = bytearray(dirty_view.to_bytes())
    data[counts_at : counts_at + 8] = struct.pack("<q", -5)
    with pytest.raises(ContractError, match="non-negative"):
        TierAView.from_bytes(bytes(data))
    data = bytearray(dirty_view.to_bytes())
    data[12 + 2 * f : 12 + 2 * f + 8] = struct.pack("<d", float("nan"))
    with pytest.raises(ContractError, match="non-finite"):
        TierAView.from_bytes(bytes(data))


def test_decoded_edges_are_shared_and_bad_edges_refused_every_time(
    dirty_view: TierAView,
) -> None:
    """Windows of one baseline share their validated edges; a bad edge section never sticks."""
    data = dirty_view.to_bytes()
    a, b = TierAView.from_bytes(data), TierAView.from_bytes(data)
    assert a.edges is b.edges  # built and validated once
    assert a.edges == dirty_view.edges
    f = dirty_view.n_features
    bad = bytearray(data)
    bad[12 + 2 * f : 12 + 2 * f + 8] = struct.pack("<d", float("nan"))
    for _ in range(2):  # an exception is never cached as a result
        with pytest.raises(ContractError, match="non-finite"):
            TierAView.from_bytes(bytes(bad))


@pytest.mark.parametrize("seed", range(5))
def test_bytes_reject_garbage(seed: int) -> None:
    rng = np.random.default_rng(seed)
    garbage = rng.integers(0, 256, size=int(rng.integers(0, 400)), dtype=np.uint8).tobytes()
    with pytest.raises(ContractError):
        TierAView.from_bytes(garbage)
    with pytest.raises(ContractError):
        TierAView.from_bytes(b"EFTA" + garbage)


def test_bytes_reject_non_bytes() -> None:
    with pytest.raises(ContractError):
        TierAView.from_bytes("EFTA")  # type: ignore[arg-type]


@pytest.mark.skipif(
    np.finfo(np.longdouble).max <= np.finfo(np.float64).max, reason="no wider long double"
)
def test_a_long_double_past_float64_counts_as_overflow_without_a_warning() -> None:
    edges = FeatureEdges(4, ((0.0, 1.0, 2.0),))
    sketch = TierASketch.zero(edges)
    big = np.array([[np.longdouble("1e4000")], [np.longdouble("-1e4000")]], dtype=np.longdouble)
    with np.errstate(all="raise"):
        sketch.update(big)
    view = sketch.view()
    assert int(view.counts.sum()) == 2  # in under/overflow only
    assert int(view.count[0]) == 0
