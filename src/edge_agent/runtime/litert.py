"""LiteRT (TFLite) adapter: the only module in edge_agent that imports a TFLite interpreter.

Owns: loading ``.tflite`` bytes into ``ai_edge_litert`` (or ``tflite_runtime`` where only that is
installed), threads, warm-up, resizing inputs when the batch changes, converting float feeds to
and from the integer tensors of quantized models, and mapping the interpreter's exceptions to our
typed errors. Does not own: validation or preprocessing (callers do those before ``run``).

Quantized models keep a float contract: an int8/uint8/int16 input or output tensor with
quantization parameters is described as ``float32`` in ``inputs``/``outputs``; float feeds are
quantized with the tensor's scale and zero point, and integer outputs are dequantized to float32.
A feed already in the tensor's integer type is passed through unchanged. The conversions are
precomputed per tensor (``runtime.quantization``): at batch 1 they cost two numpy calls in and
one out, so an int8 model is not slower through the adapter than its float original
(``bench/bench_tflite.py``, docs/tflite.md).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.errors import InferenceError, ModelLoadError, RuntimeUnavailableError
from edge_agent.runtime.base import RuntimeOptions, Tensor, TensorInfo
from edge_agent.runtime.quantization import Dequantizer, Quantizer

# Integer tensor types that carry affine quantization we undo for callers.
_QUANTIZED_TYPES = frozenset({np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int16)})


@dataclass(frozen=True)
class _Binding:
    """How one model tensor is fed or read: its index, native type and quantization, with the
    (de)quantizer built once for quantized tensors."""

    name: str
    index: int
    dtype: np.dtype[Any]
    scale: float
    zero_point: int
    quantize: Quantizer | None = field(init=False, repr=False, compare=False)
    dequantize: Dequantizer | None = field(init=False, repr=False, compare=False)

    @property
    def quantized(self) -> bool:
        return self.quantize is not None

    def __post_init__(self) -> None:
        quantized = self.dtype in _QUANTIZED_TYPES and self.scale > 0.0
        args = (self.scale, self.zero_point, self.dtype)
        object.__setattr__(self, "quantize", Quantizer(*args) if quantized else None)
        object.__setattr__(self, "dequantize", Dequantizer(*args) if quantized else None)


def _import_interpreter() -> tuple[Any, str]:
    """The interpreter class and the version of the package that provides it.

    Raises:
        RuntimeUnavailableError: neither ai-edge-litert nor tflite-runtime is installed.
    """
    try:
        from ai_edge_litert import interpreter as litert

        return litert.Interpreter, _dist_version("ai-edge-litert")
    except ImportError:
        pass
    try:
        from tflite_runtime import interpreter as tflite
    except ImportError as exc:
        raise RuntimeUnavailableError(
            "no TFLite interpreter installed: install edgefleet[litert] (ai-edge-litert)"
        ) from exc
    return tflite.Interpreter, _dist_version("tflite-runtime")


def _dist_version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:  # importable but not installed as a distribution
        return "unknown"


class LiteRtRuntime:
    """A LiteRT ``Interpreter`` behind the ``Runtime`` interface.

    The interpreter is not thread-safe, so ``run`` serialises calls with a lock.
    """

    name = "litert"

    def __init__(self, artifact: bytes, options: RuntimeOptions | None = None) -> None:
        """Load, allocate and warm up a model.

        Args:
            artifact: The ``.tflite`` flatbuffer.
            options: Threads (``intra_op_threads``; 0 lets the runtime pick) and warm-up runs.
                Providers and inter-op threads do not apply to LiteRT and are ignored.

        Raises:
            ModelLoadError: the interpreter rejected the model bytes or could not allocate them.
            RuntimeUnavailableError: no TFLite interpreter is installed.
        """
        interpreter_cls, self.version = _import_interpreter()
        opts = options or RuntimeOptions()
        threads = opts.intra_op_threads if opts.intra_op_threads > 0 else None
        if not artifact:
            raise ModelLoadError("LiteRT could not load the model: empty artifact")
        try:
            interp = interpreter_cls(model_content=bytes(artifact), num_threads=threads)
            interp.allocate_tensors()
            in_details = interp.get_input_details()
            out_details = interp.get_output_details()
        except Exception as exc:  # the interpreter raises ValueError/RuntimeError untyped
            raise ModelLoadError(f"LiteRT could not load the model: {exc}") from exc
        self._interp: Any = interp
        self._lock = threading.Lock()
        self._in = tuple(_binding(d) for d in in_details)
        self._out = tuple(_binding(d) for d in out_details)
        self._by_name = {b.name: b for b in self._in}
        # The shapes the interpreter is allocated for; resizing only when a feed differs keeps
        # the hot path free of reallocation.
        self._allocated: dict[int, tuple[int, ...]] = {
            int(d["index"]): tuple(int(x) for x in d["shape"]) for d in in_details
        }
        self.inputs: tuple[TensorInfo, ...] = tuple(
            TensorInfo(b.name, _public_dtype(b), _signature_shape(d))
            for b, d in zip(self._in, in_details, strict=True)
        )
        self.outputs: tuple[TensorInfo, ...] = tuple(
            TensorInfo(b.name, _public_dtype(b), _signature_shape(d))
            for b, d in zip(self._out, out_details, strict=True)
        )
        self._paired = tuple(zip(self._in, self.inputs, strict=True))
        for _ in range(opts.warmup_runs):
            try:
                self.run(_zeros_like_inputs(self.inputs))
            except InferenceError as exc:
                raise ModelLoadError(f"LiteRT warm-up run failed: {exc}") from exc

    def run(self, feeds: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Run once, resizing the inputs first when the feed shapes changed.

        Args:
            feeds: One array per model input, keyed by input name. Float arrays are quantized
                for quantized inputs; integer arrays of the input's own type pass through.

        Returns:
            One array per output, keyed by output name; quantized outputs are float32.

        Raises:
            InferenceError: missing, unknown or wrong-rank/shape/type feeds, a closed runtime,
                or a failure inside the interpreter.
        """
        if len(feeds) != len(self._in) or not all(n in feeds for n in self._by_name):
            missing = [n for n in self._by_name if n not in feeds]
            unknown = [n for n in feeds if n not in self._by_name]
            raise InferenceError(
                f"feeds do not match the model: missing {missing}, unknown {unknown}"
            )
        prepared = [(b, _to_native(b, feeds[b.name], info)) for b, info in self._paired]
        with self._lock:
            interp = self._interp
            if interp is None:
                raise InferenceError("runtime is closed")
            try:
                self._resize_if_needed(interp, prepared)
                for binding, array in prepared:
                    interp.set_tensor(binding.index, array)
                interp.invoke()
                raw = [interp.get_tensor(b.index) for b in self._out]
            except InferenceError:
                raise
            except Exception as exc:  # the interpreter raises ValueError/RuntimeError untyped
                raise InferenceError(f"LiteRT failed: {exc}") from exc
        return {b.name: _from_native(b, r) for b, r in zip(self._out, raw, strict=True)}

    def close(self) -> None:
        """Drop the interpreter; further ``run`` calls raise ``InferenceError``."""
        with self._lock:
            self._interp = None

    def _resize_if_needed(
        self, interp: Any, prepared: list[tuple[_Binding, npt.NDArray[Any]]]
    ) -> None:
        """Resize changed inputs and reallocate once. Caller holds the lock."""
        changed = [(b, a.shape) for b, a in prepared if self._allocated[b.index] != a.shape]
        if not changed:
            return
        try:
            for binding, shape in changed:
                interp.resize_tensor_input(binding.index, list(shape), strict=False)
            interp.allocate_tensors()
        except Exception as exc:
            # Leave the cache unknown so the next call resizes from scratch.
            self._allocated = {b.index: () for b in self._in}
            raise InferenceError(f"LiteRT could not resize inputs to {changed}: {exc}") from exc
        for binding, shape in changed:
            self._allocated[binding.index] = tuple(shape)


def _binding(detail: Mapping[str, Any]) -> _Binding:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return _Binding(
        name=str(detail["name"]),
        index=int(detail["index"]),
        dtype=np.dtype(detail["dtype"]),
        scale=float(scale),
        zero_point=int(zero_point),
    )


def _public_dtype(binding: _Binding) -> str:
    return "float32" if binding.quantized else binding.dtype.name


def _signature_shape(detail: Mapping[str, Any]) -> tuple[int | str | None, ...]:
    """The declared shape, with dynamic dimensions (-1 in ``shape_signature``) as None."""
    sig = detail.get("shape_signature")
    dims = sig if sig is not None and len(sig) else detail["shape"]
    return tuple(None if int(d) < 0 else int(d) for d in dims)


def _to_native(binding: _Binding, value: Tensor, info: TensorInfo) -> npt.NDArray[Any]:
    """Check a feed's rank and fixed dimensions and convert it to the tensor's type.

    Dimension 0 is the batch and may differ from the declared one (the input is resized).

    Raises:
        InferenceError: wrong rank, a fixed non-batch dimension differs, or a type that cannot
            be converted.
    """
    if type(value) is np.ndarray:
        arr = value
    else:
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as exc:  # ragged nested lists and the like
            raise InferenceError(f"input {binding.name!r}: not an array: {exc}") from exc
    if arr.ndim != len(info.shape):
        raise InferenceError(
            f"input {binding.name!r}: expected rank {len(info.shape)} {info.shape}, "
            f"got shape {arr.shape}"
        )
    for axis, (want, got) in enumerate(zip(info.shape, arr.shape, strict=True)):
        if axis > 0 and isinstance(want, int) and want != got:
            raise InferenceError(
                f"input {binding.name!r}: expected shape {info.shape}, got {arr.shape}"
            )
    if arr.dtype == binding.dtype:
        return np.ascontiguousarray(arr)
    if binding.quantize is not None and arr.dtype.kind == "f":
        # Round half away from zero, as TFLite's own QUANTIZE kernel does (np.round is half-even).
        return binding.quantize(arr)
    if not np.can_cast(arr.dtype, binding.dtype, casting="same_kind"):
        raise InferenceError(
            f"input {binding.name!r}: cannot feed {arr.dtype} into a {binding.dtype} tensor"
        )
    return np.ascontiguousarray(arr.astype(binding.dtype))


def _from_native(binding: _Binding, value: npt.NDArray[Any]) -> Tensor:
    if binding.dequantize is None:
        return value
    return binding.dequantize(value)


def _zeros_like_inputs(inputs: tuple[TensorInfo, ...]) -> dict[str, Tensor]:
    """A batch-1 all-zero feed for warm-up; dynamic dimensions become 1."""
    feeds: dict[str, Tensor] = {}
    for info in inputs:
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in info.shape)
        feeds[info.name] = np.zeros(shape, dtype=np.dtype(info.dtype))
    return feeds
