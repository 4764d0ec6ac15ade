"""Flattening/reduction rule and edge fitting (ties, point masses, constant features)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.drift import FeatureEdges, TierASketch, fit_edges, flatten_features
from edge_agent.drift.features import reduced_feature_count
from edge_agent.errors import ContractError, DriftError

# --- flatten_features ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "features"),
    [((5,), 1), ((5, 1), 1), ((5, 7), 7), ((5, 2, 3), 6), ((5, 2, 3, 4), 24), ((0, 3), 3)],
)
def test_flatten_keeps_batch_and_flattens_the_rest_in_c_order(
    shape: tuple[int, ...], features: int
) -> None:
    x = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    out = flatten_features(x)
    assert out.shape == (shape[0], features)
    assert out.dtype == np.float64
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, x.reshape(shape[0], features))


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64, np.float16, np.float32, bool])
def test_flatten_accepts_real_dtypes_and_returns_float64(dtype: type) -> None:
    x = np.ones((3, 4), dtype=dtype)
    out = flatten_features(x)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, np.ones((3, 4)))


@pytest.mark.parametrize(
    "x",
    [
        np.float32(1.0),
        np.array(3.0),
        np.zeros((4, 0)),
        np.zeros((4, 2, 0)),
        np.array([["a"]]),
        np.ones((2, 2), dtype=np.complex64),
        np.array([[object()]]),
    ],
)
def test_flatten_rejects_scalars_empty_samples_and_non_real_values(x: np.ndarray) -> None:
    with pytest.raises(DriftError):
        flatten_features(x)


def test_flatten_rejects_a_bad_cap() -> None:
    with pytest.raises(ValueError, match="max_features"):
        flatten_features(np.zeros((2, 2)), max_features=0)


def test_reduction_averages_contiguous_groups_with_a_short_last_group() -> None:
    # f = 10, cap 4: group size ceil(10/4) = 3, ceil(10/3) = 4 features: [0:3] [3:6] [6:9] [9:10]
    x = np.arange(20, dtype=np.float64).reshape(2, 10)
    out = flatten_features(x, max_features=4)
    expected = np.stack(
        [x[:, 0:3].mean(1), x[:, 3:6].mean(1), x[:, 6:9].mean(1), x[:, 9:10].mean(1)], axis=1
    )
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("shape", "cap", "features"),
    [
        ((2, 28, 28), 256, 196),  # 784 values, groups of 4
        ((2, 3, 32, 32), 256, 256),  # 3072 values, groups of 12
        ((2, 257), 256, 129),  # groups of 2, last holds 1
        ((2, 256), 256, 256),  # at the cap: untouched
        ((1, 224, 224, 3), 256, 256),  # 150528 values, groups of 588
        ((2, 1001), 256, 251),  # groups of 4, last holds 1
    ],
)
def test_reduction_feature_counts(shape: tuple[int, ...], cap: int, features: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=shape, dtype=np.uint8)
    out = flatten_features(x, max_features=cap)
    assert out.shape == (shape[0], features)
    assert features <= cap
    assert reduced_feature_count(int(np.prod(shape[1:])), cap) == features
    flat = x.reshape(shape[0], -1).astype(np.float64)
    group = -(-flat.shape[1] // cap)
    for j in (0, features - 1):
        np.testing.assert_allclose(out[:, j], flat[:, j * group : (j + 1) * group].mean(axis=1))


def test_reduction_propagates_nan_and_inf_per_group() -> None:
    x = np.zeros((1, 12))
    x[0, 1] = np.nan
    x[0, 4] = np.inf
    x[0, 7], x[0, 8] = np.inf, -np.inf
    out = flatten_features(x, max_features=4)  # groups of 3
    assert np.isnan(out[0, 0])
    assert out[0, 1] == np.inf
    assert np.isnan(out[0, 2])
    assert out[0, 3] == 0.0


def test_reduction_is_deterministic_for_float32_and_float64_inputs_of_equal_values() -> None:
    x = np.random.default_rng(3).integers(0, 255, size=(4, 1000)).astype(np.float32)
    np.testing.assert_array_equal(flatten_features(x), flatten_features(x.astype(np.float64)))


# --- fit_edges -------------------------------------------------------------------------------


def _bucket_of(edges: FeatureEdges, j: int, value: float) -> int:
    sketch = TierASketch.zero(edges)
    row = np.zeros((1, edges.n_features))
    row[0, j] = value
    sketch.update(row)
    return int(np.flatnonzero(sketch.view().counts[j])[0])


def test_continuous_feature_gets_n_bins_observed_edges() -> None:
    x = np.random.default_rng(0).normal(size=(1000, 3))
    edges = fit_edges(x, n_bins=10)
    assert edges.n_bins == 10
    for j, row in enumerate(edges.edges):
        assert len(row) == 11
        assert np.all(np.diff(row) > 0)
        assert row[0] == x[:, j].min()
        assert row[-1] == x[:, j].max()
        assert set(row) <= set(x[:, j].tolist())  # inverted_cdf: every edge is observed


def test_constant_feature_gets_one_bin_holding_the_constant() -> None:
    x = np.full((50, 2), 3.5)
    x[:, 1] = -0.0
    edges = fit_edges(x, n_bins=10)
    assert edges.edges[0] == (3.5, float(np.nextafter(3.5, np.inf)))
    assert edges.edges[1][0] == 0.0
    assert edges.bins_used().tolist() == [1, 1]
    sketch = TierASketch.zero(edges)
    sketch.update(np.array([[3.5, 0.0], [3.4, -1.0], [3.6, 1.0], [3.5, -0.0]]))
    counts = sketch.view().counts
    assert counts[0].tolist() == [1, 2] + [0] * 9 + [1]
    assert counts[1].tolist() == [1, 2] + [0] * 9 + [1]


def test_constant_feature_at_the_largest_float_still_has_a_bin() -> None:
    big = float(np.finfo(np.float64).max)
    edges = fit_edges(np.full((5, 1), big), n_bins=4)
    assert edges.edges[0] == (float(np.nextafter(big, -np.inf)), big)
    assert _bucket_of(edges, 0, big) == 1
    assert _bucket_of(edges, 0, np.inf) == 5


def test_point_mass_at_zero_gets_its_own_bin() -> None:
    # Digit-like pixel: 80% zeros, the rest spread over (0, 1].
    rng = np.random.default_rng(1)
    x = np.where(rng.random((2000, 1)) < 0.8, 0.0, rng.random((2000, 1)) + 1e-3)
    edges = fit_edges(x, n_bins=10)
    row = edges.edges[0]
    assert row[0] == 0.0
    assert row[1] == float(np.nextafter(0.0, np.inf))
    assert len(row) - 1 <= 10
    sketch = TierASketch.zero(edges)
    sketch.update(x)
    assert sketch.view().counts[0, 1] == np.count_nonzero(x == 0.0)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_bins", [1, 2, 3, 10, 25])
def test_discrete_features_never_exceed_n_bins_and_every_value_is_bucketed(
    seed: int, n_bins: int
) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, rng.integers(1, 8), size=(rng.integers(1, 60), 4)).astype(np.float64)
    x[:, 3] = rng.choice([0.0, 0.5, 1.0], size=x.shape[0], p=[0.7, 0.2, 0.1])
    edges = fit_edges(x, n_bins=n_bins)
    assert all(2 <= len(r) <= n_bins + 1 for r in edges.edges)
    sketch = TierASketch.zero(edges)
    sketch.update(x)
    view = sketch.view()
    assert view.counts[:, 0].sum() == 0  # nothing in the baseline is below its minimum
    assert view.counts[:, -1].sum() == 0  # or above its maximum
    assert view.counts.sum(axis=1).tolist() == [x.shape[0]] * 4


def test_values_on_edges_land_in_the_bin_the_edge_opens_and_the_top_edge_closes_the_last() -> None:
    edges = FeatureEdges(3, ((0.0, 1.0, 2.0, 3.0),))
    assert _bucket_of(edges, 0, -1e-300) == 0  # underflow
    assert _bucket_of(edges, 0, 0.0) == 1
    assert _bucket_of(edges, 0, 1.0) == 2
    assert _bucket_of(edges, 0, 2.0) == 3
    assert _bucket_of(edges, 0, float(np.nextafter(3.0, 0.0))) == 3
    assert _bucket_of(edges, 0, 3.0) == 3  # closed last bin
    assert _bucket_of(edges, 0, float(np.nextafter(3.0, 4.0))) == 4  # overflow
    assert _bucket_of(edges, 0, -np.inf) == 0
    assert _bucket_of(edges, 0, np.inf) == 4


def test_fewer_bins_than_columns_route_overflow_to_the_last_column() -> None:
    edges = FeatureEdges(5, ((0.0, 1.0),))
    assert _bucket_of(edges, 0, 0.5) == 1
    assert _bucket_of(edges, 0, 1.0) == 1
    assert _bucket_of(edges, 0, 1.5) == 6


def test_fit_ignores_nan_and_inf() -> None:
    x = np.array([[1.0], [2.0], [np.nan], [np.inf], [-np.inf], [3.0]])
    assert fit_edges(x, n_bins=2).edges[0] == (1.0, 2.0, 3.0)


@pytest.mark.parametrize(
    "x", [np.array([[np.nan], [np.nan]]), np.array([[1.0, np.inf]]), np.zeros((0, 2))]
)
def test_fit_rejects_features_without_finite_values(x: np.ndarray) -> None:
    with pytest.raises(DriftError, match="no finite"):
        fit_edges(x)


@pytest.mark.parametrize("x", [np.zeros(5), np.zeros((2, 2, 2)), np.zeros((3, 0))])
def test_fit_rejects_non_2d(x: np.ndarray) -> None:
    with pytest.raises(DriftError):
        fit_edges(x)


@pytest.mark.parametrize("n_bins", [0, -1, 5000])
def test_fit_rejects_bad_bin_counts(n_bins: int) -> None:
    with pytest.raises(ValueError, match="n_bins"):
        fit_edges(np.zeros((3, 1)), n_bins=n_bins)


@pytest.mark.parametrize(
    ("n_bins", "rows", "match"),
    [
        (2, ((0.0, 1.0, 1.0),), "strictly increasing"),
        (2, ((1.0, 0.0),), "strictly increasing"),
        (2, ((0.0,),), "2 to 3 edges"),
        (2, ((0.0, 1.0, 2.0, 3.0),), "2 to 3 edges"),
        (2, ((0.0, float("inf")),), "non-finite"),
        (2, ((float("nan"), 1.0),), "non-finite"),
        (2, (), "features"),
        (0, ((0.0, 1.0),), "n_bins"),
    ],
)
def test_feature_edges_validate(
    n_bins: int, rows: tuple[tuple[float, ...], ...], match: str
) -> None:
    with pytest.raises(ContractError, match=match):
        FeatureEdges(n_bins, rows)


def test_feature_edges_dict_round_trip_and_strictness() -> None:
    edges = fit_edges(np.random.default_rng(0).normal(size=(100, 3)), 4)
    assert FeatureEdges.from_dict(edges.to_dict()) == edges
    bad = edges.to_dict()
    bad["edges"][1] = [0, "1"]
    with pytest.raises(ContractError, match=r"edges\[1\]"):
        FeatureEdges.from_dict(bad)
    with pytest.raises(ContractError, match="unknown"):
        FeatureEdges.from_dict({**edges.to_dict(), "extra": 1})
    with pytest.raises(ContractError, match="n_bins"):
        FeatureEdges.from_dict({**edges.to_dict(), "n_bins": True})


def test_thresholds_are_read_only() -> None:
    edges = FeatureEdges(2, ((0.0, 1.0),))
    with pytest.raises(ValueError, match="read-only"):
        edges.thresholds[0, 0] = 5.0
