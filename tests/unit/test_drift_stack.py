"""Stacked scoring (``score_arrays`` on a ``TierAStack``, ``judge_stack``): every row decided
bit for bit as ``score`` and ``judge`` decide that row's view alone (what fleet drift relies on
when it scores all cells of a baseline at once)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.drift import (
    DriftThresholds,
    FeatureEdges,
    TierASketch,
    TierAView,
    fit_edges,
    judge,
    score,
)
from edge_agent.drift.scores import ScoreArrays, score_arrays
from edge_agent.drift.thresholds import judge_stack
from edge_agent.drift.view import TierAStack
from edge_agent.errors import DriftError

F = 12


def _view(edges: FeatureEdges, rows: np.ndarray) -> TierAView:
    sketch = TierASketch.zero(edges)
    sketch.update(rows)
    return sketch.view()


@pytest.fixture(scope="module")
def setting() -> tuple[TierAView, list[TierAView]]:
    """A baseline and windows from no drift to strong drift, with NaN, constants, tiny and
    empty windows (not judged) and out-of-range values."""
    rng = np.random.default_rng(7)
    base_rows = rng.normal(size=(800, F))
    base_rows[:, 3] = 1.0  # a constant feature: one kept cell, no chi-square test
    base_rows[:40, 5] = np.nan
    edges = fit_edges(base_rows, 8)
    windows = []
    for i in range(40):
        n = [0, 10, 49, 50, 200, 1000][i % 6]
        rows = rng.normal(loc=0.03 * i, scale=1.0 + 0.02 * i, size=(n, F))
        rows[:, 3] = 1.0 if i % 4 else 2.0
        if n:
            rows[: n // 10, 5] = np.nan
            rows[0, 7] = 1e6
        windows.append(_view(edges, rows))
    return _view(edges, base_rows), windows


def _rows_equal(stacked: ScoreArrays, row: int, alone: ScoreArrays) -> None:
    for name in ScoreArrays._fields:
        a, b = getattr(stacked, name)[row], getattr(alone, name)
        assert np.array_equal(a, b, equal_nan=True), name


def test_stacked_scores_equal_each_views_scores_bit_for_bit(
    setting: tuple[TierAView, list[TierAView]],
) -> None:
    baseline, windows = setting
    stacked = score_arrays(TierAStack.of(windows), baseline)
    assert stacked.psi.shape == (len(windows), F)
    for i, w in enumerate(windows):
        _rows_equal(stacked, i, score_arrays(w, baseline))
        assert score(w, baseline) == score(w, baseline)  # the value object over the same arrays


@pytest.mark.parametrize("correction", ["bonferroni", "holm"])
@pytest.mark.parametrize("tests", [("psi", "mean"), ("psi", "js", "ks", "mean", "nan"), ("ks",)])
@pytest.mark.parametrize("alpha", [0.01, 0.5])
def test_judge_stack_decides_each_row_as_judge(
    setting: tuple[TierAView, list[TierAView]], correction: str, tests: tuple[str, ...],
    alpha: float,
) -> None:  # fmt: skip
    baseline, windows = setting
    stacked = judge_stack(
        score_arrays(TierAStack.of(windows), baseline), alpha, tests=tests, correction=correction
    )
    drifted_somewhere = False
    for i, w in enumerate(windows):
        s = score(w, baseline)
        t = DriftThresholds.for_scores(s, alpha, tests=tests, correction=correction)
        v = judge(s, t)
        assert np.array_equal(stacked.drifted[i], v.drifted)
        assert np.array_equal(stacked.judged[i], v.judged)
        assert set(stacked.by_test) == set(v.by_test)
        for name, hits in v.by_test.items():
            assert np.array_equal(stacked.by_test[name][i], hits)
        for name in ("psi", "ks", "mean_shift"):
            want = np.broadcast_to(getattr(t, name), (F,))
            assert np.array_equal(getattr(stacked, name)[i], want)
        drifted_somewhere |= bool(v.drifted.any())
    assert drifted_somewhere  # the setting exercises decisions both ways
    assert not stacked.drifted.all()


def test_stacking_refuses_other_edges_and_nothing(
    setting: tuple[TierAView, list[TierAView]],
) -> None:
    baseline, windows = setting
    other = TierAView.zero(fit_edges(np.random.default_rng(1).normal(size=(100, F)), 8))
    with pytest.raises(DriftError):
        TierAStack.of([windows[0], other])
    with pytest.raises(DriftError):
        TierAStack.of([])
    with pytest.raises(ValueError, match="stacked"):
        judge_stack(score_arrays(windows[0], baseline))
