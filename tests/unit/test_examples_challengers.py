"""The challenger example models are what their docstrings promise, measured through onnxruntime.

Two confidently wrong candidates (``digits_mislabelled_mlp``: 3s trained as 8s;
``digits_nines_as_fours_mlp``: 9s trained as 4s) are 5-10 points less accurate than the live
model on the held-out split, their mean top-class probability is not lower, and they take the
very same inputs (contract and preprocessing); each makes its own confusion. The slow candidate
(``digits_slow_mlp``) answers exactly like the live model through a much larger graph.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from edge_agent.runtime.onnx import OnnxRuntime
from model_builder import examples
from model_builder.errors import InputDataError

WRONG: dict[str, tuple[Callable[[], examples.ExampleModel], int, int]] = {
    "3s as 8s": (examples.digits_mislabelled_mlp, 3, 8),
    "9s as 4s": (examples.digits_nines_as_fours_mlp, 9, 4),
}


def _proba(ex: examples.ExampleModel) -> np.ndarray:
    rt = OnnxRuntime(ex.model_bytes)
    try:
        return rt.run({ex.input_name: ex.preprocessing.apply(ex.x_eval)})[ex.output_name]
    finally:
        rt.close()


@pytest.fixture(scope="module")
def live() -> tuple[examples.ExampleModel, np.ndarray]:
    ex = examples.digits_mlp()
    return ex, _proba(ex)


@pytest.mark.parametrize("case", sorted(WRONG))
def test_confidently_wrong_candidates_are_worse_not_less_confident_same_inputs(
    case: str, live: tuple[examples.ExampleModel, np.ndarray]
) -> None:
    good, good_p = live
    make, source, into = WRONG[case]
    bad = make()
    bad_p = _proba(bad)
    y = good.y_eval
    np.testing.assert_array_equal(bad.y_eval, y)
    np.testing.assert_array_equal(bad.x_eval, good.x_eval)
    drop = float(np.mean(good_p.argmax(1) == y) - np.mean(bad_p.argmax(1) == y))
    assert 0.05 <= drop <= 0.10, drop
    assert float(bad_p.max(1).mean()) >= float(good_p.max(1).mean())
    # Same input contract (tensor, dtype, shape, ranges, preprocessing) and output contract.
    assert bad.input_contract().to_dict() == good.input_contract().to_dict()
    assert bad.output_contract().to_dict() == good.output_contract().to_dict()
    # Its own confusion: most held-out samples of the source class are answered as ``into``.
    of_source = y == source
    assert float(np.mean(bad_p[of_source].argmax(1) == into)) > 0.8
    assert float(np.mean(good_p[of_source].argmax(1) == into)) < 0.1


def test_the_two_wrong_candidates_make_different_mistakes() -> None:
    a, b = (_proba(make()) for make, _, _ in WRONG.values())
    y = examples.digits_mlp().y_eval
    assert float(np.mean(a[y == 9].argmax(1) == 4)) < 0.1  # 3 -> 8 leaves the 9s alone
    assert float(np.mean(b[y == 3].argmax(1) == 8)) < 0.1  # 9 -> 4 leaves the 3s alone


def test_slow_candidate_answers_like_the_live_model_with_far_more_compute(
    live: tuple[examples.ExampleModel, np.ndarray],
) -> None:
    good, good_p = live
    slow = examples.digits_slow_mlp()
    np.testing.assert_allclose(_proba(slow), good_p, atol=1e-5)
    assert slow.input_contract().to_dict() == good.input_contract().to_dict()
    assert slow.num_parameters > 100 * good.num_parameters
    with pytest.raises(InputDataError):
        examples.digits_slow_mlp(width=32)
    with pytest.raises(InputDataError):
        examples.digits_slow_mlp(depth=0)
