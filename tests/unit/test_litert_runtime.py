"""LiteRtRuntime on the real LiteRT interpreter and the committed digits fixtures.

References are TensorFlow-free: the MLP is recomputed in numpy from its saved weights, the CNN
is compared with the Keras outputs recorded when the fixture was built
(tests/fixtures/tflite/make_tflite_fixtures.py).
"""

from __future__ import annotations

import sys
import types
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert.interpreter")

from ai_edge_litert import interpreter as litert_interpreter
from sklearn.datasets import load_digits

from edge_agent.errors import InferenceError, ModelLoadError, RuntimeUnavailableError
from edge_agent.runtime.base import Runtime, RuntimeOptions, TensorInfo
from edge_agent.runtime.litert import LiteRtRuntime, _Binding, _from_native, _to_native
from edge_agent.runtime.loader import load_runtime

pytestmark = pytest.mark.tflite

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tflite"
INPUT = "serving_default_pixels:0"
OUTPUT = "PartitionedCall:0"


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "digits_reference.npz") as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def heldout(reference: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The held-out split, preprocessed as the fixtures were trained: pixels / 16."""
    digits = load_digits()
    idx = reference["test_indices"]
    x = (digits.data.astype(np.float32) / 16.0).astype(np.float32)
    return x[idx], digits.target[idx]


def _blob(name: str) -> bytes:
    return (FIXTURES / f"{name}.tflite").read_bytes()


def _feed(name: str, x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, 8, 8, 1) if name == "digits_cnn" else x


def _numpy_mlp(ref: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = np.maximum(x @ ref["mlp_w1"] + ref["mlp_b1"], 0.0)
    z = h @ ref["mlp_w2"] + ref["mlp_b2"]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
def test_fixtures_stay_small(name: str) -> None:
    assert len(_blob(name)) < 200_000


def test_describes_itself_as_a_runtime() -> None:
    rt = LiteRtRuntime(_blob("digits_mlp"), RuntimeOptions())
    assert isinstance(rt, Runtime)
    assert rt.name == "litert"
    assert rt.version == metadata.version("ai-edge-litert")
    assert [(i.name, i.dtype, i.shape) for i in rt.inputs] == [(INPUT, "float32", (None, 64))]
    assert [(o.name, o.dtype, o.shape) for o in rt.outputs] == [(OUTPUT, "float32", (None, 10))]


def test_cnn_describes_its_image_input() -> None:
    rt = load_runtime(_blob("digits_cnn"), "tflite")
    assert isinstance(rt, LiteRtRuntime)
    assert rt.inputs[0].shape == (None, 8, 8, 1)


def test_mlp_equals_numpy_reference(
    reference: dict[str, np.ndarray], heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = heldout
    rt = LiteRtRuntime(_blob("digits_mlp"), RuntimeOptions())
    out = rt.run({INPUT: x})[OUTPUT]
    assert out.dtype == np.float32
    assert out.shape == (len(x), 10)
    np.testing.assert_allclose(out, _numpy_mlp(reference, x), atol=1e-5)
    np.testing.assert_allclose(out, reference["mlp_keras_probs"], atol=1e-5)


def test_cnn_equals_keras_outputs(
    reference: dict[str, np.ndarray], heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = heldout
    rt = LiteRtRuntime(_blob("digits_cnn"), RuntimeOptions())
    out = rt.run({INPUT: _feed("digits_cnn", x)})[OUTPUT]
    np.testing.assert_allclose(out, reference["cnn_keras_probs"], atol=1e-5)


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
def test_heldout_accuracy_is_high(name: str, heldout: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = heldout
    rt = LiteRtRuntime(_blob(name), RuntimeOptions())
    probs = rt.run({INPUT: _feed(name, x)})[OUTPUT]
    assert float(np.mean(probs.argmax(axis=1) == y)) > 0.90
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
def test_batch_resize_1_and_64_give_the_same_rows(
    name: str, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = heldout
    x = _feed(name, x[:64])
    rt = LiteRtRuntime(_blob(name), RuntimeOptions(warmup_runs=0))
    singles = np.concatenate([rt.run({INPUT: x[i : i + 1]})[OUTPUT] for i in range(64)])
    batch = rt.run({INPUT: x})[OUTPUT]
    again = rt.run({INPUT: x[:1]})[OUTPUT]
    odd = rt.run({INPUT: x[:7]})[OUTPUT]
    assert batch.shape == (64, 10)
    assert again.shape == (1, 10)
    assert odd.shape == (7, 10)
    np.testing.assert_allclose(batch, singles, atol=1e-5)
    np.testing.assert_allclose(again, singles[:1], atol=1e-5)
    np.testing.assert_allclose(odd, singles[:7], atol=1e-5)


def test_same_batch_does_not_reallocate(
    monkeypatch: pytest.MonkeyPatch, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    calls = {"allocate": 0, "resize": 0}
    cls = litert_interpreter.Interpreter
    real_allocate, real_resize = cls.allocate_tensors, cls.resize_tensor_input

    def allocate(self: Any) -> Any:
        calls["allocate"] += 1
        return real_allocate(self)

    def resize(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["resize"] += 1
        return real_resize(self, *args, **kwargs)

    monkeypatch.setattr(cls, "allocate_tensors", allocate)
    monkeypatch.setattr(cls, "resize_tensor_input", resize)
    x, _ = heldout
    rt = LiteRtRuntime(_blob("digits_mlp"), RuntimeOptions(warmup_runs=3))
    assert calls == {"allocate": 1, "resize": 0}  # load only; batch-1 warm-up fits as loaded
    for _ in range(5):
        rt.run({INPUT: x[:64]})
    assert calls == {"allocate": 2, "resize": 1}
    rt.run({INPUT: x[:1]})
    rt.run({INPUT: x[:1]})
    assert calls == {"allocate": 3, "resize": 2}


@pytest.mark.parametrize("threads", [0, 1, 2])
def test_thread_options_load_and_run(threads: int, heldout: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = heldout
    rt = LiteRtRuntime(_blob("digits_mlp"), RuntimeOptions(intra_op_threads=threads))
    assert rt.run({INPUT: x[:5]})[OUTPUT].shape == (5, 10)


def test_float64_feed_is_accepted_as_float32(
    reference: dict[str, np.ndarray], heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = heldout
    rt = LiteRtRuntime(_blob("digits_mlp"), RuntimeOptions())
    out = rt.run({INPUT: x[:10].astype(np.float64)})[OUTPUT]
    np.testing.assert_allclose(out, _numpy_mlp(reference, x[:10]), atol=1e-5)


@pytest.mark.parametrize(
    "artifact",
    [
        b"",
        b"not a flatbuffer at all",
        b"TFL3" * 64,
        pytest.param("truncated", id="truncated"),
        pytest.param("zeroed", id="zeroed-body"),
    ],
)
def test_bad_model_bytes_raise_model_load_error(artifact: bytes | str) -> None:
    good = _blob("digits_mlp")
    if artifact == "truncated":
        artifact = good[: len(good) // 2]
    elif artifact == "zeroed":
        artifact = good[:8] + bytes(len(good) - 8)
    assert isinstance(artifact, bytes)
    with pytest.raises(ModelLoadError):
        LiteRtRuntime(artifact, RuntimeOptions())
    with pytest.raises(ModelLoadError):
        load_runtime(artifact, "tflite")


@pytest.mark.parametrize(
    "feeds",
    [
        pytest.param({INPUT: np.zeros(64, np.float32)}, id="rank-1"),
        pytest.param({INPUT: np.zeros((1, 1, 64), np.float32)}, id="rank-3"),
        pytest.param({INPUT: np.zeros((1, 63), np.float32)}, id="63-features"),
        pytest.param({INPUT: np.zeros((4, 65), np.float32)}, id="65-features"),
        pytest.param({INPUT: np.array([["a"] * 64])}, id="strings"),
        pytest.param({INPUT: [[0.0] * 64, [0.0] * 3]}, id="ragged-list"),
        pytest.param({}, id="missing-input"),
        pytest.param({"pixels": np.zeros((1, 64), np.float32)}, id="wrong-name"),
        pytest.param(
            {INPUT: np.zeros((1, 64), np.float32), "extra": np.zeros(1, np.float32)},
            id="unknown-extra",
        ),
    ],
)
def test_wrong_feeds_raise_inference_error(feeds: dict[str, np.ndarray]) -> None:
    rt = LiteRtRuntime(_blob("digits_mlp"), RuntimeOptions())
    with pytest.raises(InferenceError):
        rt.run(feeds)
    # The runtime keeps serving after a bad request.
    assert rt.run({INPUT: np.zeros((2, 64), np.float32)})[OUTPUT].shape == (2, 10)


def test_cnn_wrong_image_shape_raises_inference_error() -> None:
    rt = LiteRtRuntime(_blob("digits_cnn"), RuntimeOptions())
    with pytest.raises(InferenceError):
        rt.run({INPUT: np.zeros((1, 8, 8, 3), np.float32)})
    with pytest.raises(InferenceError):
        rt.run({INPUT: np.zeros((1, 64), np.float32)})


def test_run_after_close_raises_inference_error() -> None:
    rt = LiteRtRuntime(_blob("digits_mlp"), RuntimeOptions())
    rt.close()
    with pytest.raises(InferenceError):
        rt.run({INPUT: np.zeros((1, 64), np.float32)})


def test_falls_back_to_tflite_runtime(
    monkeypatch: pytest.MonkeyPatch, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    # A stand-in tflite_runtime package whose Interpreter is LiteRT's: same Python API.
    fake_pkg = types.ModuleType("tflite_runtime")
    fake_mod = types.ModuleType("tflite_runtime.interpreter")
    fake_mod.Interpreter = litert_interpreter.Interpreter  # type: ignore[attr-defined]
    fake_pkg.interpreter = fake_mod  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", fake_pkg)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fake_mod)
    x, _ = heldout
    rt = LiteRtRuntime(_blob("digits_mlp"), RuntimeOptions())
    assert rt.run({INPUT: x[:3]})[OUTPUT].shape == (3, 10)


def test_no_interpreter_installed_raises_runtime_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", None)
    with pytest.raises(RuntimeUnavailableError, match="ai-edge-litert"):
        LiteRtRuntime(_blob("digits_mlp"), RuntimeOptions())


def test_quantized_tensor_conversion_rounds_clips_and_passes_integers_through() -> None:
    # The path integer-I/O models take; end to end it runs in test_quantize_tflite.py.
    b = _Binding("x", 0, np.dtype(np.int8), scale=0.5, zero_point=-10)
    info = TensorInfo("x", "float32", (None, 4))
    feed = np.array([[0.25, -0.25, 1000.0, -1000.0]], np.float32)
    # 0.25 / 0.5 = 0.5 rounds away from zero to 1 (TFLite), not to 0 (numpy's half-even).
    np.testing.assert_array_equal(_to_native(b, feed, info), [[-9, -11, 127, -128]])
    raw = np.array([[-10, 0, 127, -128]], np.int8)
    np.testing.assert_array_equal(_to_native(b, raw, info), raw)
    out = _from_native(b, raw)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 5.0, 68.5, -59.0]])
    unquantized = _Binding("y", 1, np.dtype(np.int8), scale=0.0, zero_point=0)
    assert _from_native(unquantized, raw) is raw


# ------------------------------------------------ precomputed conversions vs the previous code
def _previous_to_native(binding: _Binding, arr: np.ndarray) -> np.ndarray:
    """The adapter's float -> integer conversion before it was precomputed (verbatim)."""
    info_int = np.iinfo(binding.dtype)
    scaled = arr.astype(np.float32) / np.float32(binding.scale)
    q = np.copysign(np.floor(np.abs(scaled) + np.float32(0.5)), scaled)
    q += np.float32(binding.zero_point)
    return np.clip(q, info_int.min, info_int.max).astype(binding.dtype)


def _previous_from_native(binding: _Binding, value: np.ndarray) -> np.ndarray:
    return (value.astype(np.float32) - np.float32(binding.zero_point)) * np.float32(binding.scale)


def _golden_feeds(scale: float, zero_point: int, dtype: np.dtype) -> list[np.ndarray]:
    """Random values, every rounding tie and its float32 neighbours, range edges, infinities,
    as small (threshold search) and large (in-place formula) feeds, float32 and float64."""
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype)
    k = np.arange(info.min - 3, info.max + 4, dtype=np.float64) - zero_point
    ties = ((k + 0.5) * scale).astype(np.float32)
    near = np.concatenate(
        [ties, np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf))]
    )
    span = (info.max - info.min) * scale
    special = np.array([0.0, -0.0, np.inf, -np.inf, 1e30, -1e30], np.float32)
    values = np.concatenate(
        [near, special, rng.uniform(-span, span, 5000).astype(np.float32)]
    ).astype(np.float32)
    feeds = [values[i : i + 64].reshape(1, 64) for i in range(0, len(values) - 64, 64)]
    feeds += [values.reshape(-1, 1)[: (len(values) // 64) * 64].reshape(-1, 64)]
    feeds += [rng.uniform(-span, span, (3, 16)), rng.uniform(-span, span, (300, 8))]  # float64
    return feeds


@pytest.mark.parametrize(
    ("dtype", "scale", "zero_point"),
    [
        (np.int8, 0.0039107054471969604, -128),  # the digits MLP's input
        (np.int8, 0.5, -10),
        (np.int8, 0.021, 3),
        (np.uint8, 0.0078125, 128),
        (np.uint8, 1.7, 0),
        (np.int16, 0.000123, 0),
    ],
)
def test_precomputed_conversions_equal_the_previous_implementation(
    dtype: type, scale: float, zero_point: int
) -> None:
    b = _Binding("x", 0, np.dtype(dtype), scale=scale, zero_point=zero_point)
    for feed in _golden_feeds(scale, zero_point, np.dtype(dtype)):
        info = TensorInfo("x", "float32", (None, feed.shape[1]))
        got = _to_native(b, feed, info)
        want = _previous_to_native(b, feed)
        assert got.dtype == want.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, want)
    info_int = np.iinfo(dtype)
    every = np.arange(info_int.min, info_int.max + 1, dtype=np.int64).astype(dtype).reshape(1, -1)
    for out in (every, every.reshape(-1, 1)[:300], every[:, :5]):
        got_f = _from_native(b, out)
        assert got_f.dtype == np.float32
        np.testing.assert_array_equal(got_f, _previous_from_native(b, out))


@pytest.mark.filterwarnings("ignore:Warning. Enabling .experimental_preserve_all_tensors")
def test_int8_model_answers_as_before_end_to_end(heldout: tuple[np.ndarray, np.ndarray]) -> None:
    """Same outputs, bit for bit, from an integer-I/O model with the old and new conversions."""
    pytest.importorskip("ai_edge_quantizer")
    from model_builder.quantize.for_tflite import quantize_tflite

    x, _ = heldout
    samples = [{"pixels": x[i : i + 1]} for i in range(0, len(x), 4)]
    model = quantize_tflite(_blob("digits_mlp"), "static_wi8_ai8", samples, float_io=False).model
    rt = LiteRtRuntime(model, RuntimeOptions())
    (b_in,), (b_out,) = rt._in, rt._out
    interp = litert_interpreter.Interpreter(model_content=model)
    interp.allocate_tensors()
    for rows in (x[:1], x[7:8], x[:64], x):
        got = rt.run({INPUT: rows})[OUTPUT]
        interp.resize_tensor_input(b_in.index, list(rows.shape), strict=False)
        interp.allocate_tensors()
        interp.set_tensor(b_in.index, _previous_to_native(b_in, rows))
        interp.invoke()
        want = _previous_from_native(b_out, interp.get_tensor(b_out.index))
        np.testing.assert_array_equal(got, want)
