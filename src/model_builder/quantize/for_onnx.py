"""Quantize an ONNX model with onnxruntime's quantization tools, for a named CPU target.

Owns: the model check, ``quant_pre_process``, running onnxruntime's quantizers with calibration
from *preprocessed* data, the recipe record, and the list of quantizable nodes the rescue search
may keep in float. Does not own: the pure decisions (targets, mode choice, opset clean-up:
``model_builder.quantize.plan``), calibration data (``model_builder.quantize.calibration``),
measuring accuracy or deciding whether the result is good enough (``gate``), packaging or
signing.

Decisions, with the measurements behind them in ``docs/benchmarks-builder.md``:

* ``static`` (default): QDQ format, per-channel int8 weights, MinMax calibration. It quantizes
  the op types onnxruntime's QDQ quantizer has dedicated handlers for (Conv, Gemm, MatMul,
  pools, shape ops, Relu/Clip). Element-wise arithmetic and Softmax stay in float: int8 gains
  little there on CPU, and a quantized Softmax would report probabilities in steps of 1/255.
* ``dynamic``: int8 weights, activations quantized at run time. Only for MatMul/Gemm-dominated
  graphs without Conv: onnxruntime runs dynamically quantized Conv (ConvInteger) several times
  slower than float Conv (about 7x at batch 64 on the digits CNN, ``bench_builder --explore``).
* ``fp16``: halves the size only; x86 CPUs run fp16 models no faster than fp32.
* ``auto``: ``static`` when calibration data is given: it is the int8 mode that suits every
  graph, and on the MatMul-only 1M-parameter MLP its batch-64 throughput matched ``dynamic``'s
  (both about 1.7-2.0x float). Without calibration data: ``dynamic`` for MatMul-dominated graphs
  without Conv, otherwise an error asking for calibration data.

The default ``target`` is ``x86`` (7-bit weights), which is safe on every x86-64 CPU; pass the
device's target (``detect_target`` on the device, or its profile) to use full 8-bit weights.
"""

from __future__ import annotations

import platform
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import EdgefleetError
from model_builder.errors import ModelCheckError, QuantizationError
from model_builder.quantize.calibration import CalibrationSource, ProgressFn, calibration_stats
from model_builder.quantize.plan import (
    TARGETS,
    TargetProfile,
    choose_mode,
    profile_graph,
    strip_unused_opsets,
    target_from_cpu,
)

__all__ = [
    "QuantRecipe",
    "QuantizableNode",
    "QuantizedModel",
    "default_target",
    "detect_target",
    "quantize_onnx",
]


def detect_target() -> str:
    """:func:`target_from_cpu` for this host (``/proc/cpuinfo`` when present).

    Raises:
        QuantizationError: the host is neither x86-64 nor 64-bit ARM.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        flags = ""  # macOS and others: no cpuinfo; the machine name still decides ARM vs x86
    return target_from_cpu(flags, platform.machine())


def default_target() -> str:
    """The portable target for this host's CPU family: ``x86`` on every x86-64 host (VNNI or
    not), ``arm64`` on 64-bit ARM. ``x86-vnni`` is only ever chosen by the operator: a bundle
    built for it requires VNNI on the device (signed in its compatibility block).

    Raises:
        QuantizationError: the host is neither x86-64 nor 64-bit ARM.
    """
    detected = detect_target()
    return "x86" if detected == "x86-vnni" else detected


@dataclass(frozen=True)
class QuantRecipe:
    """How a model was quantized: enough to reproduce it and to put in the build report."""

    mode: str
    requested_mode: str
    target: str
    quant_format: str | None
    activation_type: str | None
    weight_type: str | None
    reduce_range: bool
    per_channel: bool
    calibrate_method: str | None
    calibration_samples: int
    op_types: tuple[str, ...]
    excluded_nodes: tuple[str, ...]
    symbolic_shape_inference: bool
    ort_version: str
    onnx_version: str

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["op_types"] = list(self.op_types)
        out["excluded_nodes"] = list(self.excluded_nodes)
        return out


@dataclass(frozen=True)
class QuantizableNode:
    """A node the quantizer would quantize; ``nodes_to_exclude`` takes these names."""

    name: str
    op_type: str


@dataclass(frozen=True)
class QuantizedModel:
    """The quantized model bytes and what was done to produce them."""

    model_bytes: bytes
    recipe: QuantRecipe
    quantizable_nodes: tuple[QuantizableNode, ...]
    calibration_stats: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    removed_opsets: tuple[str, ...] = ()


def quantize_onnx(
    model_bytes: bytes,
    calibration: CalibrationSource | None,
    mode: str = "static",
    target: str = "x86",
    nodes_to_exclude: Sequence[str] = (),
    *,
    per_channel: bool | None = None,
    progress: ProgressFn | None = None,
) -> QuantizedModel:
    """Quantize ``model_bytes`` for ``target`` and check the result loads in onnxruntime.

    Args:
        model_bytes: a float ONNX model.
        calibration: raw calibration samples and their declared preprocessing (needed by
            ``static``; ignored by ``dynamic`` and ``fp16`` except for the statistics).
        mode: one of ``MODES``; see the module docstring.
        target: one of ``TARGETS`` (see :func:`detect_target`).
        nodes_to_exclude: node names (from ``quantizable_nodes``) to keep in float.
        per_channel: per-channel weights; default True for static, False for dynamic.
        progress: called as ``progress(done, total, "calibration")`` per calibration batch.

    Returns:
        The quantized model, its recipe, the quantizable nodes and calibration statistics.

    Raises:
        ModelCheckError: the model does not parse or fails ``onnx.checker`` (full check).
        InputDataError: calibration data is missing for a mode that needs it, or unusable.
        QuantizationError: unknown mode/target/node, a mode that does not suit the graph, or
            onnxruntime failed to quantize or to load the result.
    """
    import onnx

    if target not in TARGETS:
        raise QuantizationError(f"unknown target {target!r}; use one of {sorted(TARGETS)}")
    model = _checked_model(model_bytes)
    mode_used = choose_mode(mode, profile_graph(model), calibration is not None)
    if calibration is not None:
        calibration.check_inputs(list(_input_dtypes(model)))
    stats = calibration_stats(calibration) if calibration is not None else {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-quant-") as tmp:
        if mode_used == "fp16":
            quantizable, produced, recipe = _fp16(model, nodes_to_exclude, target)
        else:
            src, pre_path, out = (Path(tmp) / f for f in ("in.onnx", "pre.onnx", "quant.onnx"))
            src.write_bytes(model_bytes)
            pre, symbolic = _pre_process(src, pre_path)
            quantizable = _quantizable_nodes(pre, mode_used)
            unknown = set(nodes_to_exclude) - {n.name for n in quantizable}
            if unknown:
                raise QuantizationError(
                    f"cannot exclude unknown or unquantizable nodes "
                    f"{sorted(unknown)}; see quantizable_nodes"
                )
            recipe = _run_quantizer(
                pre_path,
                out,
                _input_dtypes(pre),
                mode_used,
                TARGETS[target],
                tuple(nodes_to_exclude),
                calibration,
                per_channel,
                progress,
            )
            recipe = replace(recipe, symbolic_shape_inference=symbolic)
            produced = onnx.load(str(out))
    recipe = replace(recipe, requested_mode=mode)
    removed = strip_unused_opsets(produced)
    result = bytes(produced.SerializeToString())
    _check_loads(result)
    return QuantizedModel(result, recipe, quantizable, stats, removed)


def _checked_model(model_bytes: bytes) -> Any:
    import onnx

    try:
        model = onnx.load_from_string(model_bytes)
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # protobuf DecodeError, ValidationError, InferenceError
        raise ModelCheckError(f"the model fails onnx.checker: {exc}") from exc
    return model


def _pre_process(src: Path, dst: Path) -> tuple[Any, bool]:
    """``quant_pre_process`` (shape inference + graph optimisation); returns the model and
    whether symbolic shape inference ran (it needs sympy, which is optional)."""
    import importlib.util

    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    symbolic = importlib.util.find_spec("sympy") is not None
    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=not symbolic)
    except Exception as exc:  # onnxruntime raises untyped errors from its optimiser
        raise QuantizationError(f"quant_pre_process failed: {exc}") from exc
    model = onnx.load(str(dst))
    for i, node in enumerate(model.graph.node):
        if not node.name:  # the quantizer addresses nodes by name
            node.name = f"{node.op_type}_{i}"
    onnx.save(model, str(dst))
    return model, symbolic


def _op_types(mode: str) -> tuple[str, ...]:
    from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry

    return tuple(sorted(QDQRegistry if mode == "static" else IntegerOpsRegistry))


def _quantizable_nodes(model: Any, mode: str) -> tuple[QuantizableNode, ...]:
    op_types = set(_op_types(mode))
    nodes = []
    for node in model.graph.node:
        if node.op_type in op_types:
            nodes.append(QuantizableNode(node.name, node.op_type))
        elif mode == "dynamic" and node.op_type == "Gemm":
            # onnxruntime's dynamic quantizer rewrites Gemm as MatMul named "<gemm>_MatMul".
            nodes.append(QuantizableNode(f"{node.name}_MatMul", "Gemm"))
    return tuple(nodes)


def _run_quantizer(
    src: Path,
    out: Path,
    dtypes: Mapping[str, str],
    mode: str,
    profile: TargetProfile,
    exclude: tuple[str, ...],
    calibration: CalibrationSource | None,
    per_channel: bool | None,
    progress: ProgressFn | None,
) -> QuantRecipe:
    import onnxruntime
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    op_types = _op_types(mode)
    weight = QuantType[profile.weight_type]
    try:
        if mode == "static":
            assert calibration is not None  # choose_mode guarantees it
            channel = True if per_channel is None else per_channel
            quantize_static(
                str(src),
                str(out),
                calibration.reader(dtypes, progress),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(op_types),
                per_channel=channel,
                reduce_range=profile.reduce_range,
                activation_type=QuantType[profile.activation_type],
                weight_type=weight,
                nodes_to_exclude=list(exclude),
                calibrate_method=CalibrationMethod.MinMax,
            )
        else:
            channel = False if per_channel is None else per_channel
            quantize_dynamic(
                str(src),
                str(out),
                op_types_to_quantize=list(op_types),
                per_channel=channel,
                reduce_range=profile.reduce_range,
                weight_type=weight,
                nodes_to_exclude=list(exclude),
            )
    except EdgefleetError:
        raise
    except Exception as exc:  # onnxruntime's quantizer raises bare exceptions
        raise QuantizationError(f"onnxruntime {mode} quantization failed: {exc}") from exc
    import onnx

    return QuantRecipe(
        mode=mode,
        requested_mode=mode,
        target=profile.name,
        quant_format="QDQ" if mode == "static" else "QOperator",
        # DynamicQuantizeLinear always produces uint8 activations.
        activation_type=profile.activation_type if mode == "static" else "QUInt8",
        weight_type=profile.weight_type,
        reduce_range=profile.reduce_range,
        per_channel=channel,
        calibrate_method="MinMax" if mode == "static" else None,
        calibration_samples=calibration.num_samples if calibration and mode == "static" else 0,
        op_types=op_types,
        excluded_nodes=exclude,
        symbolic_shape_inference=False,
        ort_version=str(onnxruntime.__version__),
        onnx_version=str(onnx.__version__),
    )


def _fp16(
    model: Any, exclude: Sequence[str], target: str
) -> tuple[tuple[QuantizableNode, ...], Any, QuantRecipe]:
    import onnx
    import onnxruntime
    from onnxconverter_common.float16 import convert_float_to_float16

    nodes = tuple(QuantizableNode(n.name, n.op_type) for n in model.graph.node if n.name)
    unknown = set(exclude) - {n.name for n in nodes}
    if unknown:
        raise QuantizationError(f"cannot keep unknown nodes in float32: {sorted(unknown)}")
    try:
        with warnings.catch_warnings():
            # It warns per clipped constant (beyond +-1e4 or below 1e-7); the gate measures.
            warnings.simplefilter("ignore", UserWarning)
            half = convert_float_to_float16(
                model, keep_io_types=True, node_block_list=list(exclude)
            )
    except Exception as exc:  # the converter raises ValueError and friends
        raise QuantizationError(f"fp16 conversion failed: {exc}") from exc
    recipe = QuantRecipe(
        mode="fp16",
        requested_mode="fp16",
        target=target,
        quant_format=None,
        activation_type=None,
        weight_type="float16",
        reduce_range=False,
        per_channel=False,
        calibrate_method=None,
        calibration_samples=0,
        op_types=(),
        excluded_nodes=tuple(exclude),
        symbolic_shape_inference=False,
        ort_version=str(onnxruntime.__version__),
        onnx_version=str(onnx.__version__),
    )
    return nodes, half, recipe


def _input_dtypes(model: Any) -> dict[str, str]:
    from onnx import helper

    init = {t.name for t in model.graph.initializer}
    return {
        i.name: str(np.dtype(helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)))
        for i in model.graph.input
        if i.name not in init
    }


def _check_loads(model_bytes: bytes) -> None:
    from edge_agent.runtime.base import RuntimeOptions
    from edge_agent.runtime.onnx import OnnxRuntime

    try:
        OnnxRuntime(model_bytes, RuntimeOptions(warmup_runs=1)).close()
    except EdgefleetError as exc:
        raise QuantizationError(f"the quantized model does not run in onnxruntime: {exc}") from exc
