"""edge_agent.serving.ground_truth: the bounded memory of answers and the confusion it counts."""

from __future__ import annotations

import numpy as np
import pytest

from clock import FakeClock
from edge_agent.contract.inputs import OutputContract
from edge_agent.errors import InputValidationError, UnknownRequestError
from edge_agent.quality.confusion import Confusion
from edge_agent.serving.ground_truth import (
    MAX_CLASSES,
    MAX_ID_CHARS,
    MAX_VERSIONS,
    ROWS_PER_REQUEST,
    GroundTruth,
    predicted_classes,
)

LABELS = ("cat", "dog", "owl")


def classes(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.uint16)


def memory(n: int = 100, seconds: float = 60.0) -> tuple[GroundTruth, FakeClock]:
    clock = FakeClock()
    return GroundTruth(n, seconds, clock=clock), clock


def test_feedback_counts_the_pair_under_the_version_that_answered() -> None:
    gt, _ = memory()
    assert gt.remember("a", "m", 2, LABELS, classes(1))
    assert gt.remember("b", "m", 3, LABELS, classes(0, 2, 2))
    got = gt.feedback("m", "a", "dog", rows=False)
    assert (got.model_version, got.counted, got.skipped) == (2, 1, 0)
    got = gt.feedback("m", "b", [0, None, 1], rows=True)
    assert (got.model_version, got.counted, got.skipped) == (3, 2, 1)
    counts = gt.confusion("m")
    assert counts[2] == Confusion.zero(3).add(1, 1)
    assert counts[3] == Confusion.zero(3).add(0, 0).add(1, 2)
    assert gt.status()["m"]["feedback"] == {
        "counted": 3,
        "unknown_id": 0,
        "expired": 0,
        "bad_label": 0,
    }


def test_a_request_is_counted_once_then_forgotten() -> None:
    gt, _ = memory()
    gt.remember("a", "m", 1, LABELS, classes(1))
    gt.feedback("m", "a", 1, rows=False)
    with pytest.raises(UnknownRequestError) as caught:
        gt.feedback("m", "a", 1, rows=False)
    assert not caught.value.expired
    assert gt.confusion("m")[1].n == 1
    assert gt.status()["m"]["feedback"]["unknown_id"] == 1


def test_an_old_answer_expires_on_the_injected_clock() -> None:
    gt, clock = memory(seconds=60.0)
    gt.remember("a", "m", 1, LABELS, classes(1))
    gt.remember("b", "m", 1, LABELS, classes(1))
    clock.advance(60.0)
    assert gt.feedback("m", "a", 1, rows=False).counted == 1  # exactly at the limit: kept
    clock.advance(0.5)
    with pytest.raises(UnknownRequestError) as caught:
        gt.feedback("m", "b", 1, rows=False)
    assert caught.value.expired
    assert gt.status()["m"]["feedback"]["expired"] == 1
    assert len(gt) == 0


@pytest.mark.parametrize(
    ("label", "rows"),
    [
        (3, False),  # no such class index
        (-1, False),
        ("horse", False),  # no such class name
        (True, False),  # a bool is not a class index
        (1.0, False),  # nor a float
        (None, False),  # null only skips a row of 'labels'
        ([1], False),
        ({"a": 1}, False),
        ([1, 2], True),  # the request had three rows
        ("dog", True),  # 'labels' must be a list
        ([0, 1, 7], True),
    ],
)
def test_bad_labels_are_refused_counted_and_keep_the_answer(label: object, rows: bool) -> None:
    gt, _ = memory()
    gt.remember("a", "m", 1, LABELS, classes(0, 1, 2) if rows else classes(0))
    with pytest.raises(InputValidationError):
        gt.feedback("m", "a", label, rows=rows)
    assert gt.status()["m"]["feedback"]["bad_label"] == 1
    assert gt.confusion("m") == {}
    assert len(gt) == 1  # a corrected label may still come


def test_another_model_or_version_does_not_see_the_answer() -> None:
    gt, _ = memory()
    gt.remember("a", "m", 2, LABELS, classes(1))
    with pytest.raises(UnknownRequestError):
        gt.feedback("other", "a", 1, rows=False)
    with pytest.raises(UnknownRequestError):
        gt.feedback("m", "a", 1, rows=False, version=3)
    assert gt.feedback("m", "a", 1, rows=False, version=2).counted == 1


def test_memory_is_bounded_whatever_the_traffic() -> None:
    n = 50
    gt, _ = memory(n)
    for i in range(20_000):
        gt.remember(f"r{i}", "m", 1, LABELS, classes(*([i % 3] * (1 + i % 40))))
        assert len(gt) <= n
        assert gt.rows_held <= n * ROWS_PER_REQUEST
    # The newest are remembered, the oldest forgotten.
    assert gt.feedback("m", "r19999", [0] * 40, rows=True).counted == 40
    with pytest.raises(UnknownRequestError):
        gt.feedback("m", "r0", 0, rows=False)


def test_what_is_not_remembered() -> None:
    gt, _ = memory(2)
    assert not gt.remember("x" * (MAX_ID_CHARS + 1), "m", 1, LABELS, classes(0))
    assert not gt.remember("big", "m", 1, LABELS, classes(*([0] * (2 * ROWS_PER_REQUEST + 1))))
    assert len(gt) == 0
    off = GroundTruth(0, 60.0, clock=FakeClock())
    assert not off.enabled
    assert not off.remember("a", "m", 1, LABELS, classes(0))


def test_versions_per_model_are_capped() -> None:
    gt, _ = memory()
    for v in range(1, MAX_VERSIONS + 3):
        gt.remember(f"r{v}", "m", v, LABELS, classes(0))
        gt.feedback("m", f"r{v}", 0, rows=False)
    assert sorted(gt.confusion("m")) == list(range(3, MAX_VERSIONS + 3))


def test_new_ids_are_unique() -> None:
    gt, _ = memory()
    ids = {gt.new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert GroundTruth(1, 1.0).new_id() not in ids  # another process (agent) another prefix


# ----------------------------------------------------------------------- predicted classes
def contract(labels: tuple[str, ...] = LABELS, kind: str = "probabilities") -> OutputContract:
    return OutputContract("classification", ("p",), labels, "p", kind)


def test_predicted_classes_argmax_binary_and_dropped_rows() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.8, 0.1, 0.1]], dtype=np.float32)
    assert predicted_classes(contract(), {"p": scores}).tolist() == [1, 0]
    kept = np.array([True, False, True])
    got = predicted_classes(contract(), {"p": scores}, kept)
    assert got is not None
    assert got.tolist() == [1, 0xFFFF, 0]
    binary = np.array([[0.2], [0.9]], dtype=np.float32)
    assert predicted_classes(contract(("no", "yes")), {"p": binary}).tolist() == [0, 1]
    logits = np.array([[-0.1], [0.3]], dtype=np.float32)
    assert predicted_classes(contract(("no", "yes"), "logits"), {"p": logits}).tolist() == [0, 1]


def test_predicted_classes_only_for_countable_classifiers() -> None:
    scores = {"p": np.zeros((2, 3), dtype=np.float32)}
    assert predicted_classes(OutputContract("regression", ("p",)), scores) is None
    many = tuple(f"c{i}" for i in range(MAX_CLASSES + 1))
    assert predicted_classes(contract(many), scores) is None
    assert predicted_classes(contract(), {"q": scores["p"]}) is None
    assert predicted_classes(contract(), scores, np.array([True])) is None  # rows disagree
