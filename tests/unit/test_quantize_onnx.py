"""quantize_onnx on real models with real onnxruntime: modes, targets, opsets, calibration."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_agent.contract.inputs import DimSpec, InputContract, Preprocessing, TensorSpec
from edge_agent.runtime.onnx import OnnxRuntime
from model_builder.errors import InputDataError, ModelCheckError, QuantizationError
from model_builder.quantize.calibration import CalibrationSource, calibration_stats
from model_builder.quantize.for_onnx import detect_target, quantize_onnx
from model_builder.quantize.plan import (
    TARGETS,
    GraphProfile,
    choose_mode,
    strip_unused_opsets,
    target_from_cpu,
)


def _calib(ex, preprocessing=True):
    return CalibrationSource.single(
        ex.input_name, ex.x_calib, ex.preprocessing if preprocessing else None
    )


def _accuracy(model: bytes, ex) -> float:
    rt = OnnxRuntime(model)
    proba = rt.run({ex.input_name: ex.preprocessing.apply(ex.x_eval)})[ex.output_name]
    return float(np.mean(proba.argmax(axis=1) == ex.y_eval))


def _inits(model_bytes: bytes) -> dict[str, np.ndarray]:
    model = onnx.load_from_string(model_bytes)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize(
    ("mode", "max_size_ratio"), [("static", 0.5), ("dynamic", 0.4), ("fp16", 0.55)]
)
def test_modes_load_and_keep_accuracy_on_digits(digits_mlp, mode, max_size_ratio):
    q = quantize_onnx(digits_mlp.model_bytes, _calib(digits_mlp), mode, "x86")
    assert q.recipe.mode == mode
    assert len(q.model_bytes) <= max_size_ratio * len(digits_mlp.model_bytes)
    assert _accuracy(q.model_bytes, digits_mlp) >= digits_mlp.reference_accuracy - 0.01
    assert q.recipe.ort_version
    assert q.recipe.onnx_version


def test_static_is_qdq_with_per_channel_weights_and_float_softmax(digits_mlp):
    q = quantize_onnx(digits_mlp.model_bytes, _calib(digits_mlp), "static", "x86")
    model = onnx.load_from_string(q.model_bytes)
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops
    assert "DequantizeLinear" in ops
    assert q.recipe.per_channel
    assert q.recipe.calibrate_method == "MinMax"
    assert q.recipe.calibration_samples == 200
    assert q.recipe.quant_format == "QDQ"
    assert _inits(q.model_bytes)["fc1.weight_scale"].shape == (64,)  # one scale per channel
    # The probabilities leave the model unquantized: no Q/DQ after Softmax.
    assert model.graph.output[0].name == "probabilities"
    producer = next(n for n in model.graph.node if "probabilities" in n.output)
    assert producer.op_type == "Softmax"
    assert [n.name for n in q.quantizable_nodes] == [
        "fc1/MatMulAddFusion",
        "relu1",
        "fc2/MatMulAddFusion",
    ]


def test_static_cnn_keeps_accuracy(digits_cnn):
    q = quantize_onnx(digits_cnn.model_bytes, _calib(digits_cnn), "static", "x86")
    assert _accuracy(q.model_bytes, digits_cnn) >= digits_cnn.reference_accuracy - 0.01
    assert "conv" in {n.name for n in q.quantizable_nodes}


def test_dynamic_refuses_conv_models(digits_cnn):
    with pytest.raises(QuantizationError, match="Conv"):
        quantize_onnx(digits_cnn.model_bytes, _calib(digits_cnn), "dynamic", "x86")


def test_dynamic_uses_integer_matmuls(digits_mlp):
    q = quantize_onnx(digits_mlp.model_bytes, None, "dynamic", "x86")
    ops = {n.op_type for n in onnx.load_from_string(q.model_bytes).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    assert q.recipe.calibration_samples == 0
    assert q.calibration_stats == {}


def test_dynamic_excludes_gemm_layers_by_their_matmul_name(digits_mlp):
    q = quantize_onnx(digits_mlp.model_bytes, None, "dynamic", "x86")
    names = [n.name for n in q.quantizable_nodes]
    assert names == ["fc1/MatMulAddFusion_MatMul", "fc2/MatMulAddFusion_MatMul"]
    kept = quantize_onnx(digits_mlp.model_bytes, None, "dynamic", "x86", [names[1]])
    nodes = onnx.load_from_string(kept.model_bytes).graph.node
    assert sum(n.op_type == "MatMulInteger" for n in nodes) == 1
    assert any(n.op_type == "MatMul" and n.name == names[1] for n in nodes)


@pytest.mark.parametrize(
    ("target", "act_dtype", "reduce_range"),
    [("x86", np.uint8, True), ("x86-vnni", np.uint8, False), ("arm64", np.int8, False)],
)
def test_target_sets_quantization_types(digits_mlp, target, act_dtype, reduce_range):
    q = quantize_onnx(digits_mlp.model_bytes, _calib(digits_mlp), "static", target)
    model = onnx.load_from_string(q.model_bytes)
    inits = _inits(q.model_bytes)
    act_zps = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert act_zps
    assert all(zp.dtype == act_dtype for zp in act_zps)
    weights = inits["fc1.weight_quantized"]
    assert weights.dtype == np.int8
    assert q.recipe.reduce_range is reduce_range
    # reduce_range means 7-bit weights: it must show in the stored values, not just the recipe.
    assert (int(np.abs(weights.astype(np.int16)).max()) <= 64) is reduce_range
    assert q.recipe.activation_type == TARGETS[target].activation_type


@pytest.mark.parametrize(
    ("flags", "machine", "expected"),
    [
        ("flags : fpu sse avx avx2 fma", "x86_64", "x86"),
        ("flags : avx2 avx512f avx512_vnni", "x86_64", "x86-vnni"),
        ("flags : avx2 avx_vnni", "x86_64", "x86-vnni"),
        ("flags : avx2 amx_int8", "x86_64", "x86-vnni"),
        ("", "AMD64", "x86"),
        ("Features : fp asimd asimddp", "aarch64", "arm64"),
        ("", "arm64", "arm64"),
        ("flags : avx2 avx512_vnni", "aarch64", "arm64"),  # the machine decides the family
        ("flags : avx2 not_vnni_really", "x86_64", "x86"),  # whole tokens only
    ],
)
def test_target_from_cpu(flags, machine, expected):
    assert target_from_cpu(flags, machine) == expected


@pytest.mark.parametrize("machine", ["riscv64", "armv7l", "s390x", ""])
def test_target_from_cpu_refuses_unknown_machines(machine):
    with pytest.raises(QuantizationError, match="explicitly"):
        target_from_cpu("", machine)


def test_detect_target_on_this_host():
    assert detect_target() in TARGETS


def _profile(**kw) -> GraphProfile:
    base = {"op_counts": {}, "has_conv": False, "weight_values": 100, "matmul_weight_share": 1.0}
    return GraphProfile(**(base | kw))


@pytest.mark.parametrize(
    ("requested", "profile", "has_calib", "expected"),
    [
        ("auto", _profile(), True, "static"),
        ("auto", _profile(), False, "dynamic"),
        ("auto", _profile(has_conv=True), True, "static"),
        ("static", _profile(has_conv=True), True, "static"),
        ("dynamic", _profile(matmul_weight_share=0.8), False, "dynamic"),
        ("fp16", _profile(has_conv=True), False, "fp16"),
        ("auto", _profile(has_conv=True), False, InputDataError),
        ("static", _profile(), False, InputDataError),
        ("dynamic", _profile(has_conv=True), True, QuantizationError),
        ("dynamic", _profile(matmul_weight_share=0.5), True, QuantizationError),
        ("int4", _profile(), True, QuantizationError),
    ],
)
def test_choose_mode(requested, profile, has_calib, expected):
    if isinstance(expected, str):
        assert choose_mode(requested, profile, has_calib) == expected
    else:
        with pytest.raises(expected):
            choose_mode(requested, profile, has_calib)


def _tiny_model(extra_opsets=(), node_domain="") -> onnx.ModelProto:
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"], "mm", domain=node_domain)
    graph = helper.make_graph(
        [node],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        initializer=[w],
    )
    opsets = [helper.make_opsetid("", 17), *(helper.make_opsetid(d, 1) for d in extra_opsets)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def test_strip_unused_opsets_keeps_default_and_used_domains():
    model = _tiny_model(extra_opsets=("ai.onnx.ml", "com.microsoft"))
    assert strip_unused_opsets(model) == ("ai.onnx.ml", "com.microsoft")
    assert [o.domain for o in model.opset_import] == [""]
    used = _tiny_model(extra_opsets=("com.microsoft", "ai.onnx.ml"), node_domain="com.microsoft")
    assert strip_unused_opsets(used) == ("ai.onnx.ml",)
    assert sorted(o.domain for o in used.opset_import) == ["", "com.microsoft"]


def test_quantized_model_drops_unused_ai_onnx_ml_import(digits_mlp):
    model = onnx.load_from_string(digits_mlp.model_bytes)
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))
    q = quantize_onnx(model.SerializeToString(), _calib(digits_mlp), "static", "x86")
    assert "ai.onnx.ml" in q.removed_opsets
    assert [o.domain for o in onnx.load_from_string(q.model_bytes).opset_import] == [""]


def test_calibration_runs_through_the_declared_preprocessing(digits_mlp):
    """The input scale must come from preprocessed data, not from raw pixels."""
    pre = digits_mlp.preprocessing.apply(digits_mlp.x_calib)
    q = quantize_onnx(digits_mlp.model_bytes, _calib(digits_mlp), "static", "x86")
    scale = float(_inits(q.model_bytes)["input_scale"])
    expected = (max(0.0, float(pre.max())) - min(0.0, float(pre.min()))) / 255
    assert scale == pytest.approx(expected, rel=1e-3)
    raw = quantize_onnx(digits_mlp.model_bytes, _calib(digits_mlp, False), "static", "x86")
    assert float(_inits(raw.model_bytes)["input_scale"]) == pytest.approx(16 / 255, rel=1e-3)


def test_calibration_stats_flag_missing_normalisation(digits_mlp):
    raw = calibration_stats(_calib(digits_mlp, preprocessing=False))["input"]
    assert raw["looks_unnormalised"]
    assert "normalisation" in raw["hint"]
    assert raw["max"] == 16.0
    ok = quantize_onnx(digits_mlp.model_bytes, _calib(digits_mlp), "static", "x86")
    stats = ok.calibration_stats["input"]
    assert not stats["looks_unnormalised"]
    assert abs(stats["mean"]) < 0.2
    assert {"min", "max", "mean", "std", "p99_abs"} <= stats.keys()


def test_calibration_progress_is_reported(digits_mlp):
    calls = []
    quantize_onnx(
        digits_mlp.model_bytes,
        _calib(digits_mlp),
        "static",
        "x86",
        progress=lambda done, total, label: calls.append((done, total, label)),
    )
    assert calls
    assert calls[-1] == (7, 7, "calibration")


def test_calibration_source_from_contract(digits_mlp):
    spec = TensorSpec(
        "input",
        "float32",
        (DimSpec(None, 1, 8), DimSpec(64)),
        preprocessing=digits_mlp.preprocessing,
    )
    source = CalibrationSource.from_contract({"input": digits_mlp.x_calib}, InputContract((spec,)))
    np.testing.assert_array_equal(
        source.preprocessed("input"), digits_mlp.preprocessing.apply(digits_mlp.x_calib)
    )
    with pytest.raises(InputDataError):
        CalibrationSource.from_contract({"other": digits_mlp.x_calib}, InputContract((spec,)))


@pytest.mark.parametrize(
    "raw",
    [
        {},
        {"a": np.zeros((0, 4))},
        {"a": np.zeros((3, 4)), "b": np.zeros((2, 4))},
        {"a": np.array([[np.nan, 1.0]])},
    ],
)
def test_calibration_source_rejects_bad_data(raw):
    with pytest.raises(InputDataError):
        CalibrationSource(raw)


def test_calibration_must_match_model_inputs(digits_mlp):
    source = CalibrationSource.single("pixels", digits_mlp.x_calib)
    with pytest.raises(InputDataError, match="missing"):
        quantize_onnx(digits_mlp.model_bytes, source, "static", "x86")


def test_bad_preprocessing_is_an_input_data_error(digits_mlp):
    wrong = Preprocessing("affine", (1.0,) * 10, (0.0,) * 10)
    source = CalibrationSource.single("input", digits_mlp.x_calib, wrong)
    with pytest.raises(InputDataError, match="10 values for 64 features"):
        quantize_onnx(digits_mlp.model_bytes, source, "static", "x86")


@pytest.mark.parametrize("blob", [b"not a model", b""])
def test_unparseable_model_is_a_model_check_error(blob, digits_mlp):
    with pytest.raises(ModelCheckError):
        quantize_onnx(blob, _calib(digits_mlp), "static", "x86")


def test_invalid_graph_is_a_model_check_error():
    model = _tiny_model()
    model.graph.node[0].input[1] = "missing_weight"
    x = CalibrationSource.single("x", np.ones((4, 4), dtype=np.float32))
    with pytest.raises(ModelCheckError, match=r"onnx\.checker"):
        quantize_onnx(model.SerializeToString(), x, "static", "x86")


def test_unknown_target_and_nodes_are_refused(digits_mlp):
    with pytest.raises(QuantizationError, match="unknown target"):
        quantize_onnx(digits_mlp.model_bytes, _calib(digits_mlp), "static", "riscv")
    with pytest.raises(QuantizationError, match="softmax"):
        quantize_onnx(digits_mlp.model_bytes, _calib(digits_mlp), "static", "x86", ["softmax"])


def test_fp16_halves_weights_and_keeps_float32_io(digits_mlp):
    q = quantize_onnx(digits_mlp.model_bytes, None, "fp16", "x86")
    model = onnx.load_from_string(q.model_bytes)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert _inits(q.model_bytes)["fc1.weight"].dtype == np.float16
    kept = quantize_onnx(digits_mlp.model_bytes, None, "fp16", "x86", ["fc1"])
    assert _inits(kept.model_bytes)["fc1.weight"].dtype == np.float32
