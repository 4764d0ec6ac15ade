"""quantize_tflite with the real AI Edge Quantizer on the float digits MLP fixture.

Quantized models run in the real LiteRtRuntime; agreement is measured against the float model
on all 1,797 digits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert.interpreter")
pytest.importorskip("ai_edge_quantizer")

from ai_edge_litert import interpreter as litert_interpreter
from sklearn.datasets import load_digits

from edge_agent.runtime.base import RuntimeOptions
from edge_agent.runtime.litert import LiteRtRuntime
from model_builder.errors import InputDataError, ModelCheckError, QuantizationError
from model_builder.quantize.for_tflite import RECIPES, TfliteQuantResult, quantize_tflite

pytestmark = [
    pytest.mark.tflite,
    # The quantizer's calibration interpreter keeps all tensors and LiteRT warns about it.
    pytest.mark.filterwarnings("ignore:.*experimental_preserve_all_tensors.*:UserWarning"),
]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tflite"
INPUT = "serving_default_pixels:0"
OUTPUT = "PartitionedCall:0"


@pytest.fixture(scope="module")
def float_mlp() -> bytes:
    return (FIXTURES / "digits_mlp.tflite").read_bytes()


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All digits preprocessed (pixels / 16), labels, and the fixture's held-out indices."""
    d = load_digits()
    with np.load(FIXTURES / "digits_reference.npz") as npz:
        test_idx = npz["test_indices"]
    return (d.data.astype(np.float32) / 16.0).astype(np.float32), d.target, test_idx


@pytest.fixture(scope="module")
def calibration(digits: tuple[np.ndarray, np.ndarray, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Batch-1 samples from the training rows only, keyed by the signature input name."""
    x, _, test_idx = digits
    train = np.setdiff1d(np.arange(len(x)), test_idx)[::4]
    return [{"pixels": x[i : i + 1]} for i in train]


@pytest.fixture(scope="module")
def float_probs(float_mlp: bytes, digits: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    x, _, _ = digits
    return LiteRtRuntime(float_mlp, RuntimeOptions()).run({INPUT: x})[OUTPUT]


@pytest.fixture(scope="module", params=RECIPES)
def quantized(
    request: pytest.FixtureRequest, float_mlp: bytes, calibration: list[dict[str, np.ndarray]]
) -> TfliteQuantResult:
    return quantize_tflite(float_mlp, request.param, calibration)


def test_weights_shrink_to_at_most_035x(
    quantized: TfliteQuantResult, float_mlp: bytes, calibration: list[dict[str, np.ndarray]]
) -> None:
    report = quantized.report
    assert report.recipe in RECIPES
    assert report.float_bytes == len(float_mlp)
    assert report.quantized_bytes == len(quantized.model)
    # 2,410 float32 weights and biases = 9,640 bytes of constant data.
    assert report.float_weight_bytes == 9640
    assert report.weight_ratio <= 0.35
    # The whole file shrinks less: ~1.5 KB of flatbuffer structure and quantization
    # parameters does not, and dominates a model this small.
    assert report.size_ratio < 0.5
    d = report.to_dict()
    assert d["recipe"] == report.recipe
    assert d["quantizer"] == "ai-edge-quantizer"
    assert d["calibration_samples"] == (
        0 if report.recipe.startswith("dynamic") else len(calibration)
    )


def test_quantized_model_runs_and_agrees_with_float(
    quantized: TfliteQuantResult,
    digits: tuple[np.ndarray, np.ndarray, np.ndarray],
    float_probs: np.ndarray,
) -> None:
    x, y, test_idx = digits
    rt = LiteRtRuntime(quantized.model, RuntimeOptions())
    assert [(i.name, i.dtype) for i in rt.inputs] == [(INPUT, "float32")]
    assert [(o.name, o.dtype) for o in rt.outputs] == [(OUTPUT, "float32")]
    probs = rt.run({INPUT: x})[OUTPUT]
    assert probs.dtype == np.float32
    agreement = float(np.mean(probs.argmax(axis=1) == float_probs.argmax(axis=1)))
    assert agreement >= 0.97
    assert float(np.mean(probs[test_idx].argmax(axis=1) == y[test_idx])) > 0.90
    # Batch 1 and the big batch give the same rows.
    one = rt.run({INPUT: x[5:6]})[OUTPUT]
    np.testing.assert_allclose(one, probs[5:6], atol=1e-2)


def test_static_recipe_has_integer_io_that_the_runtime_hides(
    float_mlp: bytes,
    calibration: list[dict[str, np.ndarray]],
    digits: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    result = quantize_tflite(float_mlp, "static_wi8_ai8", calibration, float_io=False)
    assert result.report.float_io_tensors == 0
    interp = litert_interpreter.Interpreter(model_content=result.model)
    (inp,) = interp.get_input_details()
    (out,) = interp.get_output_details()
    assert inp["dtype"] == np.int8
    assert out["dtype"] == np.int8
    scale, zero_point = inp["quantization"]
    assert scale > 0

    x, _, _ = digits
    rt = LiteRtRuntime(result.model, RuntimeOptions())
    from_float = rt.run({INPUT: x[:32]})[OUTPUT]
    pre_quantized = np.clip(np.floor(x[:32] / scale + 0.5) + zero_point, -128, 127).astype(np.int8)
    from_int8 = rt.run({INPUT: pre_quantized})[OUTPUT]
    np.testing.assert_array_equal(from_float, from_int8)
    assert from_float.dtype == np.float32
    assert float(from_float.min()) >= 0.0
    assert float(from_float.max()) <= 1.0


@pytest.mark.parametrize("fixture", ["digits_mlp", "digits_cnn"])
def test_static_recipe_gets_float_io_with_the_same_answers(
    fixture: str, digits: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    x, _, test_idx = digits
    if fixture == "digits_cnn":
        x = x.reshape(-1, 8, 8, 1)
    model = (FIXTURES / f"{fixture}.tflite").read_bytes()
    samples = [{"pixels": x[i : i + 1]} for i in range(0, len(x), 8)]
    int_io = quantize_tflite(model, "static_wi8_ai8", samples, float_io=False)
    float_io = quantize_tflite(model, "static_wi8_ai8", samples)
    assert float_io.report.float_io_tensors == 2
    assert float_io.report.to_dict()["float_io_tensors"] == 2
    interp = litert_interpreter.Interpreter(model_content=float_io.model)
    (inp,), (out,) = interp.get_input_details(), interp.get_output_details()
    assert (inp["name"], inp["dtype"]) == (INPUT, np.float32)
    assert (out["name"], out["dtype"]) == (OUTPUT, np.float32)
    assert int(inp["shape_signature"][0]) == -1  # dynamic batch kept
    assert interp.get_signature_list() == {
        "serving_default": {"inputs": ["pixels"], "outputs": ["probabilities"]}
    }
    # The interpreter's QUANTIZE/DEQUANTIZE give what the adapter's conversions gave.
    held_out = x[test_idx]
    a = LiteRtRuntime(int_io.model, RuntimeOptions()).run({INPUT: held_out})[OUTPUT]
    b = LiteRtRuntime(float_io.model, RuntimeOptions()).run({INPUT: held_out})[OUTPUT]
    np.testing.assert_allclose(a, b, atol=1 / 256)
    assert float(np.mean(a.argmax(axis=1) == b.argmax(axis=1))) >= 0.99
    # Calibration through the rewritten model is not needed: a float model stays untouched.
    from model_builder.quantize.tflite_io import float_io as rewrite

    assert rewrite(model) == (model, 0)
    for junk in (b"", b"junk", b"TFL3" * 64):
        with pytest.raises(QuantizationError):
            rewrite(junk)


def test_calibration_accepts_tensor_names(
    float_mlp: bytes, calibration: list[dict[str, np.ndarray]]
) -> None:
    by_signature = quantize_tflite(float_mlp, "static_wi8_ai8", calibration)
    by_tensor = quantize_tflite(
        float_mlp, "static_wi8_ai8", [{INPUT: s["pixels"]} for s in calibration]
    )
    assert by_tensor.model == by_signature.model


def test_float64_calibration_is_cast(
    float_mlp: bytes, calibration: list[dict[str, np.ndarray]]
) -> None:
    as64 = [{"pixels": s["pixels"].astype(np.float64)} for s in calibration]
    assert (
        quantize_tflite(float_mlp, "static_wi8_ai8", as64).model
        == quantize_tflite(float_mlp, "static_wi8_ai8", calibration).model
    )


def test_unknown_recipe_raises_quantization_error(float_mlp: bytes) -> None:
    with pytest.raises(QuantizationError, match="dynamic_wi8_afp32"):
        quantize_tflite(float_mlp, "int4_everything")


@pytest.mark.parametrize(
    "samples",
    [
        pytest.param(None, id="none"),
        pytest.param([], id="empty"),
        pytest.param([{"image": np.zeros((1, 64), np.float32)}], id="unknown-input"),
        pytest.param([{}], id="missing-input"),
    ],
)
def test_static_without_usable_calibration_raises_input_data_error(
    float_mlp: bytes, samples: list[dict[str, np.ndarray]] | None
) -> None:
    with pytest.raises(InputDataError):
        quantize_tflite(float_mlp, "static_wi8_ai8", samples)


def test_dynamic_ignores_calibration_data(float_mlp: bytes) -> None:
    result = quantize_tflite(float_mlp, "dynamic_wi8_afp32", [{"whatever": np.zeros(3)}])
    assert result.report.calibration_samples == 0


def test_unknown_signature_raises_quantization_error(
    float_mlp: bytes, calibration: list[dict[str, np.ndarray]]
) -> None:
    with pytest.raises(QuantizationError, match="serving_default"):
        quantize_tflite(float_mlp, "static_wi8_ai8", calibration, signature_key="predict")


@pytest.mark.parametrize("blob", [b"", b"not a model", b"TFL3" * 64])
@pytest.mark.parametrize("recipe", RECIPES)
def test_unreadable_float_model_raises_model_check_error(blob: bytes, recipe: str) -> None:
    with pytest.raises(ModelCheckError):
        quantize_tflite(blob, recipe, [{"pixels": np.zeros((1, 64), np.float32)}])


def test_missing_quantizer_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, float_mlp: bytes
) -> None:
    monkeypatch.setitem(sys.modules, "ai_edge_quantizer", None)
    with pytest.raises(QuantizationError, match=r"edgefleet\[tflite-quant\]"):
        quantize_tflite(float_mlp, "dynamic_wi8_afp32")
