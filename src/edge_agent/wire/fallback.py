"""The cloud-fallback wire format: one request and one response, as typed value objects.

Owns: ``FallbackRequest`` and ``FallbackResponse`` (frozen, strict ``to_bytes``/``from_bytes``
and ``to_dict``/``from_dict`` for the header), the binary framing of named tensors and its caps.
Does not own ``compare_outputs``, the disagreement measure the device and the server both compute
(``edge_agent.wire.fallback_compare``; import it from there). Does not send anything
(``edge_agent.serving.fallback_mqtt`` and ``fleet_server.fallback.worker`` do) and never runs a
model.

Framing (all integers little-endian)::

    b"EFFB" | u32 header length | header (UTF-8 JSON) | tensor buffers, back to back

The header (``schemas/fallback-header.schema.json``) lists each tensor's name, dtype and shape;
the buffers follow in header order (request: ``inputs`` then ``device_outputs``; response:
``outputs``), each ``prod(shape) * itemsize`` raw little-endian bytes. Every byte of a message
is accounted for: a short or long body is refused. JSON for the header keeps it readable by
any consumer; raw buffers keep a 64-row float batch at a memcpy instead of a float parse.

Versions: a request names the model version the device runs (``model_version``, optional so
requests of agents older than the field still parse); the cloud answers with that version's
cloud model, never a newer published one. A request that names a version the cloud does not
serve gets ``unknown_version``; a request without one is resolved by the server from what the
registry says the device runs (see ``docs/fallback.md``). Servers must be upgraded before
devices: an older server refuses the field as unknown (``bad_request``).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from edge_agent import strict_json
from edge_agent.errors import ContractError

__all__ = [
    "CONTENT_TYPE",
    "DTYPES",
    "ERROR_CODES",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_RANK",
    "MAX_TENSORS",
    "MAX_VERSION",
    "SCHEMA_VERSION",
    "FallbackRequest",
    "FallbackResponse",
]

SCHEMA_VERSION: Final = 1
MAGIC: Final = b"EFFB"
CONTENT_TYPE: Final = "application/vnd.edgefleet.fallback.v1"
#: Largest message either side builds or accepts (header + buffers).
MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
MAX_HEADER_BYTES: Final = 16 * 1024
MAX_TENSORS: Final = 32
MAX_RANK: Final = 8
MAX_NAME: Final = 128
MAX_MESSAGE_TEXT: Final = 512
#: Longest deadline a request may carry (ms); a fallback answer is interactive or useless.
MAX_DEADLINE_MS: Final = 60_000.0
#: Element types on the wire (numpy names); always little-endian.
DTYPES: Final = (
    "float16",
    "float32",
    "float64",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "bool",
)
#: Stable error codes of a ``FallbackResponse`` (and the server's counters).
#: ``unknown_version`` only answers requests that name a version (agents that know the code).
ERROR_CODES: Final = (
    "bad_request",
    "unknown_model",
    "unknown_version",
    "inference_failed",
    "overloaded",
    "internal",
)
#: Largest model version a request may name (a JSON-safe integer, as in the manifest).
MAX_VERSION: Final = 2**53 - 1

_PREFIX = struct.Struct("<4sI")
_HEADER_KEYS_REQ: Final = {"schema_version", "kind", "model", "deadline_ms", "reason", "inputs"}
_HEADER_KEYS_RESP: Final = {"schema_version", "kind", "model", "model_version", "outputs"}
_OPTIONAL_REQ: Final = {"device_outputs", "model_version"}
_OPTIONAL_RESP: Final = {"error", "compute_ms"}

Tensor = npt.NDArray[Any]
TensorMap = Mapping[str, Tensor]


def _fail(message: str) -> ContractError:
    return ContractError(f"fallback message: {message}")


def _text(value: Any, what: str, limit: int = MAX_NAME, *, empty: bool = False) -> str:
    if not isinstance(value, str) or len(value) > limit or (not value and not empty):
        raise _fail(f"{what} must be a string of 1-{limit} characters")
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(f"{what} must be a finite number")
    return float(value)


def _version(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VERSION:
        raise _fail(f"model_version must be an integer 1-{MAX_VERSION}, got {value!r}")
    return value


def _exact_keys(d: Any, required: set[str], optional: set[str], what: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise _fail(f"{what} must be an object")
    keys = set(d)
    if missing := required - keys:
        raise _fail(f"{what} lacks {sorted(missing)}")
    if extra := keys - required - optional:
        raise _fail(f"{what} has unknown fields {sorted(extra)}")
    return d


# ------------------------------------------------------------------------ tensor framing
@dataclass(frozen=True)
class _Spec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def _spec_from_dict(d: Any, what: str) -> _Spec:
    d = _exact_keys(d, {"name", "dtype", "shape"}, set(), what)
    name = _text(d["name"], f"{what}.name")
    if d["dtype"] not in DTYPES:
        raise _fail(f"{what}.dtype {d['dtype']!r} is not one of {DTYPES}")
    shape = d["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise _fail(f"{what}.shape must be a list of at most {MAX_RANK} sizes")
    for n in shape:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_MESSAGE_BYTES:
            raise _fail(f"{what}.shape has an invalid size {n!r}")
    return _Spec(name, str(d["dtype"]), tuple(shape))


def _specs_from_list(value: Any, what: str) -> list[_Spec]:
    if not isinstance(value, list) or len(value) > MAX_TENSORS:
        raise _fail(f"{what} must be a list of at most {MAX_TENSORS} tensors")
    specs = [_spec_from_dict(v, f"{what}[{i}]") for i, v in enumerate(value)]
    if len({s.name for s in specs}) != len(specs):
        raise _fail(f"{what} repeats a tensor name")
    return specs


def _check_tensors(tensors: Mapping[str, Any], what: str) -> dict[str, Tensor]:
    """Arrays with a wire dtype and rank; copies nothing that is already little-endian."""
    if not isinstance(tensors, Mapping) or len(tensors) > MAX_TENSORS:
        raise _fail(f"{what} must be a mapping of at most {MAX_TENSORS} tensors")
    out: dict[str, Tensor] = {}
    for name, value in tensors.items():
        _text(name, f"{what} name")
        arr = np.asarray(value)
        if arr.dtype.name not in DTYPES:
            raise _fail(f"{what}[{name!r}] has unsupported dtype {arr.dtype}")
        if arr.ndim > MAX_RANK:
            raise _fail(f"{what}[{name!r}] has rank {arr.ndim} > {MAX_RANK}")
        out[name] = arr
    return out


def _specs(tensors: Mapping[str, Tensor]) -> list[_Spec]:
    return [_Spec(n, a.dtype.name, tuple(int(s) for s in a.shape)) for n, a in tensors.items()]


def _buffers(tensors: Mapping[str, Tensor]) -> list[bytes]:
    return [
        np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes() for a in tensors.values()
    ]


def _frame(header: dict[str, Any], groups: Sequence[Mapping[str, Tensor]]) -> bytes:
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise _fail(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    parts = [_PREFIX.pack(MAGIC, len(head)), head]
    for g in groups:
        parts += _buffers(g)
    total = sum(len(p) for p in parts)
    if total > MAX_MESSAGE_BYTES:
        raise _fail(f"message of {total} bytes exceeds {MAX_MESSAGE_BYTES}")
    return b"".join(parts)


def _unframe(data: bytes) -> tuple[dict[str, Any], memoryview]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _fail("payload must be bytes")
    if len(data) > MAX_MESSAGE_BYTES:
        raise _fail(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    if len(data) < _PREFIX.size:
        raise _fail("message shorter than its prefix")
    magic, n = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise _fail("bad magic (not a fallback message)")
    if n > MAX_HEADER_BYTES or _PREFIX.size + n > len(data):
        raise _fail(f"header length {n} is too large for the message")
    view = memoryview(data)
    header = strict_json.loads(
        view[_PREFIX.size : _PREFIX.size + n],
        max_bytes=MAX_HEADER_BYTES,
        what="fallback message header",
        error=ContractError,
    )
    if not isinstance(header, dict):
        raise _fail("header must be an object")
    return header, view[_PREFIX.size + n :]


def _read_tensors(
    specs: list[_Spec], body: memoryview, offset: int
) -> tuple[dict[str, Tensor], int]:
    out: dict[str, Tensor] = {}
    for s in specs:
        end = offset + s.nbytes
        if end > len(body):
            raise _fail(f"body too short for tensor {s.name!r}")
        dt = np.dtype(s.dtype).newbyteorder("<")
        arr = np.frombuffer(body[offset:end], dtype=dt).reshape(s.shape)
        out[s.name] = arr.astype(arr.dtype.newbyteorder("="), copy=True)
        offset = end
    return out, offset


def _header_version(header: dict[str, Any], kind: str) -> None:
    if header.get("schema_version") != SCHEMA_VERSION:
        raise _fail(f"unsupported schema_version {header.get('schema_version')!r}")
    if header.get("kind") != kind:
        raise _fail(f"expected a {kind}, got kind {header.get('kind')!r}")


# ------------------------------------------------------------------------ value objects
@dataclass(frozen=True)
class FallbackRequest:
    """A device's request to the cloud copy of ``model``.

    Attributes:
        model: Model name (the cloud serves its own version of it).
        inputs: Named input tensors, as the device's runtime would feed them.
        deadline_ms: Time the device waits, counted by the server from when it received the
            request; an answer that cannot be sent within it is dropped, not sent late.
        reason: Why the device asked (``Decision.reason``), for the server's counters.
        device_outputs: The device's own answer when it has one (hard examples), so the server
            can count disagreement too; empty otherwise.
        model_version: The version of ``model`` the device runs (the cloud answers with that
            version's cloud model); None when the device runs none, or for requests of older
            agents (the server then asks its registry).
    """

    model: str
    inputs: Mapping[str, Tensor]
    deadline_ms: float
    reason: str = "policy"
    device_outputs: Mapping[str, Tensor] = field(default_factory=dict)
    model_version: int | None = None

    def __post_init__(self) -> None:
        """Raises: ContractError: a field is out of range or a tensor cannot be framed."""
        _text(self.model, "model")
        _version(self.model_version)
        _text(self.reason, "reason")
        d = _number(self.deadline_ms, "deadline_ms")
        if not 0 < d <= MAX_DEADLINE_MS:
            raise _fail(f"deadline_ms {d} outside (0, {MAX_DEADLINE_MS}]")
        if not self.inputs:
            raise _fail("a request needs at least one input")
        object.__setattr__(self, "inputs", _check_tensors(self.inputs, "inputs"))
        object.__setattr__(
            self, "device_outputs", _check_tensors(self.device_outputs, "device_outputs")
        )

    def to_dict(self) -> dict[str, Any]:
        """The header (no buffers)."""
        d: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "kind": "request",
            "model": self.model,
            "deadline_ms": self.deadline_ms,
            "reason": self.reason,
            "inputs": [s.to_dict() for s in _specs(self.inputs)],
        }
        if self.model_version is not None:
            d["model_version"] = self.model_version
        if self.device_outputs:
            d["device_outputs"] = [s.to_dict() for s in _specs(self.device_outputs)]
        return d

    def to_bytes(self) -> bytes:
        """The framed message.

        Raises:
            ContractError: it would exceed ``MAX_MESSAGE_BYTES`` or ``MAX_HEADER_BYTES``.
        """
        return _frame(self.to_dict(), (self.inputs, self.device_outputs))

    @classmethod
    def from_bytes(cls, data: bytes) -> FallbackRequest:
        """Parse and check a framed request.

        Raises:
            ContractError: wrong magic, version or kind, unknown or missing fields, bad dtype,
                shape or name, a body that does not match the header, or over a cap.
        """
        header, body = _unframe(data)
        _header_version(header, "request")
        h = _exact_keys(header, _HEADER_KEYS_REQ, _OPTIONAL_REQ, "request header")
        ins = _specs_from_list(h["inputs"], "inputs")
        outs = _specs_from_list(h.get("device_outputs", []), "device_outputs")
        inputs, off = _read_tensors(ins, body, 0)
        device_outputs, off = _read_tensors(outs, body, off)
        if off != len(body):
            raise _fail(f"{len(body) - off} bytes after the last tensor")
        return cls(
            model=_text(h["model"], "model"),
            inputs=inputs,
            deadline_ms=_number(h["deadline_ms"], "deadline_ms"),
            reason=_text(h["reason"], "reason"),
            device_outputs=device_outputs,
            model_version=_version(h.get("model_version")),
        )


@dataclass(frozen=True)
class FallbackResponse:
    """The cloud's answer: outputs and the cloud model's version, or an error.

    Attributes:
        model: Model name the request asked for.
        model_version: Version of the cloud model that answered ("" on errors before a model
            was chosen).
        outputs: Named output tensors (empty on errors).
        error_code: One of ``ERROR_CODES``, or None on success.
        error_message: Human-readable detail of the error ("" on success).
        compute_ms: Time the cloud model itself took (for the device's latency split).
    """

    model: str
    model_version: str
    outputs: Mapping[str, Tensor] = field(default_factory=dict)
    error_code: str | None = None
    error_message: str = ""
    compute_ms: float = 0.0

    def __post_init__(self) -> None:
        """Raises: ContractError: a field is out of range or a tensor cannot be framed."""
        _text(self.model, "model")
        _text(self.model_version, "model_version", empty=True)
        _text(self.error_message, "error_message", MAX_MESSAGE_TEXT, empty=True)
        if self.error_code is not None and self.error_code not in ERROR_CODES:
            raise _fail(f"error code {self.error_code!r} is not one of {ERROR_CODES}")
        if self.error_code is not None and self.outputs:
            raise _fail("an error response carries no outputs")
        if _number(self.compute_ms, "compute_ms") < 0:
            raise _fail("compute_ms must be >= 0")
        object.__setattr__(self, "outputs", _check_tensors(self.outputs, "outputs"))

    @classmethod
    def failure(cls, model: str, code: str, message: str) -> FallbackResponse:
        """An error response (``message`` is cut to the wire limit).

        Raises:
            ContractError: ``code`` is not one of ``ERROR_CODES`` or ``model`` is invalid.
        """
        return cls(model, "", {}, code, message[:MAX_MESSAGE_TEXT])

    @property
    def ok(self) -> bool:
        """True when the response carries outputs rather than an error."""
        return self.error_code is None

    def to_dict(self) -> dict[str, Any]:
        """The header (no buffers)."""
        d: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "kind": "response",
            "model": self.model,
            "model_version": self.model_version,
            "outputs": [s.to_dict() for s in _specs(self.outputs)],
            "compute_ms": round(self.compute_ms, 3),
        }
        if self.error_code is not None:
            d["error"] = {"code": self.error_code, "message": self.error_message}
        return d

    def to_bytes(self) -> bytes:
        """The framed message.

        Raises:
            ContractError: it would exceed ``MAX_MESSAGE_BYTES`` or ``MAX_HEADER_BYTES``.
        """
        return _frame(self.to_dict(), (self.outputs,))

    @classmethod
    def from_bytes(cls, data: bytes) -> FallbackResponse:
        """Parse and check a framed response.

        Raises:
            ContractError: as ``FallbackRequest.from_bytes``, or an error response with outputs.
        """
        header, body = _unframe(data)
        _header_version(header, "response")
        h = _exact_keys(header, _HEADER_KEYS_RESP, _OPTIONAL_RESP, "response header")
        outputs, off = _read_tensors(_specs_from_list(h["outputs"], "outputs"), body, 0)
        if off != len(body):
            raise _fail(f"{len(body) - off} bytes after the last tensor")
        code, message = None, ""
        if "error" in h:
            err = _exact_keys(h["error"], {"code", "message"}, set(), "error")
            code = _text(err["code"], "error.code")
            message = _text(err["message"], "error.message", MAX_MESSAGE_TEXT, empty=True)
        return cls(
            model=_text(h["model"], "model"),
            model_version=_text(h["model_version"], "model_version", empty=True),
            outputs=outputs,
            error_code=code,
            error_message=message,
            compute_ms=_number(h.get("compute_ms", 0.0), "compute_ms"),
        )
