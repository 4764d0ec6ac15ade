"""edge_agent.quality: confusion matrices (a monoid with a strict wire form) and the champion vs
challenger comparison and verdict."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.errors import ContractError
from edge_agent.quality.compare import ComparisonLimits, ModelComparison, compare_models, judge
from edge_agent.quality.confusion import MAX_CLASSES, Confusion, wilson_interval

pairs = st.integers(1, 6).flatmap(
    lambda k: st.tuples(
        st.just(k), st.lists(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)), max_size=60)
    )
)


@given(pairs, pairs)
def test_merge_is_the_count_of_both_sample_lists(a: Any, b: Any) -> None:
    k = a[0]
    left = [(t, p) for t, p in a[1]]
    right = [(t % k, p % k) for t, p in b[1]]

    def conf(xs: list[tuple[int, int]]) -> Confusion:
        return Confusion.from_labels([t for t, _ in xs], [p for _, p in xs], k)

    merged = conf(left).merge(conf(right))
    assert merged == conf(left + right)
    assert merged.n == len(left) + len(right)
    assert Confusion.from_dict(merged.to_dict()) == merged


@given(pairs)
def test_add_one_by_one_equals_counting_at_once(a: Any) -> None:
    k, xs = a
    one = Confusion.zero(k)
    for t, p in xs:
        one = one.add(t, p)
    assert one == Confusion.from_labels([t for t, _ in xs], [p for _, p in xs], k)


def test_accuracy_recall_and_flips() -> None:
    c = Confusion.from_labels([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 1], 3)
    assert c.accuracy() == pytest.approx(4 / 6)
    assert c.recall(0) == pytest.approx(2 / 3)
    assert c.recall(2) == 0.0
    assert c.flips() == [(0, 1, 1), (2, 1, 1)]
    assert Confusion.zero(3).accuracy() is None
    assert Confusion.zero(3).recall(1) is None


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"counts": []},
        {"counts": [[1, 2]]},
        {"counts": [[1], [2]]},
        {"counts": [[-1]]},
        {"counts": [[True]]},
        {"counts": [[1.0]]},
        {"counts": [[1 << 53]]},
        {"counts": "[[1]]"},
        {"counts": [[1]], "extra": 1},
        {"counts": [[0] * 2] * 2 + [[0, 0]] * (MAX_CLASSES - 1)},
    ],
)
def test_hostile_wire_forms_are_contract_errors(data: Any) -> None:
    with pytest.raises(ContractError):
        Confusion.from_dict(data)


@pytest.mark.parametrize(
    ("truth", "pred", "k"),
    [([0, 1], [0], 2), ([0, 2], [0, 1], 2), ([-1], [0], 2), ([0.5], [0], 2), ([[0]], [[0]], 2)],
)
def test_bad_labels_are_contract_errors(truth: Any, pred: Any, k: int) -> None:
    with pytest.raises(ContractError):
        Confusion.from_labels(truth, pred, k)


def test_wilson_interval_contains_the_estimate_and_narrows() -> None:
    lo, hi = wilson_interval(90, 100)
    assert lo < 0.9 < hi
    lo2, hi2 = wilson_interval(900, 1000)
    assert hi2 - lo2 < hi - lo
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def _label_bug(n: int, flip_share: float, seed: int = 0) -> tuple[Any, Any, Any]:
    """A champion 99% right; a challenger that also answers class 3 as 8, ``flip_share`` of it."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 10, n)
    champion = np.where(rng.random(n) < 0.99, truth, (truth + 1) % 10)
    challenger = champion.copy()
    flip = (truth == 3) & (rng.random(n) < flip_share)
    challenger[flip] = 8
    return truth, champion, challenger


def test_a_label_bug_is_refused_with_the_class_that_flips() -> None:
    truth, champion, challenger = _label_bug(2000, 0.9)
    comparison = compare_models(truth, champion, challenger, 10)
    verdict = judge(comparison, ComparisonLimits())
    assert verdict.regressed
    assert any("class 3 recall" in r and "as class 8" in r for r in verdict.reasons)
    assert any(r.startswith("accuracy") for r in verdict.reasons)
    assert comparison.disagreement == pytest.approx(
        comparison.between.n and (1 - comparison.between.correct / comparison.between.n)
    )
    assert ModelComparison.from_dict(comparison.to_dict()) == comparison


def test_the_same_model_passes_and_tiny_sets_are_not_judged() -> None:
    truth, champion, _ = _label_bug(2000, 0.0)
    assert not judge(compare_models(truth, champion, champion, 10), ComparisonLimits()).regressed
    truth, champion, challenger = _label_bug(30, 1.0)
    verdict = judge(compare_models(truth, champion, challenger, 10), ComparisonLimits())
    assert not verdict.regressed
    assert "fewer than" in verdict.notes[0]


def test_noise_within_the_set_size_is_not_a_regression() -> None:
    # A challenger that differs from the champion on a few samples both ways (net -0.4 points on
    # 500 samples) is not significantly worse: McNemar keeps it.
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 10, 500)
    champion = truth.copy()
    challenger = truth.copy()
    challenger[:4] = (truth[:4] + 1) % 10
    champion[4:6] = (truth[4:6] + 1) % 10
    assert not judge(compare_models(truth, champion, challenger, 10), ComparisonLimits()).regressed


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(n=d["n"] + 1),
        lambda d: d.update(champion_only=d["champion_only"] + 1),
        lambda d: d.update(extra=1),
        lambda d: d.pop("between"),
        lambda d: d.update(champion_only_by_class=[1]),
    ],
)
def test_comparison_wire_form_must_add_up(mutate: Any) -> None:
    truth, champion, challenger = _label_bug(200, 0.5)
    data = compare_models(truth, champion, challenger, 10).to_dict()
    mutate(data)
    with pytest.raises(ContractError):
        ModelComparison.from_dict(data)
