"""Open Inference Protocol (KServe v2) tensors: JSON and the binary tensor data extension.

Owns: request body -> numpy arrays, ``InferenceResult`` -> response body. With the binary
extension the JSON header is ``Inference-Header-Content-Length`` bytes long and each binary
tensor's bytes follow it in order, sized by its ``binary_data_size`` (little-endian, row-major;
BOOL one byte 0/1; BYTES elements a 4-byte little-endian length plus the bytes). Outputs go binary
when the request's ``binary_data_output`` or the output's ``binary_data`` asks. Pure: bytes in,
arrays out. Checks a request against itself only; the service checks it against the model.

Strict: every problem raises ``InputValidationError`` with a stable ``REASON_*`` and the input in
``field``. Data is flat (row-major) or nested exactly to the shape; numeric tensors refuse strings,
nulls and booleans, integer tensors non-integers and out-of-range values; BF16 is refused (numpy
has no bfloat16). Binary inputs are read-only views of the body (no copy).

NaN policy: JSON ``NaN``/``Infinity``/``-Infinity`` (Python's ``json`` and v2 Python clients emit
them) are accepted in FP tensors and passed on, so the model's validation policy counts and rejects
or drops those rows exactly as for binary inputs; in integer/BOOL tensors they are a ``data``
error. Outputs holding NaN/Inf are written with the same tokens; strict-JSON clients ask for
binary outputs.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from edge_agent.errors import InferenceError, InputValidationError
from edge_agent.service import Array, InferenceResult

MAX_INPUTS = 64
MAX_OUTPUTS = 256
MAX_RANK = 32
MAX_DIM = 2**31 - 1
HEADER_LENGTH = "inference-header-content-length"

REASON_JSON = "json"
REASON_SCHEMA = "schema"
REASON_DATATYPE = "datatype"
REASON_SHAPE = "shape"
REASON_DATA = "data"
REASON_BINARY = "binary_size"
REASON_TOO_MANY = "too_many_inputs"
REASON_OUTPUT = "output"

# Wire dtypes are little-endian by definition; on a little-endian host they are also native.
# fmt: off
_WIRE: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
_KIND_WORDS = {
    "U": "strings", "S": "strings", "O": "nulls, objects or integers beyond 64 bits",
    "f": "non-integers (or NaN/Infinity)", "b": "booleans", "i": "integers", "u": "integers",
}
# fmt: on
_NATIVE = {name: dt.newbyteorder("=") for name, dt in _WIRE.items()}
_KINDS = {n: "b" if n == "BOOL" else "fiu" if n[:2] == "FP" else "iu" for n in _WIRE}
_BY_KIND = {(dt.kind, dt.itemsize): name for name, dt in _WIRE.items()}


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """One entry of the request's ``outputs``; ``binary`` is ``None`` when the entry is silent."""

    name: str
    binary: bool | None = None


@dataclass(frozen=True, slots=True)
class DecodedRequest:
    """An inference request body, decoded."""

    inputs: dict[str, Array]
    request_id: str | None
    parameters: dict[str, Any]
    outputs: tuple[RequestedOutput, ...] | None
    binary_output: bool


class EncodedResponse(NamedTuple):
    """A response body; ``header_length`` is set (the JSON's length) when binary data follows."""

    body: bytes
    header_length: int | None


def _bad(reason: str, message: str, field: str | None = None) -> InputValidationError:
    return InputValidationError(message, field=field, reason=reason)


class _Plan(NamedTuple):
    """What a binary request's JSON header says, independent of the bytes that follow it."""

    inputs: tuple[tuple[str, str, tuple[int, ...], int], ...]  # name, datatype, shape, size
    parameters: dict[str, Any]
    outputs: tuple[RequestedOutput, ...] | None
    binary_output: bool


class RequestDecoder:
    """``decode_request`` that remembers the JSON headers of binary requests it has decoded.

    A client sending binary tensors sends the same JSON header with every request of a shape;
    parsing and checking it is most of the decoding. A header whose every input is binary and
    which carries no ``id`` is remembered (at most ``max_entries`` headers of at most
    ``max_header_bytes``, the oldest forgotten first) as the names, datatypes, shapes and sizes
    it declared, keyed by its exact bytes; the next request with those bytes skips the JSON
    and the header checks but not the checks of the bytes that follow (sizes, BOOL values), so
    it decodes to exactly what ``decode_request`` gives, and fails the same way. Only headers
    that decoded without error are remembered. Thread-safe.
    """

    def __init__(
        self, max_entries: int = 64, max_header_bytes: int = 4096, max_inputs: int = MAX_INPUTS
    ) -> None:
        self._plans: dict[bytes, _Plan] = {}
        self._lock = threading.Lock()
        self.max_entries = max_entries
        self.max_header_bytes = max_header_bytes
        self.max_inputs = max_inputs

    def decode(self, body: bytes, header_length: str | None = None) -> DecodedRequest:
        """As ``decode_request(body, header_length)``.

        Raises:
            InputValidationError: as ``decode_request``.
        """
        if header_length is None:
            return decode_request(body, None, max_inputs=self.max_inputs)
        end = _header_length(header_length.strip(), body)
        if end > self.max_header_bytes or end == len(body):
            return decode_request(body, header_length, max_inputs=self.max_inputs)
        key = body[:end]
        plan = self._plans.get(key)
        if plan is None:
            decoded, plan = _decode(body, end, self.max_inputs)
            if plan is not None:
                with self._lock:
                    if len(self._plans) >= self.max_entries:
                        self._plans.pop(next(iter(self._plans)), None)
                    self._plans[key] = plan
            return decoded
        view = memoryview(body)
        offset = end
        inputs: dict[str, Array] = {}
        for name, datatype, shape, size in plan.inputs:
            inputs[name] = _binary_input(view, offset, size, datatype, shape, name)
            offset += size
        _check_consumed(offset, end, len(body))
        return DecodedRequest(inputs, None, dict(plan.parameters), plan.outputs, plan.binary_output)


def decode_request(
    body: bytes, header_length: str | None = None, *, max_inputs: int = MAX_INPUTS
) -> DecodedRequest:
    """Decode a v2 inference request body (JSON, or JSON header plus binary tensor data).

    Args:
        body: the whole HTTP request body.
        header_length: the ``Inference-Header-Content-Length`` header, ``None`` when absent
            (then the whole body is JSON and no input may be binary).
        max_inputs: more inputs than this are refused.

    Raises:
        InputValidationError: the body is not a valid v2 request; ``reason`` is one of the
            ``REASON_*`` labels and ``field`` names the input when one is at fault.
    """
    end = len(body) if header_length is None else _header_length(header_length.strip(), body)
    return _decode(body, end, max_inputs)[0]


def _decode(body: bytes, end: int, max_inputs: int) -> tuple[DecodedRequest, _Plan | None]:
    """``decode_request`` once the JSON header's end is known; with the header's plan when
    every input is binary and there is no ``id`` (see ``RequestDecoder``)."""
    try:
        doc = json.loads(body if end == len(body) else body[:end])
    except (ValueError, RecursionError) as exc:
        raise _bad(REASON_JSON, f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _bad(REASON_JSON, "request body must be a JSON object")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _bad(REASON_SCHEMA, "'inputs' must be a non-empty array")
    if len(raw_inputs) > max_inputs:
        raise _bad(REASON_TOO_MANY, f"{len(raw_inputs)} inputs; at most {max_inputs} allowed")
    view = memoryview(body)
    offset = end
    inputs: dict[str, Array] = {}
    declared: list[tuple[str, str, tuple[int, ...], int]] | None = []
    for index, raw in enumerate(raw_inputs):
        name, array, used = _decode_input(raw, index, view, offset)
        if name in inputs:
            raise _bad(REASON_SCHEMA, f"input {name!r} appears twice", name)
        inputs[name] = array
        offset += used
        if declared is not None:
            if "data" not in raw:  # binary: replayable from the header alone
                declared.append((name, raw["datatype"], array.shape, used))
            else:
                declared = None
    _check_consumed(offset, end, len(body))
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad(REASON_SCHEMA, "'id' must be a string")
    parameters = _object(doc.get("parameters"), "'parameters'", None)
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise _bad(REASON_SCHEMA, "parameter 'binary_data_output' must be a boolean")
    outputs = _requested_outputs(doc.get("outputs"))
    decoded = DecodedRequest(inputs, request_id, parameters, outputs, binary_output)
    if declared is None or request_id is not None:
        return decoded, None
    return decoded, _Plan(tuple(declared), dict(parameters), outputs, binary_output)


def _check_consumed(offset: int, end: int, size: int) -> None:
    if offset != size:
        binary = f"{size - end} bytes follow the JSON header"
        raise _bad(REASON_BINARY, f"inputs declare {offset - end} binary bytes but {binary}")


def _header_length(text: str, body: bytes) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 18 or int(text) > len(body):
        raise _bad(REASON_BINARY, f"{HEADER_LENGTH} {text!r} is not within the {len(body)} bytes")
    return int(text)


def _object(value: Any, what: str, field: str | None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):  # ``what`` may hold a {!r} for the field: formatted only here
        raise _bad(REASON_SCHEMA, f"{what.format(field)} must be a JSON object", field)
    return value


def _requested_outputs(raw: Any) -> tuple[RequestedOutput, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) > MAX_OUTPUTS:
        raise _bad(REASON_SCHEMA, f"'outputs' must be an array of at most {MAX_OUTPUTS}")
    wanted = []
    for entry in raw:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise _bad(REASON_SCHEMA, "each requested output needs a string 'name'")
        params = _object(entry.get("parameters"), "parameters of output {!r}", name)
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise _bad(REASON_SCHEMA, f"binary_data of output {name!r} must be a boolean", name)
        wanted.append(RequestedOutput(name, binary))
    return tuple(wanted)


def _decode_input(raw: Any, index: int, view: memoryview, offset: int) -> tuple[str, Array, int]:
    if not isinstance(raw, dict):
        raise _bad(REASON_SCHEMA, f"inputs[{index}] must be a JSON object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise _bad(REASON_SCHEMA, f"inputs[{index}] needs a non-empty string 'name'")
    datatype = raw.get("datatype")
    if not isinstance(datatype, str):
        raise _bad(REASON_SCHEMA, f"input {name!r} needs a string 'datatype'", name)
    shape = _shape(raw.get("shape"), name)
    params = _object(raw.get("parameters"), "parameters of input {!r}", name)
    size = params.get("binary_data_size")
    if size is None:
        if "data" not in raw:
            raise _bad(REASON_SCHEMA, f"input {name!r} has no data or binary_data_size", name)
        return name, _from_json(raw["data"], datatype, shape, name), 0
    if "data" in raw:
        raise _bad(REASON_SCHEMA, f"input {name!r} has both data and binary_data_size", name)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _bad(REASON_BINARY, f"binary_data_size of input {name!r} is not a byte count", name)
    return name, _binary_input(view, offset, size, datatype, shape, name), size


def _binary_input(
    view: memoryview, offset: int, size: int, datatype: str, shape: tuple[int, ...], name: str
) -> Array:
    if offset + size > len(view):
        left = len(view) - offset
        raise _bad(REASON_BINARY, f"input {name!r} declares {size} bytes; {left} remain", name)
    return _from_binary(view[offset : offset + size], datatype, shape, name)


def _shape(raw: Any, name: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_RANK:
        raise _bad(REASON_SHAPE, f"shape of {name!r} must be an array of <= {MAX_RANK} ints", name)
    for dim in raw:
        if not isinstance(dim, int) or isinstance(dim, bool) or not 0 <= dim <= MAX_DIM:
            raise _bad(REASON_SHAPE, f"shape of {name!r} has an invalid dimension {dim!r}", name)
    return tuple(raw)


def _unknown(datatype: str, name: str) -> InputValidationError:
    hint = " (numpy has no bfloat16: send FP32 or FP16)" if datatype == "BF16" else ""
    return _bad(REASON_DATATYPE, f"input {name!r}: unsupported datatype {datatype!r}{hint}", name)


def _from_json(data: Any, datatype: str, shape: tuple[int, ...], name: str) -> Array:
    if not isinstance(data, list):
        raise _bad(REASON_DATA, f"data of input {name!r} must be a JSON array", name)
    dtype = _NATIVE.get(datatype)
    if dtype is None and datatype != "BYTES":
        raise _unknown(datatype, name)
    try:
        array = np.array(data, dtype=object) if dtype is None else np.asarray(data)
    except (ValueError, TypeError, RecursionError):
        raise _bad(REASON_SHAPE, f"data of input {name!r} is ragged nested arrays", name) from None
    array = _fit_shape(array, shape, name)
    if dtype is None:
        return _text_elements(array, name)
    if array.size and array.dtype.kind not in _KINDS[datatype]:
        found = _KIND_WORDS.get(array.dtype.kind, str(array.dtype))
        raise _bad(REASON_DATA, f"input {name!r} is {datatype} but its data holds {found}", name)
    if array.dtype == dtype:
        return array
    if dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise _bad(REASON_DATA, f"data of input {name!r} is out of range for {datatype}", name)
    if dtype.kind != "f" or array.dtype.itemsize <= dtype.itemsize:
        return array.astype(dtype)
    with np.errstate(over="ignore"):  # FP64 -> FP32/FP16 overflow becomes Inf: validation counts it
        return array.astype(dtype)


def _fit_shape(array: Array, shape: tuple[int, ...], name: str) -> Array:
    if array.shape == shape:
        return array
    if array.ndim == 1 and array.size == math.prod(shape):
        return array.reshape(shape)
    got = f"{list(array.shape)} ({array.size} elements)"
    want = f"{list(shape)} ({math.prod(shape)} elements)"
    raise _bad(REASON_SHAPE, f"data of input {name!r} has shape {got}, declared {want}", name)


def _text_elements(array: Array, name: str) -> Array:
    items = array.reshape(-1).tolist()
    if not all(isinstance(item, str) for item in items):
        raise _bad(REASON_DATA, f"BYTES input {name!r} must hold strings", name)
    return np.array([item.encode() for item in items], dtype=object).reshape(array.shape)


def _from_binary(buf: memoryview, datatype: str, shape: tuple[int, ...], name: str) -> Array:
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_from_binary(buf, shape, count, name)
    wire = _WIRE.get(datatype)
    if wire is None:
        raise _unknown(datatype, name)
    if len(buf) != count * wire.itemsize:
        need = f"{datatype}{list(shape)} needs {count * wire.itemsize}"
        raise _bad(REASON_BINARY, f"input {name!r} has {len(buf)} bytes but {need}", name)
    array: Array = np.frombuffer(buf, dtype=wire)
    if datatype == "BOOL" and count and array.view(np.uint8).max() > 1:
        raise _bad(REASON_DATA, f"BOOL input {name!r} has bytes other than 0 and 1", name)
    if not wire.isnative:
        array = array.astype(_NATIVE[datatype])
    return array.reshape(shape)


def _bytes_from_binary(buf: memoryview, shape: tuple[int, ...], count: int, name: str) -> Array:
    items: list[bytes] = []
    pos, size = 0, len(buf)
    while len(items) < count and pos + 4 <= size:  # bounded by the bytes, not by the shape
        end = pos + 4 + int.from_bytes(buf[pos : pos + 4], "little")
        items.append(bytes(buf[pos + 4 : end]))
        pos = end
    if len(items) != count or pos != size:
        message = f"BYTES input {name!r}: {count} length-prefixed elements do not fill {size} bytes"
        raise _bad(REASON_BINARY, message, name)
    return np.array(items, dtype=object).reshape(shape)


def datatype_of(array: Array) -> str:
    """The v2 datatype name of a numpy array.

    Raises:
        InferenceError: the dtype has no v2 datatype (complex, datetime, structured, ...).
    """
    kind = array.dtype.kind
    if kind in "OSU":
        return "BYTES"
    name = _BY_KIND.get((kind, array.dtype.itemsize))
    if name is None:
        raise InferenceError(f"dtype {array.dtype} has no Open Inference Protocol datatype")
    return name


def encode_response(
    result: InferenceResult,
    *,
    request_id: str | None = None,
    outputs: tuple[RequestedOutput, ...] | None = None,
    binary_output: bool = False,
) -> EncodedResponse:
    """Encode ``result`` as a v2 inference response body.

    Args:
        result: what the service returned.
        request_id: echoed as ``id`` when given.
        outputs: the outputs the request asked for (in that order), ``None`` for all.
        binary_output: the request's ``binary_data_output`` (an output's own flag wins).

    Raises:
        InputValidationError: a requested output does not exist (reason ``output``).
        InferenceError: an output has a dtype the protocol cannot carry.
    """
    docs: list[dict[str, Any]] = []
    chunks: list[Any] = []
    for want in outputs if outputs is not None else map(RequestedOutput, result.outputs):
        value = result.outputs.get(want.name)
        if value is None:
            known = ", ".join(sorted(result.outputs))
            message = f"requested output {want.name!r} does not exist (outputs: {known})"
            raise _bad(REASON_OUTPUT, message, want.name)
        array = np.asarray(value)
        datatype = datatype_of(array)
        doc: dict[str, Any] = {"name": want.name, "datatype": datatype, "shape": list(array.shape)}
        data: list[Any] | None = None
        if not (binary_output if want.binary is None else want.binary):
            data = _text_json(array) if datatype == "BYTES" else array.reshape(-1).tolist()
        if data is None:  # binary asked for, or BYTES that are not UTF-8 text
            chunk, size = _to_binary(array, datatype)
            chunks.append(chunk)
            doc["parameters"] = {"binary_data_size": size}
        else:
            doc["data"] = data
        docs.append(doc)
    response: dict[str, Any] = {"model_name": result.model, "model_version": result.model_version}
    if request_id is not None:
        response["id"] = request_id
    response["parameters"] = parameters = {**result.parameters}
    parameters.update(model_version=result.model_version, inference_source=result.source)
    response["outputs"] = docs
    header = to_json(response)
    if not chunks:
        return EncodedResponse(header, None)
    return EncodedResponse(b"".join([header, *chunks]), len(header))


def _byte_items(array: Array) -> list[bytes]:
    return [
        x if isinstance(x, bytes) else x.encode() if isinstance(x, str) else str(x).encode()
        for x in array.reshape(-1).tolist()
    ]


def _text_json(array: Array) -> list[str] | None:
    try:
        return [item.decode() for item in _byte_items(array)]
    except UnicodeDecodeError:
        return None


def _to_binary(array: Array, datatype: str) -> tuple[Any, int]:
    if datatype == "BYTES":
        chunk = b"".join(len(b).to_bytes(4, "little") + b for b in _byte_items(array))
        return chunk, len(chunk)
    contiguous = np.ascontiguousarray(array, dtype=_WIRE[datatype])
    return contiguous, contiguous.nbytes  # bytes.join reads the array's buffer: no extra copy


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, set | frozenset):
        return list(value)
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


# What json.dumps(separators=..., default=...) builds on every call, built once (stateless).
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_json_default)


def to_json(document: Any) -> bytes:
    """Compact JSON bytes; numpy values and other oddities in parameters become plain JSON."""
    return _ENCODER.encode(document).encode()
