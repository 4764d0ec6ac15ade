"""The example models are real: trained, accurate, and the ONNX graphs compute what was trained."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from edge_agent.contract.inputs import InputContract, OutputContract
from edge_agent.runtime.onnx import OnnxRuntime
from model_builder import examples
from model_builder.errors import InputDataError
from model_builder.quantize.plan import profile_graph


def _run(model: bytes, ex: examples.ExampleModel) -> np.ndarray:
    rt = OnnxRuntime(model)
    return rt.run({ex.input_name: ex.preprocessing.apply(ex.x_eval)})[ex.output_name]


def _accuracy(proba: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(proba.argmax(axis=1) == y))


@pytest.mark.parametrize(
    ("fixture", "min_accuracy"),
    [("digits_mlp", 0.95), ("digits_cnn", 0.95), ("digits_wide_mlp", 0.95)],
)
def test_onnx_graph_computes_the_trained_model(fixture, min_accuracy, request):
    ex = request.getfixturevalue(fixture)
    proba = _run(ex.model_bytes, ex)
    np.testing.assert_allclose(proba, ex.reference_eval_proba, atol=1e-5)
    assert _accuracy(proba, ex.y_eval) >= min_accuracy
    onnx.checker.check_model(onnx.load_from_string(ex.model_bytes), full_check=True)


def test_splits_are_disjoint_raw_pixels(digits_mlp):
    ex = digits_mlp
    assert len(ex.x_calib) == 200
    assert len(ex.x_eval) == 450
    assert ex.x_train.min() >= 0
    assert ex.x_train.max() <= 16
    rows = {r.tobytes() for r in ex.x_eval}
    # load_digits has a few duplicate images; the splits must not share more than those.
    assert sum(r.tobytes() in rows for r in ex.x_calib) <= 2
    assert set(np.unique(ex.y_eval)) == set(range(10))


def test_mlp_declares_standardisation_as_preprocessing(digits_mlp):
    x = digits_mlp.preprocessing.apply(digits_mlp.x_train)
    assert abs(float(x.mean())) < 0.05
    assert digits_mlp.preprocessing.kind == "affine"
    assert len(digits_mlp.preprocessing.scale) == 64
    assert float(np.abs(x).max()) < 20  # std floor keeps rare pixels from exploding


def test_cnn_structure(digits_cnn):
    model = onnx.load_from_string(digits_cnn.model_bytes)
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["Conv", "Relu", "MaxPool", "Flatten", "Gemm", "Relu", "Gemm", "Softmax"]
    assert digits_cnn.x_eval.shape[1:] == (1, 8, 8)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    assert dims == [1, 8, 8]


def test_cnn_numpy_features_equal_the_onnx_conv_block(digits_cnn):
    """The head was trained on numpy features; they must be what the graph computes."""
    model = onnx.load_from_string(digits_cnn.model_bytes)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    model.graph.output.append(
        helper.make_tensor_value_info("flatten.out", onnx.TensorProto.FLOAT, None)
    )
    rt = OnnxRuntime(model.SerializeToString())
    x = digits_cnn.preprocessing.apply(digits_cnn.x_eval)
    onnx_feats = rt.run({"input": x})["flatten.out"]
    filters = inits["conv.weight"].reshape(len(inits["conv.bias"]), 9)
    numpy_feats = examples.cnn_features(x, filters, inits["conv.bias"])
    assert numpy_feats.shape == (len(x), 16 * 16)
    np.testing.assert_allclose(onnx_feats, numpy_feats, atol=1e-5)
    assert (numpy_feats > 0).mean() > 0.1  # the features are not trivially zero


def test_cnn_training_is_deterministic(digits_cnn):
    assert examples.digits_cnn().model_bytes == digits_cnn.model_bytes


def test_outlier_model_is_the_mlp_plus_a_constant_channel(digits_outlier_mlp, digits_mlp):
    np.testing.assert_allclose(
        _run(digits_outlier_mlp.model_bytes, digits_outlier_mlp),
        _run(digits_mlp.model_bytes, digits_mlp),
        atol=1e-5,
    )
    model = onnx.load_from_string(digits_outlier_mlp.model_bytes)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert inits["outlier.value"].max() >= 1000
    assert [n.name for n in model.graph.node if n.op_type == "Add"][-1] == "fc2_bias"
    assert "outlier" in [n.name for n in model.graph.node]


def test_wide_mlp_is_big_and_matmul_dominated(digits_wide_mlp):
    assert digits_wide_mlp.num_parameters >= 1_000_000
    profile = profile_graph(onnx.load_from_string(digits_wide_mlp.model_bytes))
    assert profile.matmul_dominated
    assert not profile.has_conv


def test_models_load_in_older_runtimes_opset(digits_mlp, digits_cnn):
    for ex in (digits_mlp, digits_cnn):
        model = onnx.load_from_string(ex.model_bytes)
        assert model.ir_version == 8
        assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]


def test_save_example_writes_what_the_cli_reads(tmp_path):
    out = examples.save_example("digits-mlp", tmp_path / "ex")
    model = onnx.load(str(out / "model.onnx"))
    assert model.graph.input[0].name == "input"
    with np.load(out / "calib.npz") as calib:
        assert calib.files == ["input"]
        assert calib["input"].shape == (200, 64)
    with np.load(out / "eval.npz") as ev:
        assert sorted(ev.files) == ["input", "y"]
        assert len(ev["y"]) == 450
    contract = json.loads((out / "contract.json").read_text())
    inputs = InputContract.from_dict(contract["inputs"])
    outputs = OutputContract.from_dict(contract["outputs"])
    assert inputs.tensor("input").preprocessing.kind == "affine"
    assert outputs.task == "classification"
    assert outputs.labels == examples.LABELS
    assert not list(out.glob(".*.tmp"))  # no temp files left behind


def test_save_example_rejects_unknown_names(tmp_path):
    with pytest.raises(InputDataError, match="unknown example"):
        examples.save_example("imagenet", tmp_path)
