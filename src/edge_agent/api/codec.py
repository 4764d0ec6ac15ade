"""Open Inference Protocol (KServe v2) tensors: JSON and the binary tensor data extension.

The wire format both ways, and response encoding: ``InferenceResult`` -> response body
(``encode_response``, owned here). Request body -> numpy arrays is ``decode_request`` in
``edge_agent.api.decode`` (with the request limits and ``REASON_*`` labels), and ``RequestDecoder``,
its header cache, is in ``edge_agent.api.header_cache``; the rules below hold for both directions.
Does not own HTTP (``edge_agent.api.endpoints``) or running models (the service). With the binary
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
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import orjson

from edge_agent.api.decode import (
    DATATYPE_BY_KIND,
    REASON_OUTPUT,
    WIRE_DTYPES,
    RequestedOutput,
    invalid_input,
)
from edge_agent.errors import InferenceError
from edge_agent.serving.service import Array, InferenceResult

__all__ = ["EncodedResponse", "datatype_of", "encode_response", "requested_outputs", "to_json"]


class EncodedResponse(NamedTuple):
    """A response body; ``header_length`` is set (the JSON's length) when binary data follows."""

    body: bytes
    header_length: int | None


def datatype_of(array: Array) -> str:
    """The v2 datatype name of a numpy array.

    Raises:
        InferenceError: the dtype has no v2 datatype (complex, datetime, structured, ...).
    """
    kind = array.dtype.kind
    if kind in "OSU":
        return "BYTES"
    name = DATATYPE_BY_KIND.get((kind, array.dtype.itemsize))
    if name is None:
        raise InferenceError(f"dtype {array.dtype} has no Open Inference Protocol datatype")
    return name


def requested_outputs(
    result: InferenceResult, outputs: tuple[RequestedOutput, ...] | None
) -> Iterator[tuple[RequestedOutput, Array, str]]:
    """The outputs to answer with, in the request's order (all of them when it named none):
    each as its request entry, its array and its protocol datatype. Every front end encodes these.

    Raises:
        InputValidationError: a requested output does not exist (reason ``output``).
        InferenceError: an output has a dtype the protocol cannot carry.
    """
    for want in outputs if outputs is not None else map(RequestedOutput, result.outputs):
        value = result.outputs.get(want.name)
        if value is None:
            known = ", ".join(sorted(result.outputs))
            message = f"requested output {want.name!r} does not exist (outputs: {known})"
            raise invalid_input(REASON_OUTPUT, message, want.name)
        array = np.asarray(value)
        yield want, array, datatype_of(array)


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
    finite = True  # no NaN/Infinity in the JSON data (see ``_response_json``)
    for want, array, datatype in requested_outputs(result, outputs):
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
            if finite and array.dtype.kind == "f" and array.size:
                finite = bool(np.isfinite(array).all())
        docs.append(doc)
    response: dict[str, Any] = {"model_name": result.model, "model_version": result.model_version}
    if request_id is not None:
        response["id"] = request_id
    response["parameters"] = parameters = {**result.parameters}
    parameters.update(model_version=result.model_version, inference_source=result.source)
    response["outputs"] = docs
    header = _response_json(response) if finite else to_json(response)
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
    contiguous = np.ascontiguousarray(array, dtype=WIRE_DTYPES[datatype])
    return contiguous, contiguous.nbytes  # bytes.join reads the array's buffer: no extra copy


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, set | frozenset):
        return list(value)
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _response_json(document: dict[str, Any]) -> bytes:
    """``to_json(document)``'s JSON values, through orjson when it writes the same ones.

    orjson is an order of magnitude faster on the output data; its text may differ in form
    only (non-ASCII characters as UTF-8, not ``\\u`` escapes; ``1e-7`` for ``1e-07``), never
    in the values. The caller sends no NaN/Infinity data (orjson writes null, ``to_json`` the
    tokens the NaN policy promises); the parameters (whatever the service or the cloud put
    there) go through orjson only when they are plain JSON values, and integers beyond 64 bits
    or lone surrogates, which orjson refuses, go to ``to_json``.
    """
    if _plain(document["parameters"]):
        try:
            return orjson.dumps(document)
        except orjson.JSONEncodeError:
            pass
    return to_json(document)


def _plain(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is JSON made of exact built-in types, finite floats and str keys."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return True
    if kind is float:
        return math.isfinite(value)
    if depth > 8:
        return False
    if kind is dict:  # loops, not all(generator): this runs on every answer
        for key, item in value.items():
            if type(key) is not str or not _plain(item, depth + 1):
                return False
        return True
    if kind is list:
        return all(_plain(item, depth + 1) for item in value)
    return False


# What json.dumps(separators=..., default=...) builds on every call, built once (stateless).
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_json_default)


def to_json(document: Any) -> bytes:
    """Compact JSON bytes; numpy values and other oddities in parameters become plain JSON."""
    return _ENCODER.encode(document).encode()
