"""Give a fully quantized ``.tflite`` model float32 inputs and outputs.

Owns: rewriting a flatbuffer whose graph inputs/outputs are quantized integer tensors (what AI
Edge Quantizer's ``static_wi8_ai8`` produces) so that each such input is a float32 tensor feeding
a ``QUANTIZE`` op and each such output comes out of a ``DEQUANTIZE`` op, with the original tensor
names, shapes and signature entries. Does not own: quantization itself (``quantize_tflite``).

Why: with integer I/O every request is converted in Python by the runtime adapter, and at batch 1
on small models those numpy calls cost more than the int8 kernels save. The interpreter's own
QUANTIZE/DEQUANTIZE kernels do the same conversion in C within the single ``invoke`` call (the
layout TensorFlow's converter produces by default). The device needs nothing new: to the
adapter this is a model with float I/O (``docs/tflite.md``, ``bench/bench_tflite.py``).
"""

from __future__ import annotations

from typing import Any

from model_builder.errors import QuantizationError

# TensorType values of the TFLite schema.
_FLOAT32 = 0
_QUANTIZED_TYPES = {9: "int8", 3: "uint8", 7: "int16"}
# Op versions the builtin resolver registers for these conversions (by integer type).
_QUANTIZE_VERSION = {9: 2, 3: 1, 7: 3}
_DEQUANTIZE_VERSION = {9: 2, 3: 1, 7: 4}


def float_io(model: bytes) -> tuple[bytes, int]:
    """The model with float32 I/O in place of quantized integer I/O, and how many tensors changed.

    Inputs/outputs that are already float (or integer without quantization parameters, e.g.
    token ids) are left alone; a model without quantized I/O comes back unchanged with 0.

    Raises:
        QuantizationError: the flatbuffer cannot be read or written, or has no subgraph.
    """
    try:
        from ai_edge_litert import schema_py_generated as fb
        from ai_edge_litert.tools import flatbuffer_utils
    except ImportError as exc:  # pragma: no cover - ai-edge-litert is a dependency of the extra
        raise QuantizationError(f"float I/O needs ai-edge-litert: {exc}") from exc
    try:
        m = flatbuffer_utils.read_model_from_bytearray(bytearray(model))
    except Exception as exc:  # the flatbuffer reader raises untyped errors
        raise QuantizationError(f"cannot read the quantized model: {exc}") from exc
    if not m.subgraphs:
        raise QuantizationError("the quantized model has no subgraph")
    sg = m.subgraphs[0]
    renamed: dict[int, int] = {}  # old graph I/O tensor index -> new float tensor index
    before: list[Any] = []
    after: list[Any] = []
    for position, index in enumerate(list(sg.inputs)):
        new = _float_twin(fb, sg, int(index))
        if new is None:
            continue
        code = sg.tensors[index].type
        op = fb.OperatorT()
        op.opcodeIndex = _opcode(fb, m, fb.BuiltinOperator.QUANTIZE, _QUANTIZE_VERSION[code])
        op.inputs, op.outputs = [new], [int(index)]
        before.append(op)
        sg.inputs[position] = new
        renamed[int(index)] = new
    for position, index in enumerate(list(sg.outputs)):
        new = _float_twin(fb, sg, int(index))
        if new is None:
            continue
        code = sg.tensors[index].type
        op = fb.OperatorT()
        op.opcodeIndex = _opcode(fb, m, fb.BuiltinOperator.DEQUANTIZE, _DEQUANTIZE_VERSION[code])
        op.inputs, op.outputs = [int(index)], [new]
        after.append(op)
        sg.outputs[position] = new
        renamed[int(index)] = new
    if not renamed:
        return model, 0
    sg.operators = [*before, *(sg.operators or []), *after]
    for sig in m.signatureDefs or []:
        if sig.subgraphIndex not in (0, None):
            continue
        for entry in [*(sig.inputs or []), *(sig.outputs or [])]:
            entry.tensorIndex = renamed.get(int(entry.tensorIndex), entry.tensorIndex)
    try:
        return bytes(flatbuffer_utils.convert_object_to_bytearray(m)), len(renamed)
    except Exception as exc:
        raise QuantizationError(f"cannot write the float-I/O model: {exc}") from exc


def _float_twin(fb: Any, sg: Any, index: int) -> int | None:
    """Append a float32 tensor that takes over ``index``'s name and shape; None to keep it."""
    tensor = sg.tensors[index]
    q = tensor.quantization
    scales = getattr(q, "scale", None) if q is not None else None
    if tensor.type not in _QUANTIZED_TYPES or scales is None or len(scales) != 1:
        return None  # not quantized I/O, or per-channel (not a graph I/O layout we rewrite)
    twin = fb.TensorT()
    twin.name = tensor.name
    twin.shape = tensor.shape
    twin.shapeSignature = tensor.shapeSignature
    twin.type = _FLOAT32
    twin.buffer = 0  # the schema's empty buffer: no constant data
    suffix = "/" + _QUANTIZED_TYPES[tensor.type]
    tensor.name = tensor.name + (suffix.encode() if isinstance(tensor.name, bytes) else suffix)
    sg.tensors.append(twin)
    return len(sg.tensors) - 1


def _opcode(fb: Any, m: Any, builtin: int, version: int) -> int:
    """Index of the operator code for ``builtin``, added when the model has none."""
    for i, code in enumerate(m.operatorCodes or []):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
            code.version = max(code.version, version)
            return i
    code = fb.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(builtin, 127)  # the schema's placeholder above 127
    code.version = version
    m.operatorCodes = [*(m.operatorCodes or []), code]
    return len(m.operatorCodes) - 1
