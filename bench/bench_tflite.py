"""TFLite float vs static int8: through the agent's runtime adapter and on the bare interpreter.

Quantizes the committed digits fixtures (tests/fixtures/tflite) with AI Edge Quantizer's
``static_wi8_ai8`` recipe, as the builder does (float32 I/O with QUANTIZE/DEQUANTIZE in the graph,
``model_builder.quantize.tflite_io``) and as it did before (int8 input and output tensors), then
times, in
alternating rounds of the same run so that machine load hits every variant alike:

* ``adapter float``: ``LiteRtRuntime.run`` on the float model (what the agent calls);
* ``adapter int8``: ``LiteRtRuntime.run`` on the int8 model the builder now makes (float I/O);
* ``adapter int8 int-I/O``: on an int8 model with int8 I/O (bundles built before), float feeds
  converted by the adapter's precomputed conversions (``edge_agent.runtime.quantization``);
* ``adapter int8 int-I/O, formula``: the same with the element-wise formulas the adapter used
  before (``quantize_formula`` and ``(q - zp) * scale`` per call);
* ``bare float`` / ``bare int8``: ``set_tensor`` + ``invoke`` + ``get_tensor`` on an interpreter
  with an already converted input (the int8 model with int8 I/O: no conversion at all).

Prints, per model and batch size, the median over rounds of the mean time per call, and the
median over rounds of each variant's time divided by float's time *in the same round* (paired,
so that load from other processes drifting between rounds cancels). Rounds are short and many,
and the order of the variants rotates from round to round. One interpreter thread, as the
agent's default. Run:

    .venv/bin/python bench/bench_tflite.py [--rounds 41] [--calls 400] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.datasets import load_digits

from edge_agent.runtime.base import RuntimeOptions
from edge_agent.runtime.litert import LiteRtRuntime, _Binding
from edge_agent.runtime.quantization import quantize_formula

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tflite"
MODELS = {"digits_mlp": (64,), "digits_cnn": (8, 8, 1)}


def _digits(shape: tuple[int, ...]) -> np.ndarray:
    x = (load_digits().data.astype(np.float32) / 16.0).astype(np.float32)
    return x.reshape((-1, *shape))


def _quantized(name: str, x: np.ndarray, float_io: bool) -> bytes:
    from model_builder.quantize.for_tflite import quantize_tflite

    float_model = (FIXTURES / f"{name}.tflite").read_bytes()
    calibration = [{"pixels": x[i : i + 1]} for i in range(0, len(x), 8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_tflite(float_model, "static_wi8_ai8", calibration, float_io=float_io).model


def _with_formula(runtime: LiteRtRuntime) -> LiteRtRuntime:
    """Swap the precomputed converters for the per-call formulas (the previous adapter)."""
    for binding in (*runtime._in, *runtime._out):
        if not binding.quantized:
            continue
        scale, zp, dtype = binding.scale, binding.zero_point, binding.dtype

        def quantize(x: np.ndarray, s: float = scale, z: int = zp, d: Any = dtype) -> np.ndarray:
            return quantize_formula(x, s, z, d)

        def dequantize(q: np.ndarray, s: float = scale, z: int = zp) -> np.ndarray:
            return (q.astype(np.float32) - np.float32(z)) * np.float32(s)

        object.__setattr__(binding, "quantize", quantize)
        object.__setattr__(binding, "dequantize", dequantize)
    return runtime


def _bare(model: bytes, feed: np.ndarray) -> Callable[[], Any]:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=model, num_threads=1)
    detail = interp.get_input_details()[0]
    out_index = interp.get_output_details()[0]["index"]
    interp.resize_tensor_input(detail["index"], list(feed.shape), strict=False)
    interp.allocate_tensors()
    binding = _Binding("x", 0, np.dtype(detail["dtype"]), *detail["quantization"])
    native = binding.quantize(feed) if binding.quantize is not None else feed
    index = detail["index"]

    def call() -> Any:
        interp.set_tensor(index, native)
        interp.invoke()
        return interp.get_tensor(out_index)

    return call


def _variants(name: str, batch: int) -> dict[str, Callable[[], Any]]:
    x = _digits(MODELS[name])
    float_model = (FIXTURES / f"{name}.tflite").read_bytes()
    int8_model = _quantized(name, x, float_io=False)
    feed = np.ascontiguousarray(x[:batch])
    opts = RuntimeOptions(intra_op_threads=1)
    rt_float = LiteRtRuntime(float_model, opts)
    rt_float_io_model = _quantized(name, x, float_io=True)
    rt_float_io = LiteRtRuntime(rt_float_io_model, opts)
    rt_int8 = LiteRtRuntime(int8_model, opts)
    rt_formula = _with_formula(LiteRtRuntime(int8_model, opts))
    assert rt_int8.inputs[0].dtype == "float32"  # the adapter hides the int8 tensors
    key = rt_float.inputs[0].name
    feeds = {key: feed}
    int8_feeds = {rt_int8.inputs[0].name: feed}
    same = np.array_equal(
        next(iter(rt_int8.run(int8_feeds).values())),
        next(iter(rt_formula.run(int8_feeds).values())),
    )
    assert same, "precomputed and formula conversions disagree"
    return {
        "adapter float": lambda: rt_float.run(feeds),
        "adapter int8": lambda: rt_float_io.run(feeds),
        "adapter int8 int-I/O": lambda: rt_int8.run(int8_feeds),
        "adapter int8 int-I/O, formula": lambda: rt_formula.run(int8_feeds),
        "bare float": _bare(float_model, feed),
        "bare int8": _bare(int8_model, feed),
        "bare int8 float-I/O": _bare(rt_float_io_model, feed),
    }


def _measure(
    variants: dict[str, Callable[[], Any]], rounds: int, calls: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median time per call and median paired ratio to the same path's float, per variant."""
    per_round: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for fn in variants.values():
        for _ in range(200):  # warm caches and the interpreters' arenas
            fn()
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn = variants[name]
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            per_round[name].append((time.perf_counter() - start) / calls * 1e6)
    ratios = {}
    for name, times in per_round.items():
        base = per_round["bare float" if name.startswith("bare") else "adapter float"]
        ratios[name] = statistics.median(t / b for t, b in zip(times, base, strict=True))
    return {k: statistics.median(v) for k, v in per_round.items()}, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = []
    for name in MODELS:
        for batch in (int(b) for b in args.batches.split(",")):
            calls = max(20, args.calls // batch)
            us, ratio = _measure(_variants(name, batch), args.rounds, calls)
            results.append({"model": name, "batch": batch, "median_us": us, "ratio": ratio})
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"median of {args.rounds} alternating rounds, microseconds per call (1 thread)\n")
    cols = [
        "adapter float",
        "adapter int8",
        "adapter int8 int-I/O",
        "adapter int8 int-I/O, formula",
        "bare float",
        "bare int8",
        "bare int8 float-I/O",
    ]
    print("| model | batch | " + " | ".join(cols) + " |")
    print("|---|---:|" + "---:|" * len(cols))
    for row in results:
        u, ratio = row["median_us"], row["ratio"]
        cells = [f"{u[c]:.1f}" for c in cols]
        for i, c in enumerate(cols):
            if c not in ("bare float", "adapter float"):
                cells[i] += f" ({ratio[c]:.2f}x)"
        print(f"| {row['model']} | {row['batch']} | " + " | ".join(cells) + " |")
    print(
        "\n(x): median over rounds of the time relative to float through the same path "
        "(adapter or bare interpreter) in the same round"
    )


if __name__ == "__main__":
    main()
