"""Open Inference Protocol (KServe v2) request decoding: request body -> numpy arrays (pure).

Owns ``decode_request`` (JSON, and the binary tensor data extension), the request limits
(``MAX_*``), the stable ``REASON_*`` labels, the wire datatype tables and the decoded value
types. The rules (strictness, NaN policy, binary layout) are described in ``edge_agent.api.codec``.
Does not own the cache of binary requests' JSON headers
(``edge_agent.api.header_cache``), response encoding (``edge_agent.api.codec``) or the checks of
a request against the model (the service).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import orjson

from edge_agent.errors import InputValidationError
from edge_agent.serving.service import Array

MAX_INPUTS = 64
MAX_OUTPUTS = 256
MAX_RANK = 32
MAX_DIM = 2**31 - 1
# The product of an empty shape's non-zero dimensions: numpy refuses to make even an empty array
# whose span (times the item size) overflows its index type, so [0, 2**31-1, 2**31-1, 2**31-1]
# must be refused here, as a shape error, not reach numpy. (A non-empty shape that large never
# reaches numpy either: its data or byte count cannot match.) 2**40 is past any memory budget.
MAX_SPAN = 2**40
HEADER_LENGTH = "inference-header-content-length"
#: JSON texts up to this size are parsed by orjson (see ``parse_json``); larger ones by ``json``.
FAST_JSON_BYTES = 64 * 1024

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
WIRE_DTYPES: dict[str, np.dtype[Any]] = {
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
NATIVE_DTYPES = {name: dt.newbyteorder("=") for name, dt in WIRE_DTYPES.items()}


def _numpy_discovery() -> Callable[[list[Any]], tuple[np.dtype[Any] | None, Any]] | None:
    """numpy's element-type discovery, which allocates nothing (numpy >= 1.21; private API),
    if this numpy has it and it answers as expected; else None (``_scan_kind`` is used).

    Checked once here: a numpy whose private function changed would otherwise fail every JSON
    request (its error would read as ragged data), not just run slower.
    """
    try:
        from numpy._core._multiarray_umath import (  # type: ignore[import-not-found]
            _discover_array_parameters as discover,
        )

        ok = (discover([[1, 2]])[0].kind, discover(["a", 0])[0].kind, discover([])[0])
    except (ImportError, AttributeError, TypeError, ValueError, IndexError):
        return None  # pragma: no cover - another numpy
    return discover if ok == ("i", "U", None) else None


_discover = _numpy_discovery()
_KINDS = {n: "b" if n == "BOOL" else "fiu" if n[:2] == "FP" else "iu" for n in WIRE_DTYPES}
DATATYPE_BY_KIND = {(dt.kind, dt.itemsize): name for name, dt in WIRE_DTYPES.items()}


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


def invalid_input(reason: str, message: str, field: str | None = None) -> InputValidationError:
    """The ``InputValidationError`` of a refused request (``reason``: a ``REASON_*`` label)."""
    return InputValidationError(message, field=field, reason=reason)


class BinaryPlan(NamedTuple):
    """What a binary request's JSON header says, independent of the bytes that follow it."""

    inputs: tuple[tuple[str, str, tuple[int, ...], int], ...]  # name, datatype, shape, size
    parameters: dict[str, Any]
    outputs: tuple[RequestedOutput, ...] | None
    binary_output: bool


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
    end = len(body) if header_length is None else parse_header_length(header_length.strip(), body)
    return decode_body(body, end, max_inputs)[0]


def decode_body(body: bytes, end: int, max_inputs: int) -> tuple[DecodedRequest, BinaryPlan | None]:
    """``decode_request`` once the JSON header's end is known; with the header's plan when
    every input is binary and there is no ``id`` (see ``RequestDecoder``)."""
    try:
        doc = parse_json(body if end == len(body) else body[:end])
    except (ValueError, RecursionError) as exc:
        raise invalid_input(REASON_JSON, f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise invalid_input(REASON_JSON, "request body must be a JSON object")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise invalid_input(REASON_SCHEMA, "'inputs' must be a non-empty array")
    if len(raw_inputs) > max_inputs:
        raise invalid_input(
            REASON_TOO_MANY, f"{len(raw_inputs)} inputs; at most {max_inputs} allowed"
        )
    view = memoryview(body)
    offset = end
    inputs: dict[str, Array] = {}
    declared: list[tuple[str, str, tuple[int, ...], int]] | None = []
    for index, raw in enumerate(raw_inputs):
        name, array, used = _decode_input(raw, index, view, offset)
        if name in inputs:
            raise invalid_input(REASON_SCHEMA, f"input {name!r} appears twice", name)
        inputs[name] = array
        offset += used
        if declared is not None:
            if "data" not in raw:  # binary: replayable from the header alone
                declared.append((name, raw["datatype"], array.shape, used))
            else:
                declared = None
    check_consumed(offset, end, len(body))
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise invalid_input(REASON_SCHEMA, "'id' must be a string")
    parameters = _object(doc.get("parameters"), "'parameters'", None)
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise invalid_input(REASON_SCHEMA, "parameter 'binary_data_output' must be a boolean")
    outputs = _requested_outputs(doc.get("outputs"))
    decoded = DecodedRequest(inputs, request_id, parameters, outputs, binary_output)
    if declared is None or request_id is not None:
        return decoded, None
    return decoded, BinaryPlan(tuple(declared), dict(parameters), outputs, binary_output)


# Digits -> "1", anything else -> " ": a run of 19 "1"s marks a number of 19 or more digits.
_DIGIT_RUNS = bytes(0x31 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
_LONG_NUMBER = b"1" * 19


def parse_json(text: bytes) -> Any:
    """``json.loads(text)``: the same value, or the same error, several times faster.

    orjson parses what it accepts to exactly the value ``json`` gives (the same types, floats
    correctly rounded), with two differences handled here: it refuses some texts ``json``
    accepts (NaN and Infinity, numbers beyond the float range, lone surrogates, a byte order
    mark, UTF-16/32), which then go to ``json`` as before, and it turns integers beyond 64 bits
    into floats, which would let one through where ``json``'s int makes the tensor checks
    refuse it, so a text with a run of 19 or more digits goes to ``json`` directly. Texts over
    ``FAST_JSON_BYTES`` go to ``json`` too: ``edge_agent.api.budget`` bounds the memory of large
    bodies with ``json``'s costs, and orjson builds an intermediate document first.

    Raises:
        ValueError, RecursionError: as ``json.loads``.
    """
    if len(text) <= FAST_JSON_BYTES and _LONG_NUMBER not in text.translate(_DIGIT_RUNS):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass  # json decides, and words the error as before
    return json.loads(text)


def check_consumed(offset: int, end: int, size: int) -> None:
    """Refuse a binary request whose inputs do not account for every byte after the header.

    Raises:
        InputValidationError: ``REASON_BINARY``.
    """
    if offset != size:
        binary = f"{size - end} bytes follow the JSON header"
        raise invalid_input(
            REASON_BINARY, f"inputs declare {offset - end} binary bytes but {binary}"
        )


def parse_header_length(text: str, body: bytes) -> int:
    """The Inference-Header-Content-Length value, checked against the body's size.

    Raises:
        InputValidationError: ``REASON_BINARY`` for a value that is not within the body.
    """
    if not (text.isascii() and text.isdigit()) or len(text) > 18 or int(text) > len(body):
        raise invalid_input(
            REASON_BINARY, f"{HEADER_LENGTH} {text!r} is not within the {len(body)} bytes"
        )
    return int(text)


def _object(value: Any, what: str, field: str | None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):  # ``what`` may hold a {!r} for the field: formatted only here
        raise invalid_input(REASON_SCHEMA, f"{what.format(field)} must be a JSON object", field)
    return value


def _requested_outputs(raw: Any) -> tuple[RequestedOutput, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) > MAX_OUTPUTS:
        raise invalid_input(REASON_SCHEMA, f"'outputs' must be an array of at most {MAX_OUTPUTS}")
    wanted = []
    for entry in raw:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise invalid_input(REASON_SCHEMA, "each requested output needs a string 'name'")
        params = _object(entry.get("parameters"), "parameters of output {!r}", name)
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise invalid_input(
                REASON_SCHEMA, f"binary_data of output {name!r} must be a boolean", name
            )
        wanted.append(RequestedOutput(name, binary))
    return tuple(wanted)


def _decode_input(raw: Any, index: int, view: memoryview, offset: int) -> tuple[str, Array, int]:
    if not isinstance(raw, dict):
        raise invalid_input(REASON_SCHEMA, f"inputs[{index}] must be a JSON object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise invalid_input(REASON_SCHEMA, f"inputs[{index}] needs a non-empty string 'name'")
    datatype = raw.get("datatype")
    if not isinstance(datatype, str):
        raise invalid_input(REASON_SCHEMA, f"input {name!r} needs a string 'datatype'", name)
    shape = _shape(raw.get("shape"), name)
    params = _object(raw.get("parameters"), "parameters of input {!r}", name)
    size = params.get("binary_data_size")
    if size is None:
        if "data" not in raw:
            raise invalid_input(
                REASON_SCHEMA, f"input {name!r} has no data or binary_data_size", name
            )
        return name, _from_json(raw["data"], datatype, shape, name), 0
    if "data" in raw:
        raise invalid_input(
            REASON_SCHEMA, f"input {name!r} has both data and binary_data_size", name
        )
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise invalid_input(
            REASON_BINARY, f"binary_data_size of input {name!r} is not a byte count", name
        )
    return name, binary_tensor(view, offset, size, datatype, shape, name), size


def binary_tensor(
    view: memoryview, offset: int, size: int, datatype: str, shape: tuple[int, ...], name: str
) -> Array:
    """The ``size`` bytes at ``offset`` of the body as input ``name``'s array.

    Raises:
        InputValidationError: fewer bytes remain, or they do not fit the datatype and shape.
    """
    if offset + size > len(view):
        left = len(view) - offset
        raise invalid_input(
            REASON_BINARY, f"input {name!r} declares {size} bytes; {left} remain", name
        )
    return from_binary(view[offset : offset + size], datatype, shape, name)


def _shape(raw: Any, name: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_RANK:
        raise invalid_input(
            REASON_SHAPE, f"shape of {name!r} must be an array of <= {MAX_RANK} ints", name
        )
    for dim in raw:
        if not isinstance(dim, int) or isinstance(dim, bool) or not 0 <= dim <= MAX_DIM:
            raise invalid_input(
                REASON_SHAPE, f"shape of {name!r} has an invalid dimension {dim!r}", name
            )
    return check_span(tuple(raw), name)


def check_span(shape: tuple[int, ...], name: str) -> tuple[int, ...]:
    """``shape``, unless it has no elements and its non-zero dimensions span over ``MAX_SPAN``.

    Every front end's shape reader calls it after checking rank and dimensions.

    Raises:
        InputValidationError: an empty shape numpy could not make.
    """
    if 0 in shape and math.prod(d for d in shape if d) > MAX_SPAN:
        raise invalid_input(
            REASON_SHAPE, f"shape of {name!r} spans more than {MAX_SPAN} elements", name
        )
    return shape


def unknown_datatype(datatype: str, name: str) -> InputValidationError:
    """The error for a datatype the protocol (or numpy) does not have."""
    hint = " (numpy has no bfloat16: send FP32 or FP16)" if datatype == "BF16" else ""
    return invalid_input(
        REASON_DATATYPE, f"input {name!r}: unsupported datatype {datatype!r}{hint}", name
    )


def _from_json(data: Any, datatype: str, shape: tuple[int, ...], name: str) -> Array:
    if not isinstance(data, list):
        raise invalid_input(REASON_DATA, f"data of input {name!r} must be a JSON array", name)
    dtype = NATIVE_DTYPES.get(datatype)
    if dtype is None and datatype != "BYTES":
        raise unknown_datatype(datatype, name)
    try:
        if dtype is not None:
            _refuse_text(data, datatype, name)
        array = np.array(data, dtype=object) if dtype is None else np.asarray(data)
    except (ValueError, TypeError, RecursionError):
        raise invalid_input(
            REASON_SHAPE, f"data of input {name!r} is ragged nested arrays", name
        ) from None
    array = _fit_shape(array, shape, name)
    if dtype is None:
        return _text_elements(array, name)
    if array.size and array.dtype.kind not in _KINDS[datatype]:
        found = _KIND_WORDS.get(array.dtype.kind, str(array.dtype))
        raise invalid_input(
            REASON_DATA, f"input {name!r} is {datatype} but its data holds {found}", name
        )
    if array.dtype == dtype:
        return array
    if dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise invalid_input(
                REASON_DATA, f"data of input {name!r} is out of range for {datatype}", name
            )
    if dtype.kind != "f" or array.dtype.itemsize <= dtype.itemsize:
        return array.astype(dtype)
    with np.errstate(over="ignore"):  # FP64 -> FP32/FP16 overflow becomes Inf: validation counts it
        return array.astype(dtype)


def _refuse_text(data: list[Any], datatype: str, name: str) -> None:
    """Refuse strings and other non-numbers in a numeric tensor before numpy allocates.

    ``np.asarray`` turns a list mixing one long string with numbers into a unicode array whose
    every element is as wide as the longest string: a 40 KB body would allocate 400 MB. So the
    element type is found first, without allocating (numpy's own discovery; a scan of the
    lists where that is unavailable), and anything but numbers and booleans is refused.

    Raises:
        InputValidationError: the data holds strings, nulls or other objects (``data``).
        ValueError: ragged nested lists.
    """
    kind = _element_kind(data)
    if kind in "USO":
        found = _KIND_WORDS.get(kind, kind)
        raise invalid_input(
            REASON_DATA, f"input {name!r} is {datatype} but its data holds {found}", name
        )


def _element_kind(data: list[Any]) -> str:
    if _discover is not None:
        found: np.dtype[Any] | None = _discover(data)[0]  # None: no elements at all
        return "f" if found is None else found.kind
    return _scan_kind(data)


def _scan_kind(data: list[Any]) -> str:
    kinds = set(map(type, data))
    if list in kinds:
        nested = [_scan_kind(x) for x in data if type(x) is list]
        if any(k in "USO" for k in nested):
            return next(k for k in nested if k in "USO")
        kinds.discard(list)
    if kinds - {int, float, bool}:
        return "U" if str in kinds else "O"
    return "f"


def _fit_shape(array: Array, shape: tuple[int, ...], name: str) -> Array:
    if array.shape == shape:
        return array
    if array.ndim == 1 and array.size == math.prod(shape):
        return array.reshape(shape)
    got = f"{list(array.shape)} ({array.size} elements)"
    want = f"{list(shape)} ({math.prod(shape)} elements)"
    raise invalid_input(
        REASON_SHAPE, f"data of input {name!r} has shape {got}, declared {want}", name
    )


def _text_elements(array: Array, name: str) -> Array:
    items = array.reshape(-1).tolist()
    if not all(isinstance(item, str) for item in items):
        raise invalid_input(REASON_DATA, f"BYTES input {name!r} must hold strings", name)
    return np.array([item.encode() for item in items], dtype=object).reshape(array.shape)


def from_binary(buf: memoryview, datatype: str, shape: tuple[int, ...], name: str) -> Array:
    """A binary tensor's bytes as an array of ``datatype`` and ``shape`` (little-endian wire).

    Raises:
        InputValidationError: unknown datatype, or a byte count that does not fit the shape.
    """
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_from_binary(buf, shape, count, name)
    wire = WIRE_DTYPES.get(datatype)
    if wire is None:
        raise unknown_datatype(datatype, name)
    if len(buf) != count * wire.itemsize:
        need = f"{datatype}{list(shape)} needs {count * wire.itemsize}"
        raise invalid_input(REASON_BINARY, f"input {name!r} has {len(buf)} bytes but {need}", name)
    array: Array = np.frombuffer(buf, dtype=wire)
    if datatype == "BOOL" and count and array.view(np.uint8).max() > 1:
        raise invalid_input(REASON_DATA, f"BOOL input {name!r} has bytes other than 0 and 1", name)
    if not wire.isnative:
        array = array.astype(NATIVE_DTYPES[datatype])
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
        raise invalid_input(REASON_BINARY, message, name)
    return np.array(items, dtype=object).reshape(shape)
