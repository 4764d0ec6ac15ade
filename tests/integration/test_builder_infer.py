"""Contracts inferred without ``--contract``: ranges with a margin, checked against held-out data,
and the score kind read from what the model answers.

Real scikit-learn datasets (breast cancer, wine: tabular; digits: pixels), a real logistic
regression exported to ONNX with ``onnx.helper``, real onnxruntime, the agent's own Validator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from edge_agent.bundle import read_raw
from edge_agent.contract import BundleManifest
from edge_agent.runtime.base import TensorInfo
from model_builder import cli as builder_cli
from model_builder.data import Dataset, infer_contract, inferred_ranges, score_kind_of
from model_builder.evaluate.contract_check import describe_refusals, refusals
from model_builder.examples import save_example

Array = np.ndarray[Any, Any]
DATASETS = {"breast_cancer": load_breast_cancer, "wine": load_wine, "digits": load_digits}


def _split(name: str, seed: int) -> tuple[Array, Array, Array, Array]:
    bunch = DATASETS[name]()
    x_train, x_test, y_train, y_test = train_test_split(
        bunch.data.astype(np.float32),
        bunch.target,
        test_size=0.3,
        random_state=seed,
        stratify=bunch.target,
    )
    return x_train, x_test, y_train, y_test


def _refused_share(x_calib: Array, x_test: Array, margin: float | None) -> float:
    ds = Dataset({"x": x_calib}, None)
    info = [TensorInfo("x", "float32", (None, x_calib.shape[1]))]
    kwargs = {} if margin is None else {"range_margin": margin}
    contract, _ = infer_contract(info, [TensorInfo("y", "float32", (None, 2))], ds, **kwargs)
    return refusals(contract, {"x": x_test}).refused_fraction


@pytest.mark.parametrize("name", ["breast_cancer", "wine", "digits"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inferred_ranges_accept_held_out_rows(name: str, seed: int) -> None:
    x_train, x_test, _, _ = _split(name, seed)
    calib = x_train[:200]
    # The old margin (10% of the span) refused 1.1-5.6% of these held-out rows.
    assert _refused_share(calib, x_test, 0.1) > 0.01
    assert _refused_share(calib, x_test, None) <= 0.01


def test_inferred_ranges_pad_constant_features_by_the_tensor_scale() -> None:
    x = np.array([[0.0, 0.0], [0.0, 16.0], [0.0, 8.0]])
    low, high = inferred_ranges(x, 0.5)
    assert high[0] == pytest.approx(8.0, abs=1e-5)  # median varying span 16, times 0.5
    assert (low[1], high[1]) == pytest.approx((-8.0, 24.0), abs=1e-5)


@pytest.mark.parametrize(
    ("scores", "kind"),
    [
        (np.array([[0.2, 0.8], [1.0, 0.0]]), "probabilities"),
        (np.array([[0.2, 0.8 + 5e-4]]), "probabilities"),  # float32 softmax rounding
        (np.array([[0.2, 0.7]]), "logits"),  # does not sum to 1
        (np.array([[-0.5, 1.5]]), "logits"),  # sums to 1 but negative
        (np.array([[3.2, -1.0], [0.1, 0.4]]), "logits"),
        (np.array([[np.nan, 1.0]]), "logits"),
        (np.zeros((0, 2)), "logits"),
    ],
)
def test_score_kind_of(scores: Array, kind: str) -> None:
    assert score_kind_of(scores) == kind


def test_refusals_count_rows_reasons_and_features() -> None:
    x = np.zeros((5, 3), dtype=np.float32) + np.array([0, 0, 1], np.float32)
    x[1, 2] = 100.0
    x[3, 0] = -100.0
    x[4, 1] = np.nan
    ds = Dataset({"x": np.zeros((4, 3), np.float32) + np.array([0, 0, 1], np.float32)}, None)
    info = [TensorInfo("x", "float32", (None, 3))]
    contract, _ = infer_contract(info, info, ds, max_batch=2)
    report = refusals(contract, {"x": x})
    assert (report.rows, report.refused_rows) == (5, 3)
    assert report.by_reason == {"out_of_range": 2, "nan": 1}
    assert report.by_feature == {"x[2]": {"below": 0, "above": 1}, "x[0]": {"below": 1, "above": 0}}
    line = describe_refusals(report, "inferred")
    assert line is not None
    assert "3 of 5 evaluation rows" in line
    assert "x[2]" in line


# ---------------------------------------------------------------- through the CLI, end to end
def _logistic_onnx(x_train: Array, y_train: Array, softmax: bool) -> bytes:
    """Standardisation folded into the weights: the model reads raw rows, as inferred."""
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    clf = LogisticRegression(max_iter=2000).fit((x_train - mean) / std, y_train)
    coef = clf.coef_ if clf.coef_.shape[0] > 1 else np.vstack([-clf.coef_, clf.coef_]) / 2
    bias = clf.intercept_ if clf.coef_.shape[0] > 1 else np.array([-1, 1]) * clf.intercept_ / 2
    w = (coef / std).T.astype(np.float32)
    b = (bias - (coef / std) @ mean).astype(np.float32)
    k = w.shape[1]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["z"], name="matmul"),
        helper.make_node("Add", ["z", "b"], ["logits"], name="add"),
    ]
    out = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
        out = "probabilities"
    graph = helper.make_graph(
        nodes,
        "tabular",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, w.shape[0]])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [None, k])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("infer") / "keys"
    res = CliRunner().invoke(builder_cli.cli, ["keys", "init", str(path)])
    assert res.exit_code == 0, res.output
    return path


def _build(tmp: Path, keys: Path, model: Path, calib: Path, evaluation: Path) -> dict[str, Any]:
    out = tmp / "out"
    res = CliRunner().invoke(
        builder_cli.cli,
        [
            "build",
            str(model),
            "--calib",
            str(calib),
            "--eval",
            str(evaluation),
            "--name",
            "tabular",
            "--version",
            "1",
            "--keystore",
            str(keys),
            "--out",
            str(out),
            "--mode",
            "dynamic",
            "--max-abs-drop",
            "0.05",
            "--max-rel-drop",
            "0.05",
        ],
    )
    assert res.exit_code == 0, res.output
    manifest = BundleManifest.from_bytes(read_raw(out / "tabular-1.efb").manifest_bytes)
    report = json.loads((out / "tabular-1.report.json").read_text())
    return {"output": res.output, "manifest": manifest, "report": report}


@pytest.mark.parametrize(("softmax", "kind"), [(False, "logits"), (True, "probabilities")])
@pytest.mark.parametrize("dataset", ["breast_cancer", "wine"])
def test_build_without_contract_declares_the_score_kind_and_checks_held_out_rows(
    tmp_path: Path, keys: Path, dataset: str, softmax: bool, kind: str
) -> None:
    x_train, x_test, y_train, y_test = _split(dataset, 0)
    model = tmp_path / "model.onnx"
    model.write_bytes(_logistic_onnx(x_train, y_train, softmax))
    np.savez(tmp_path / "calib.npz", x=x_train[:120])
    np.savez(tmp_path / "eval.npz", x=x_test, y=y_test)
    built = _build(tmp_path, keys, model, tmp_path / "calib.npz", tmp_path / "eval.npz")
    outputs = built["manifest"].outputs
    assert (outputs.task, outputs.score_kind) == ("classification", kind)
    check = built["report"]["contract_check"]
    assert check["source"] == "inferred"
    assert check["rows"] == len(x_test)
    assert check["refused_fraction"] <= 0.02
    assert built["manifest"].report["contract_check"] == check
    assert "contract (inferred): " in built["output"]
    if check["refused_rows"]:
        assert "warning: the inferred contract would refuse" in built["output"]


def test_digits_built_without_contract_reports_what_it_refuses(tmp_path: Path, keys: Path) -> None:
    ex = save_example("digits-mlp", tmp_path / "ex")
    built = _build(tmp_path, keys, ex / "model.onnx", ex / "calib.npz", ex / "eval.npz")
    check = built["report"]["contract_check"]
    assert (check["source"], check["rows"]) == ("inferred", 450)
    assert check["refused_fraction"] <= 0.015
    assert built["manifest"].outputs.score_kind == "probabilities"  # the example ends in Softmax
