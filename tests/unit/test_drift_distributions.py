"""The array tails against the scalar ones they replace in ``judge`` (and against scipy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from edge_agent.drift.distributions import (
    chi2_isf,
    chi2_sf,
    chi2_sf_array,
    norm_sf,
    norm_two_sided_array,
)

#: Where the scalar tail is above this, the array tail must agree to ``REL`` relative; below
#: it (down to subnormals and 0) to ``TINY`` absolute.
TINY = 1e-300
REL = 1e-12


def _close(got: float, want: float) -> bool:
    if math.isnan(want):
        return math.isnan(got)
    if want > TINY:
        return abs(got - want) <= REL * want
    return abs(got - want) <= TINY


# x spans the whole range: 0, subnormal, tiny, around the mean, far in the tail, huge.
_X = st.one_of(
    st.floats(min_value=0.0, max_value=1e-3),
    st.floats(min_value=0.0, max_value=600.0),
    st.floats(min_value=0.0, max_value=5000.0),
    st.floats(min_value=0.0, max_value=1e300),
    st.sampled_from([0.0, 5e-324, math.inf, math.nan, -1.0, -math.inf]),
)


@settings(max_examples=600, deadline=None)
@given(x=_X, dof=st.integers(min_value=1, max_value=255))
def test_chi2_sf_array_agrees_with_the_scalar_tail(x: float, dof: int) -> None:
    got = float(chi2_sf_array(np.array([x]), np.array([dof]))[0])
    assert _close(got, chi2_sf(x, dof)), (x, dof, got, chi2_sf(x, dof))


@settings(max_examples=200, deadline=None)
@given(
    dof=st.integers(min_value=1, max_value=255),
    log_p=st.floats(min_value=-690.0, max_value=-1e-3),
)
def test_chi2_sf_array_agrees_in_the_tails_down_to_1e_300(dof: int, log_p: float) -> None:
    # At the quantile of p = e^log_p: exactly the region the verdicts are decided in.
    x = chi2_isf(math.exp(log_p), dof)
    got = float(chi2_sf_array(x, dof))
    assert got == pytest.approx(chi2_sf(x, dof), rel=REL)
    assert got == pytest.approx(math.exp(log_p), rel=1e-9)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=2000.0), st.integers(0, 255)),
        min_size=1,
        max_size=80,
    )
)
def test_chi2_sf_array_is_elementwise_over_mixed_dof(pairs: list[tuple[float, int]]) -> None:
    x = np.array([p[0] for p in pairs])
    dof = np.array([p[1] for p in pairs])
    got = chi2_sf_array(x, dof)
    assert got.shape == x.shape
    for g, (xi, d) in zip(got.tolist(), pairs, strict=True):
        want = chi2_sf(xi, d) if d > 0 else 1.0  # no cells to compare: no test, p = 1
        assert _close(g, want), (xi, d, g, want)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.floats(min_value=-40.0, max_value=40.0),
    )
)
def test_norm_two_sided_array_is_the_scalar_tail(z: float) -> None:
    got = float(norm_two_sided_array(np.array([z]))[0])
    want = math.nan if math.isnan(z) else 2.0 * norm_sf(abs(z))
    # Bit for bit wherever the scalar's halving and doubling cannot round (not subnormal).
    if math.isnan(want):
        assert math.isnan(got)
    elif want > TINY:
        assert got == want
    else:
        assert abs(got - want) <= TINY


@pytest.mark.parametrize("dof", [1, 2, 3, 7, 8, 64, 127, 128, 255])
def test_chi2_sf_array_matches_scipy(dof: int) -> None:
    x = np.concatenate([np.linspace(0.01, 4 * dof + 50, 200), [1e-9, 0.5, 1e3, 2e3]])
    want = stats.chi2.sf(x, dof)
    got = chi2_sf_array(x, np.full(x.shape, dof))
    ok = want > TINY
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-11)


def test_chi2_sf_array_edge_values_and_shapes() -> None:
    got = chi2_sf_array([math.nan, math.inf, -math.inf, 0.0, -3.0, 1e308, 3.0], 4)
    assert np.isnan(got[0])
    assert got[1:].tolist()[:5] == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert got[6] == pytest.approx(chi2_sf(3.0, 4), rel=REL)
    # dof < 1: no test (a constant feature): p = 1 whatever the statistic.
    assert chi2_sf_array([5.0, 0.0], [0, -1]).tolist() == [1.0, 1.0]
    assert chi2_sf_array(np.ones((2, 3)), 3).shape == (2, 3)
    assert chi2_sf_array(np.array([]), np.array([], dtype=np.int64)).shape == (0,)
