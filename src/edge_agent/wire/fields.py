"""Shared readers and writers of the device's JSON wire formats (an internal module, public names).

Owns the strict field readers (``as_object``, ``require``, ``as_int``, ``as_number``,
``as_opt_number``, ``as_str``, ``as_label``, ``as_counts``, ``as_device_id``, ``check_header``),
the size-capped, strict JSON loader (``load_json``, over ``edge_agent.strict_json``: no NaN or
inf, no duplicate keys, bounded integers and depth), the canonical writer (``dump_json``), the
tolerant readers a report builder uses on the agent's own status (``tolerant_counts``,
``count_or_zero``, ``finite_or_none``), the ``Wire`` base (``to_bytes`` on top of ``to_dict``),
the ``Part`` protocol with ``encode_parts``, ``decode_parts`` and ``parts_of`` (a value object
whose wire dict is the union of its parts' dicts) and the limits they enforce, including
``SCHEMA_VERSION`` and ``MAX_PAYLOAD_BYTES``. Every problem a strict reader finds raises
``ContractError``.

Does not own any payload (``edge_agent.wire.telemetry``, ``edge_agent.wire.telemetry_report``,
``edge_agent.wire.reported``) and does no I/O.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Final, Protocol, Self

from edge_agent import strict_json
from edge_agent.errors import ContractError, IdentityError
from edge_agent.ids import validate_device_id

__all__ = [
    "LABEL",
    "MAX_INT",
    "MAX_PAYLOAD_BYTES",
    "SCHEMA_VERSION",
    "Part",
    "Wire",
    "as_counts",
    "as_device_id",
    "as_int",
    "as_label",
    "as_number",
    "as_object",
    "as_opt_number",
    "as_str",
    "check_header",
    "count_or_zero",
    "decode_parts",
    "dump_json",
    "encode_parts",
    "finite_or_none",
    "load_json",
    "part_fields",
    "parts_of",
    "require",
    "storable_text",
    "tolerant_counts",
]

SCHEMA_VERSION: Final = 1
#: Refused before ``json.loads`` is even tried.
MAX_PAYLOAD_BYTES: Final = 256 * 1024
#: Largest integer on the wire: exact in every JSON reader.
MAX_INT: Final = 2**53 - 1
#: A label (model name, counter key, tensor name, ...).
LABEL: Final = re.compile(r"^[A-Za-z0-9_.:/-]{1,128}$")
_MAX_MAP: Final = 64
_MAX_TEXT: Final = 1024
# NUL (PostgreSQL TEXT and JSONB refuse it) and UTF-16 surrogates (not Unicode scalar values:
# they cannot be encoded as UTF-8, and JSONB refuses a lone one): refused in every string.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


# ----------------------------------------------------------------------- strict readers
def as_object(d: Any, what: str) -> Mapping[str, Any]:
    """``d`` itself. Raises ContractError (not a JSON object)."""
    if not isinstance(d, Mapping):
        raise ContractError(f"{what} must be a JSON object")
    return d


def require(d: Mapping[str, Any], key: str, what: str) -> Any:
    """``d[key]``. Raises ContractError (the key is missing)."""
    if key not in d:
        raise ContractError(f"{what}: missing field {key!r}")
    return d[key]


def as_int(v: Any, what: str, lo: int = 0) -> int:
    """``v``. Raises ContractError (not an integer in ``[lo, MAX_INT]``; a bool is not one)."""
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= MAX_INT:
        raise ContractError(f"{what} must be an integer in [{lo}, 2**53-1]")
    return v


def as_number(v: Any, what: str, *, lo: float = 0.0) -> float:
    """``v`` as a float. Raises ContractError (not a finite number >= ``lo``)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ContractError(f"{what} must be a number")
    try:
        out = float(v)
    except OverflowError as exc:  # an integer beyond any float
        raise ContractError(f"{what} must be finite and >= {lo}") from exc
    if not math.isfinite(out) or out < lo:
        raise ContractError(f"{what} must be finite and >= {lo}")
    return out


def as_opt_number(v: Any, what: str) -> float | None:
    """None, or any finite number. Raises ContractError (anything else)."""
    return None if v is None else as_number(v, what, lo=-math.inf)


def as_str(v: Any, what: str, limit: int = _MAX_TEXT) -> str:
    """``v``. Raises ContractError (not a string of at most ``limit``, or NUL/surrogates)."""
    if not isinstance(v, str) or len(v) > limit:
        raise ContractError(f"{what} must be a string of at most {limit} characters")
    if _UNSTORABLE.search(v):
        raise ContractError(f"{what} holds NUL or a lone surrogate (no database can store it)")
    return v


def storable_text(text: str, limit: int = _MAX_TEXT) -> str:
    """``text`` cut to ``limit`` with NUL and surrogates replaced by U+FFFD (for a writer that
    builds free text, e.g. from an exception, which ``as_str`` would otherwise refuse)."""
    return _UNSTORABLE.sub("\ufffd", text[:limit])


def as_label(v: Any, what: str) -> str:
    """``v``. Raises ContractError (not a ``LABEL``)."""
    if not isinstance(v, str) or not LABEL.fullmatch(v):
        raise ContractError(f"{what} must be a label of 1-128 [A-Za-z0-9_.:/-]")
    return v


def as_counts(v: Any, what: str) -> dict[str, int]:
    """A label -> count map. Raises ContractError (not one, or over 64 entries)."""
    v = as_object(v, what)
    if len(v) > _MAX_MAP:
        raise ContractError(f"{what} has more than {_MAX_MAP} entries")
    return {as_label(k, f"{what} key"): as_int(n, f"{what}[{k!r}]") for k, n in v.items()}


def as_device_id(v: Any) -> str:
    """``v``. Raises ContractError (not a valid device id)."""
    try:
        return validate_device_id(v)
    except IdentityError as exc:
        raise ContractError(f"device_id: {exc}") from exc


def check_header(d: Any, kind: str) -> Mapping[str, Any]:
    """``d``, checked to be an object of ``type`` ``kind`` and this ``SCHEMA_VERSION``.

    Raises:
        ContractError: not an object, another schema version or another type.
    """
    m = as_object(d, kind)
    version = require(m, "schema_version", kind)
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        raise ContractError(f"{kind}: schema_version {version!r} is not supported")
    if require(m, "type", kind) != kind:
        raise ContractError(f"{kind}: type must be {kind!r}")
    return m


def load_json(data: bytes, max_bytes: int) -> Any:
    """Strict JSON (``edge_agent.strict_json``) with integers of at most 20 digits.

    Raises:
        ContractError: not bytes, over ``max_bytes``, not UTF-8 JSON, or past a limit.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ContractError("payload must be bytes")
    return strict_json.loads(data, max_bytes=max_bytes, what="payload")


def dump_json(d: Mapping[str, Any]) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, ASCII.

    Raises:
        ContractError: a non-finite float.
    """
    try:
        text = json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:
        raise ContractError(f"payload has a non-finite number: {exc}") from exc
    return text.encode("ascii")


# -------------------------------------------------------- tolerant readers (own status)
def tolerant_counts(d: Any) -> dict[str, int]:
    """The label -> non-negative int entries of ``d`` (anything else dropped; never raises)."""
    if not isinstance(d, Mapping):
        return {}
    return {
        str(k): int(v)
        for k, v in d.items()
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0 and LABEL.fullmatch(str(k))
    }


def count_or_zero(v: Any) -> int:
    """``v`` if it is a wire count (an int in ``[0, MAX_INT]``), else 0 (never raises)."""
    ok = isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_INT
    return int(v) if ok else 0


def finite_or_none(v: Any) -> float | None:
    """``v`` as a float if it is a finite number, else None (never raises)."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


# ------------------------------------------------------------------------ value objects
class Wire:
    """``to_bytes`` on top of each class's ``to_dict``."""

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """Canonical JSON: sorted keys, no whitespace, ASCII, no NaN.

        Raises:
            ContractError: a non-finite float slipped into a field.
        """
        return dump_json(self.to_dict())


class Part(Protocol):
    """A frozen dataclass that owns some keys (``KEYS``) of its parent's wire object.

    Its dataclass fields have the names of the parent's attributes it stands for, so the parent
    (``ModelStats``, ``TelemetryReport``) is encoded and decoded as the union of its parts:
    ``to_dict`` writes the part's keys, ``from_dict`` reads them from the parent's dict and
    checks them strictly (raising ``ContractError``).
    """

    __dataclass_fields__: ClassVar[dict[str, Any]]
    KEYS: ClassVar[tuple[str, ...]]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        """Read this part's keys of the parent object ``d``. Raises ContractError."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """This part's keys of the parent object."""
        ...


def part_fields(parts: Iterable[Part]) -> dict[str, Any]:
    """The parent's constructor arguments: every field of every part, by name."""
    out: dict[str, Any] = {}
    for part in parts:
        out.update({f.name: getattr(part, f.name) for f in dataclasses.fields(part)})
    return out


def parts_of(parent: object, parts: Sequence[type[Part]]) -> list[Part]:
    """The ``parts`` of ``parent``, each built from the parent's attributes of its field names."""
    return [
        part(**{f.name: getattr(parent, f.name) for f in dataclasses.fields(part)})
        for part in parts
    ]


def encode_parts(parent: object, parts: Sequence[type[Part]]) -> dict[str, Any]:
    """The wire keys of ``parent`` its ``parts`` own (each part's ``to_dict``, merged)."""
    out: dict[str, Any] = {}
    for part in parts_of(parent, parts):
        out.update(part.to_dict())
    return out


def decode_parts(d: Mapping[str, Any], parts: Sequence[type[Part]]) -> dict[str, Any]:
    """The parent's constructor arguments read from its wire object ``d`` by ``parts``, in
    order. Raises ContractError (from the first part that refuses ``d``)."""
    return part_fields(part.from_dict(d) for part in parts)
