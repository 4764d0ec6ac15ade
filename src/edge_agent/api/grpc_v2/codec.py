"""Open Inference Protocol tensors over gRPC: ``ModelInferRequest`` in, ``ModelInferResponse`` out.

Owns turning the protobuf request into the same ``DecodedRequest`` the REST decoder builds
(numpy arrays by input name, ``id``, parameters, requested outputs) and an ``InferenceResult``
into the protobuf response. Pure: messages in, arrays out; no grpc import. Does not own the
RPCs, status codes or metrics (``edge_agent.api.grpc_v2.service``).

Inputs come either as typed contents (``InferTensorContents``: the one repeated field that
matches the datatype, e.g. ``fp32_contents`` for FP32, ``int_contents`` for INT8/16/32) or as
``raw_input_contents``: one entry per input, in order, flat row-major little-endian bytes (BYTES:
each element a 4-byte little-endian length plus its bytes), exactly as the REST binary
extension's tensor data. Mixing the two, a contents field of another datatype, an element count
that is not the shape's product, an integer out of its datatype's range and FP16 in typed
contents (the protocol has no typed field for it) all raise ``InputValidationError`` with the
same ``REASON_*`` labels as REST. Shapes are checked before anything is allocated: the element
count is compared with what the message holds, so huge dimensions cost nothing.

Outputs always travel as ``raw_output_contents`` (what Triton answers and every v2 gRPC client
reads). Response parameters carry the REST response's (``model_version``, ``inference_source``,
validation and drift flags); a value that is not a bool, int, float or string goes as JSON text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from edge_agent.api.codec import requested_outputs, to_json
from edge_agent.api.decode import (
    MAX_DIM,
    MAX_INPUTS,
    MAX_OUTPUTS,
    MAX_RANK,
    NATIVE_DTYPES,
    REASON_BINARY,
    REASON_DATA,
    REASON_DATATYPE,
    REASON_SCHEMA,
    REASON_SHAPE,
    REASON_TOO_MANY,
    DecodedRequest,
    RequestedOutput,
    check_span,
    from_binary,
    invalid_input,
    unknown_datatype,
)
from edge_agent.api.grpc_v2.messages import Message, message_class
from edge_agent.serving.service import Array, InferenceResult

__all__ = ["CONTENTS_FIELD", "decode_infer", "encode_infer", "from_parameters", "to_parameters"]

#: The typed-contents field that carries each datatype (FP16 has none: it travels raw).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_FIELDS = tuple(sorted(set(CONTENTS_FIELD.values())))
_Response = message_class("ModelInferResponse")
_Parameter = message_class("InferParameter")
_INT64 = (-(2**63), 2**63 - 1)


def decode_infer(request: Message, *, max_inputs: int = MAX_INPUTS) -> DecodedRequest:
    """The tensors, id, parameters and requested outputs of a ``ModelInferRequest``.

    Args:
        request: the parsed ``ModelInferRequest``.
        max_inputs: more inputs than this are refused.

    Returns:
        The request as the REST decoder gives it (``binary_output`` is always False).

    Raises:
        InputValidationError: the request is not a valid v2 request; ``reason`` is one of the
            ``REASON_*`` labels of ``edge_agent.api.codec`` and ``field`` names the input.
    """
    tensors = request.inputs
    if not tensors:
        raise invalid_input(REASON_SCHEMA, "'inputs' must not be empty")
    if len(tensors) > max_inputs:
        raise invalid_input(REASON_TOO_MANY, f"{len(tensors)} inputs; at most {max_inputs} allowed")
    raw = request.raw_input_contents
    if raw and len(raw) != len(tensors):
        message = f"{len(raw)} raw_input_contents for {len(tensors)} inputs"
        raise invalid_input(REASON_BINARY, message)
    inputs: dict[str, Array] = {}
    for index, tensor in enumerate(tensors):
        name = tensor.name
        if not name:
            raise invalid_input(REASON_SCHEMA, f"inputs[{index}] needs a non-empty 'name'")
        if name in inputs:
            raise invalid_input(REASON_SCHEMA, f"input {name!r} appears twice", name)
        shape = _shape(tensor.shape, name)
        if raw:
            if tensor.HasField("contents"):
                message = f"input {name!r} has contents while raw_input_contents is used"
                raise invalid_input(REASON_SCHEMA, message, name)
            inputs[name] = from_binary(memoryview(raw[index]), tensor.datatype, shape, name)
        else:
            inputs[name] = _from_contents(tensor, shape, name)
    outputs = _requested(request.outputs)
    parameters = from_parameters(request.parameters)
    return DecodedRequest(inputs, request.id or None, parameters, outputs, False)


def _shape(dims: Any, name: str) -> tuple[int, ...]:
    if len(dims) > MAX_RANK:
        raise invalid_input(
            REASON_SHAPE, f"shape of {name!r} has more than {MAX_RANK} dimensions", name
        )
    shape = tuple(dims)
    for dim in shape:
        if not 0 <= dim <= MAX_DIM:
            raise invalid_input(
                REASON_SHAPE, f"shape of {name!r} has an invalid dimension {dim}", name
            )
    return check_span(shape, name)


def _from_contents(tensor: Message, shape: tuple[int, ...], name: str) -> Array:
    datatype = tensor.datatype
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        if datatype == "FP16":
            message = f"FP16 input {name!r} must be sent as raw_input_contents"
            raise invalid_input(REASON_DATATYPE, message, name)
        raise unknown_datatype(datatype, name)
    contents = tensor.contents
    for other in _FIELDS:
        if other != field and len(getattr(contents, other)):
            message = f"input {name!r} is {datatype} but its contents hold {other}"
            raise invalid_input(REASON_DATA, message, name)
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        message = f"input {name!r} has {len(values)} elements; {datatype}{list(shape)} has {count}"
        raise invalid_input(REASON_SHAPE, message, name)
    if datatype == "BYTES":
        return np.array(list(values), dtype=object).reshape(shape)
    dtype = NATIVE_DTYPES[datatype]
    if dtype.kind in "iu" and dtype.itemsize < 4 and count:
        wide = np.array(values, dtype=np.int32 if dtype.kind == "i" else np.uint32)
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise invalid_input(
                REASON_DATA, f"data of input {name!r} is out of range for {datatype}", name
            )
        return wide.astype(dtype).reshape(shape)
    return np.array(values, dtype=dtype).reshape(shape)


def _requested(entries: Any) -> tuple[RequestedOutput, ...] | None:
    if not entries:
        return None
    if len(entries) > MAX_OUTPUTS:
        raise invalid_input(REASON_SCHEMA, f"at most {MAX_OUTPUTS} requested outputs")
    wanted = []
    for entry in entries:
        if not entry.name:
            raise invalid_input(REASON_SCHEMA, "each requested output needs a non-empty 'name'")
        wanted.append(RequestedOutput(entry.name))
    return tuple(wanted)


def from_parameters(parameters: Mapping[str, Message]) -> dict[str, Any]:
    """Python values of a protobuf parameter map (an unset parameter is ``None``)."""
    out: dict[str, Any] = {}
    for key, value in parameters.items():
        choice = value.WhichOneof("parameter_choice")
        out[key] = None if choice is None else getattr(value, choice)
    return out


def to_parameters(target: Any, values: Mapping[str, Any]) -> None:
    """Write ``values`` into the protobuf parameter map ``target``."""
    for key, value in values.items():
        param = target[str(key)]
        if isinstance(value, bool | np.bool_):
            param.bool_param = bool(value)
        elif isinstance(value, int | np.integer) and _INT64[0] <= int(value) <= _INT64[1]:
            param.int64_param = int(value)
        elif isinstance(value, float | np.floating):
            param.double_param = float(value)
        elif isinstance(value, str):
            param.string_param = value
        else:
            param.string_param = to_json(value).decode()


def encode_infer(
    result: InferenceResult,
    *,
    request_id: str | None = None,
    outputs: tuple[RequestedOutput, ...] | None = None,
) -> Message:
    """The ``ModelInferResponse`` for ``result``.

    Args:
        result: what the service returned.
        request_id: echoed as ``id`` when given.
        outputs: the outputs the request asked for (in that order), ``None`` for all.

    Raises:
        InputValidationError: a requested output does not exist (reason ``output``).
        InferenceError: an output has a dtype the protocol cannot carry.
    """
    response = _Response(model_name=result.model, model_version=result.model_version)
    if request_id:
        response.id = request_id
    for want, array, datatype in requested_outputs(result, outputs):
        response.outputs.add(name=want.name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(_raw(array, datatype))
    parameters = {**result.parameters}
    parameters.update(model_version=result.model_version, inference_source=result.source)
    to_parameters(response.parameters, parameters)
    return response


def _raw(array: Array, datatype: str) -> bytes:
    if datatype == "BYTES":
        items = [x if isinstance(x, bytes) else str(x).encode() for x in array.reshape(-1).tolist()]
        return b"".join(len(b).to_bytes(4, "little") + b for b in items)
    return np.ascontiguousarray(array, dtype=NATIVE_DTYPES[datatype].newbyteorder("<")).tobytes()
