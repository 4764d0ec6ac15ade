"""DriftBaseline: built with the device's code, equal to brute force, strict dict format."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from edge_agent.drift import (
    DriftBaseline,
    KllFeatureSketches,
    TierASketch,
    TierAView,
    build_baseline,
    fit_edges,
    flatten_features,
)
from edge_agent.errors import ContractError, DriftError


def brute_force(x2d: np.ndarray, rows: tuple[tuple[float, ...], ...], n_bins: int) -> np.ndarray:
    out = np.zeros((x2d.shape[1], n_bins + 2), dtype=np.int64)
    for j, row in enumerate(rows):
        e = np.asarray(row)
        col = x2d[:, j][~np.isnan(x2d[:, j])]
        out[j, 0] = np.count_nonzero(col < e[0])
        out[j, 1 : len(e)] = np.histogram(col[(col >= e[0]) & (col <= e[-1])], bins=e)[0]
        out[j, -1] = np.count_nonzero(col > e[-1])
    return out


@pytest.fixture(scope="module")
def tensors() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(42)
    tabular = rng.normal(size=(500, 16)).astype(np.float32)
    tabular[::50, 3] = np.nan
    image = np.where(rng.random((500, 1, 28, 28)) < 0.8, 0.0, rng.random((500, 1, 28, 28)))
    logits = rng.normal(size=(500, 10))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    label = rng.integers(0, 10, size=500)
    return {"tabular": tabular, "image": image.astype(np.float32)}, {"probs": probs, "label": label}


@pytest.fixture(scope="module")
def baseline(tensors: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]) -> DriftBaseline:
    inputs, outputs = tensors
    return build_baseline(inputs, outputs, n_bins=10, kll_k=100)


def test_counts_equal_brute_force_histograms(
    baseline: DriftBaseline, tensors: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]
) -> None:
    inputs, outputs = tensors
    for role, group in (("input", inputs), ("output", outputs)):
        for name, x in group.items():
            view = baseline.view(name, role)
            x2d = flatten_features(x)
            assert view.edges == fit_edges(x2d, 10)
            np.testing.assert_array_equal(view.counts, brute_force(x2d, view.edges.edges, 10))
            np.testing.assert_array_equal(view.nan, np.isnan(x2d).sum(axis=0))
            np.testing.assert_array_equal(view.total(), np.full(x2d.shape[1], 500))
    assert baseline.inputs["image"].n_features == 196  # 784 pixels averaged in groups of 4
    assert baseline.outputs["label"].n_features == 1


def test_device_tracker_reproduces_the_baseline_exactly(
    baseline: DriftBaseline, tensors: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]
) -> None:
    inputs, _ = tensors
    trackers = baseline.input_trackers()
    assert set(trackers) == {"tabular", "image"}
    for name, x in inputs.items():
        fresh = baseline.tracker_for(name)
        assert fresh.view() == TierAView.zero(baseline.inputs[name].edges)
        # Same data in device-sized batches of 64: counts merge exactly.
        for start in range(0, x.shape[0], 64):
            trackers[name].update(baseline.features(x[start : start + 64]))
        got, want = trackers[name].view(), baseline.inputs[name]
        np.testing.assert_array_equal(got.counts, want.counts)
        np.testing.assert_array_equal(got.nan, want.nan)
        np.testing.assert_array_equal(got.count, want.count)
        np.testing.assert_allclose(got.sum, want.sum, rtol=1e-9, atol=1e-9)
    out = baseline.tracker_for("probs", role="output")
    assert isinstance(out, TierASketch)
    assert set(baseline.output_trackers()) == {"probs", "label"}


@pytest.mark.parametrize(("name", "role"), [("nope", "input"), ("probs", "input"), ("x", "x")])
def test_unknown_tensors_and_roles_raise(baseline: DriftBaseline, name: str, role: str) -> None:
    with pytest.raises(DriftError):
        baseline.tracker_for(name, role)


def test_kll_sketches_are_built_and_usable(
    baseline: DriftBaseline, tensors: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]
) -> None:
    assert set(baseline.kll) == {"tabular", "image", "probs", "label"}
    sketches = baseline.kll_sketches("tabular")
    assert isinstance(sketches, KllFeatureSketches)
    x2d = flatten_features(tensors[0]["tabular"])
    assert sketches.n().tolist() == (~np.isnan(x2d)).sum(axis=0).tolist()
    np.testing.assert_allclose(
        sketches.quantiles([0.5])[:, 0], np.nanmedian(x2d, axis=0), atol=0.15
    )
    assert build_baseline({"x": np.ones((3, 2))}, {}).kll_sketches("x") is None


def test_dict_round_trip_through_canonical_json(baseline: DriftBaseline) -> None:
    d = baseline.to_dict()
    text = json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=False)
    back = DriftBaseline.from_dict(json.loads(text))
    assert back == baseline
    assert back.to_dict() == d
    assert d["schema_version"] == 1
    assert d["max_features"] == 256
    assert back.kll == baseline.kll


def test_empty_baseline_round_trips() -> None:
    empty = DriftBaseline()
    assert DriftBaseline.from_dict(json.loads(json.dumps(empty.to_dict()))) == empty


def test_baseline_is_immutable(baseline: DriftBaseline) -> None:
    with pytest.raises(TypeError):
        baseline.inputs["new"] = baseline.inputs["tabular"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        baseline.max_features = 3  # type: ignore[misc]


def test_max_features_is_recorded_and_applied() -> None:
    x = np.random.default_rng(0).normal(size=(50, 40))
    small = build_baseline({"x": x}, {}, max_features=8)
    assert small.max_features == 8
    assert small.inputs["x"].n_features == 8
    assert small.features(x).shape == (50, 8)
    tracker = small.tracker_for("x")
    tracker.update(small.features(x))
    np.testing.assert_array_equal(tracker.view().counts, small.inputs["x"].counts)
    with pytest.raises(DriftError):
        tracker.update(flatten_features(x))  # the default cap gives 40 features


def _kll_of(d: dict[str, Any], name: str) -> bytes:
    return base64.b64decode(d["kll"][name])


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.pop("inputs"), "'inputs'"),
        (lambda d: d.pop("kll"), "'kll'"),
        (lambda d: d.update(extra=1), "unknown field"),
        (lambda d: d.update(schema_version=2), "schema_version 2"),
        (lambda d: d.update(max_features=0), "'max_features'"),
        (lambda d: d.update(max_features=10), "more than max_features"),
        (lambda d: d.update(inputs=[]), "inputs must be a JSON object"),
        (lambda d: d["inputs"]["tabular"].pop("sum"), r"inputs\['tabular'\].*'sum'"),
        (lambda d: d["outputs"]["probs"]["counts"][0].append(1), r"outputs\['probs'\]"),
        (lambda d: d["outputs"].update(tabular=d["inputs"]["tabular"]), "both inputs and outputs"),
        (lambda d: d["inputs"].update({"": d["inputs"]["tabular"]}), "non-empty"),
        (lambda d: d["kll"].update(tabular="%%%"), "not base64"),
        (lambda d: d["kll"].update(tabular=5), "base64 string"),
        (lambda d: d["kll"].update(ghost=d["kll"]["tabular"]), "names no input or output"),
        (lambda d: d["kll"].update(tabular=d["kll"]["label"]), "has 1 features"),
        (lambda d: d["kll"].update(tabular=base64.b64encode(b"nope").decode()), "truncated"),
        (
            lambda d: d["kll"].update(
                tabular=base64.b64encode(b"XXXX" + _kll_of(d, "probs")[4:]).decode()
            ),
            "magic",
        ),
    ],
)
def test_from_dict_rejects_malformed(
    baseline: DriftBaseline, mutate: Callable[[dict[str, Any]], None], match: str
) -> None:
    d = json.loads(json.dumps(baseline.to_dict()))
    mutate(d)
    with pytest.raises(ContractError, match=match):
        DriftBaseline.from_dict(d)


@pytest.mark.parametrize("value", [None, [], "baseline", 1])
def test_from_dict_rejects_non_objects(value: Any) -> None:
    with pytest.raises(ContractError):
        DriftBaseline.from_dict(value)


def test_build_rejects_bad_tensors_and_names() -> None:
    with pytest.raises(DriftError, match="no finite"):
        build_baseline({"x": np.full((4, 2), np.nan)}, {})
    with pytest.raises(DriftError):
        build_baseline({"x": np.float32(1.0)}, {})
    with pytest.raises(ContractError, match="both inputs and outputs"):
        build_baseline({"x": np.ones((4, 2))}, {"x": np.ones((4, 1))})
    with pytest.raises(ValueError, match="k must be"):
        build_baseline({"x": np.ones((4, 2))}, {}, kll_k=2)
