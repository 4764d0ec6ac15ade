"""Quantize float ``.tflite`` models with Google's AI Edge Quantizer.

Owns: the choice of supported recipes, turning already-preprocessed calibration samples into the
quantizer's per-signature calibration set, and mapping the quantizer's failures to our typed
errors. Does not own: conversion to TFLite (done before, with TensorFlow), the accuracy gate,
packaging or signing.

The quantizer (PyPI ``ai-edge-quantizer``, the ``tflite-quant`` extra) is imported lazily; it needs
``ai-edge-litert`` but not TensorFlow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt

from model_builder.errors import InputDataError, ModelCheckError, QuantizationError

#: Supported recipe names, as named by ``ai_edge_quantizer.recipe``.
RECIPES: tuple[str, ...] = ("dynamic_wi8_afp32", "static_wi8_ai8")

_EXTRA_HINT = "install edgefleet[tflite-quant] (PyPI ai-edge-quantizer)"


@dataclass(frozen=True)
class TfliteQuantReport:
    """What a quantization did: recipe, sizes before and after, calibration used.

    ``*_bytes`` are whole-file sizes; ``*_weight_bytes`` count only the constant tensor data
    (weights and biases, not quantization parameters or flatbuffer structure). On small models
    the fixed flatbuffer overhead dominates the file, so the two ratios differ a lot.
    """

    recipe: str
    float_bytes: int
    quantized_bytes: int
    float_weight_bytes: int
    quantized_weight_bytes: int
    calibration_samples: int
    quantizer_version: str
    float_io_tensors: int = 0

    @property
    def size_ratio(self) -> float:
        """Quantized file size divided by float file size."""
        return self.quantized_bytes / self.float_bytes if self.float_bytes else 0.0

    @property
    def weight_ratio(self) -> float:
        """Quantized constant-tensor bytes divided by the float model's."""
        return (
            self.quantized_weight_bytes / self.float_weight_bytes
            if self.float_weight_bytes
            else 0.0
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the report."""
        return {
            "recipe": self.recipe,
            "float_bytes": self.float_bytes,
            "quantized_bytes": self.quantized_bytes,
            "size_ratio": round(self.size_ratio, 4),
            "float_weight_bytes": self.float_weight_bytes,
            "quantized_weight_bytes": self.quantized_weight_bytes,
            "weight_ratio": round(self.weight_ratio, 4),
            "calibration_samples": self.calibration_samples,
            "quantizer": "ai-edge-quantizer",
            "quantizer_version": self.quantizer_version,
            "float_io_tensors": self.float_io_tensors,
        }


@dataclass(frozen=True)
class TfliteQuantResult:
    """The quantized ``.tflite`` bytes and the report on how they were made."""

    model: bytes
    report: TfliteQuantReport


def quantize_tflite(
    float_model: bytes,
    recipe: str = "dynamic_wi8_afp32",
    calibration_data: Iterable[Mapping[str, npt.ArrayLike]] | None = None,
    *,
    signature_key: str | None = None,
    float_io: bool = True,
) -> TfliteQuantResult:
    """Quantize a float ``.tflite`` model with one of ``RECIPES``.

    Args:
        float_model: The float ``.tflite`` flatbuffer.
        recipe: ``"dynamic_wi8_afp32"`` (int8 weights, float activations quantized on the fly)
            or ``"static_wi8_ai8"`` (int8 weights and activations; needs calibration data).
        calibration_data: Preprocessed samples for static recipes, each a mapping from input
            name (the signature's input name or the tensor name ``LiteRtRuntime`` reports) to
            an array with the model's input shape. Ignored by recipes that need no calibration.
        signature_key: The model signature to calibrate; defaults to the model's only one.
        float_io: Give quantized integer inputs/outputs float32 twins with QUANTIZE/DEQUANTIZE
            ops in the graph (``tflite_io.float_io``), so the interpreter converts in C rather
            than the agent in Python; ``report.float_io_tensors`` counts them.

    Returns:
        The quantized model bytes and a report.

    Raises:
        QuantizationError: unknown recipe, ai-edge-quantizer not installed, the model has no
            usable signature, or the quantizer failed.
        InputDataError: a static recipe without calibration samples, or samples that do not
            match the model's inputs.
        ModelCheckError: the quantizer cannot read ``float_model``.
    """
    if recipe not in RECIPES:
        raise QuantizationError(f"unknown TFLite recipe {recipe!r}; supported: {list(RECIPES)}")
    aeq_quantizer, aeq_recipe, version = _import_quantizer()
    try:
        qt = aeq_quantizer.Quantizer(bytearray(float_model))
    except Exception as exc:  # the quantizer raises untyped errors on bad flatbuffers
        raise ModelCheckError(f"ai-edge-quantizer cannot read the float model: {exc}") from exc
    try:
        qt.load_quantization_recipe(getattr(aeq_recipe, recipe)())
        needs_calibration = bool(qt.need_calibration)
    except Exception as exc:
        raise QuantizationError(f"ai-edge-quantizer rejected recipe {recipe!r}: {exc}") from exc

    n_samples = 0
    calibration_result = None
    if needs_calibration:
        key, samples = _calibration_set(float_model, calibration_data, signature_key)
        n_samples = len(samples)
        try:
            calibration_result = qt.calibrate({key: samples})
        except Exception as exc:
            raise QuantizationError(f"calibration failed ({recipe}): {exc}") from exc
    try:
        result = qt.quantize(calibration_result, enable_progress_report=False)
    except Exception as exc:
        raise QuantizationError(f"ai-edge-quantizer failed ({recipe}): {exc}") from exc
    if result.quantized_model is None:
        raise QuantizationError(f"ai-edge-quantizer returned no model ({recipe})")
    quantized = bytes(result.quantized_model)
    rewritten = 0
    if float_io:
        from model_builder.quantize.tflite_io import float_io as with_float_io

        quantized, rewritten = with_float_io(quantized)
    report = TfliteQuantReport(
        recipe=recipe,
        float_bytes=len(float_model),
        quantized_bytes=len(quantized),
        float_weight_bytes=_constant_bytes(float_model),
        quantized_weight_bytes=_constant_bytes(quantized),
        calibration_samples=n_samples,
        quantizer_version=version,
        float_io_tensors=rewritten,
    )
    return TfliteQuantResult(model=quantized, report=report)


def _import_quantizer() -> tuple[Any, Any, str]:
    """The quantizer and recipe modules and the installed quantizer version.

    Raises:
        QuantizationError: ai-edge-quantizer (or a dependency of it) is not installed.
    """
    try:
        from ai_edge_quantizer import quantizer, recipe
    except ImportError as exc:
        _missing_extra(exc)
    from importlib import metadata

    try:
        version = metadata.version("ai-edge-quantizer")
    except metadata.PackageNotFoundError:  # pragma: no cover - importable but not a dist
        version = "unknown"
    return quantizer, recipe, version


def _missing_extra(exc: ImportError) -> NoReturn:
    """Raise the typed error that names the extra to install.

    Raises:
        QuantizationError: always.
    """
    raise QuantizationError(f"TFLite quantization is not available ({exc}): {_EXTRA_HINT}") from exc


def _calibration_set(
    float_model: bytes,
    calibration_data: Iterable[Mapping[str, npt.ArrayLike]] | None,
    signature_key: str | None,
) -> tuple[str, list[dict[str, npt.NDArray[Any]]]]:
    """The signature key and the samples keyed by that signature's input names.

    Raises:
        InputDataError: no samples, or a sample that misses or misnames an input.
        QuantizationError: the model has no signature, or not the requested one.
    """
    if calibration_data is None:
        raise InputDataError("static TFLite quantization needs calibration data")
    key, inputs = _signature_inputs(float_model, signature_key)
    by_tensor = {tensor: sig for sig, (tensor, _) in inputs.items()}
    samples: list[dict[str, npt.NDArray[Any]]] = []
    for i, sample in enumerate(calibration_data):
        converted: dict[str, npt.NDArray[Any]] = {}
        for name, value in sample.items():
            sig = name if name in inputs else by_tensor.get(name)
            if sig is None:
                raise InputDataError(
                    f"calibration sample {i}: unknown input {name!r}; expected {sorted(inputs)}"
                )
            converted[sig] = np.asarray(value, dtype=inputs[sig][1])
        missing = sorted(set(inputs) - set(converted))
        if missing:
            raise InputDataError(f"calibration sample {i}: missing inputs {missing}")
        samples.append(converted)
    if not samples:
        raise InputDataError("static TFLite quantization needs at least one calibration sample")
    return key, samples


def _signature_inputs(
    float_model: bytes, signature_key: str | None
) -> tuple[str, dict[str, tuple[str, np.dtype[Any]]]]:
    """The signature to calibrate and its inputs: signature name -> (tensor name, dtype).

    Raises:
        QuantizationError: the model has no signature, several and none chosen, or not the one
            requested.
        ModelCheckError: the interpreter cannot read the model.
    """
    try:
        from ai_edge_litert import interpreter as litert
    except ImportError as exc:
        _missing_extra(exc)
    try:
        interp = litert.Interpreter(model_content=bytes(float_model))
        signatures = dict(interp.get_signature_list())
    except Exception as exc:
        raise ModelCheckError(f"LiteRT cannot read the float model: {exc}") from exc
    if signature_key is None:
        if len(signatures) != 1:
            raise QuantizationError(
                f"calibration needs exactly one model signature or an explicit signature_key; "
                f"the model has {sorted(signatures)}"
            )
        signature_key = next(iter(signatures))
    elif signature_key not in signatures:
        raise QuantizationError(
            f"no signature {signature_key!r} in the model; it has {sorted(signatures)}"
        )
    details = interp.get_signature_runner(signature_key).get_input_details()
    return signature_key, {
        str(sig): (str(d["name"]), np.dtype(d["dtype"])) for sig, d in details.items()
    }


def _constant_bytes(model: bytes) -> int:
    """Bytes of constant tensor data (weights, biases) in a ``.tflite`` flatbuffer.

    Raises:
        QuantizationError: the flatbuffer tools of ai-edge-litert are missing or cannot parse
            ``model``.
    """
    try:
        from ai_edge_litert.tools import flatbuffer_utils
    except ImportError as exc:
        _missing_extra(exc)
    try:
        parsed = flatbuffer_utils.read_model_from_bytearray(bytearray(model))
        used = {
            int(t.buffer) for sg in parsed.subgraphs or [] for t in sg.tensors or [] if t.buffer
        }
        return sum(len(parsed.buffers[i].data) for i in used if parsed.buffers[i].data is not None)
    except Exception as exc:
        raise QuantizationError(f"cannot measure the constant tensors of a model: {exc}") from exc
