"""Shared readers and writers of the device's JSON wire formats (private to ``edge_agent``).

Owns the strict field readers (``_obj``, ``_get``, ``_int``, ``_num``, ``_str``, ``_label``,
``_counts``, ``_device``, ``_header``), the size-capped, strict JSON loader (``_load``, over
``edge_agent.strict_json``: no NaN or inf, no duplicate keys, bounded integers and depth),
the canonical writer (``_dump``), the ``_Wire`` base (``to_bytes`` on top of ``to_dict``) and
the limits they enforce, including ``SCHEMA_VERSION``
and ``MAX_PAYLOAD_BYTES``. Every problem raises ``ContractError``.
Does not own any payload (``edge_agent.wire.telemetry``, ``edge_agent.wire.telemetry_report``,
``edge_agent.wire.reported``) and does no I/O.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, Final

from edge_agent import strict_json
from edge_agent.errors import ContractError, IdentityError
from edge_agent.ids import validate_device_id

SCHEMA_VERSION: Final = 1
#: Refused before ``json.loads`` is even tried.
MAX_PAYLOAD_BYTES: Final = 256 * 1024
_MAX_INT: Final = 2**53 - 1  # exact in every JSON reader
_MAX_MAP: Final = 64
_MAX_TEXT: Final = 1024
_LABEL = re.compile(r"^[A-Za-z0-9_.:/-]{1,128}$")
# NUL (PostgreSQL TEXT and JSONB refuse it) and UTF-16 surrogates (not Unicode scalar values:
# they cannot be encoded as UTF-8, and JSONB refuses a lone one): refused in every string.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _obj(d: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise ContractError(f"{what} must be a JSON object")
    return d


def _get(d: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in d:
        raise ContractError(f"{what}: missing field {key!r}")
    return d[key]


def _int(v: Any, what: str, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= _MAX_INT:
        raise ContractError(f"{what} must be an integer in [{lo}, 2**53-1]")
    return v


def _num(v: Any, what: str, *, lo: float = 0.0) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ContractError(f"{what} must be a number")
    try:
        out = float(v)
    except OverflowError as exc:  # an integer beyond any float
        raise ContractError(f"{what} must be finite and >= {lo}") from exc
    if not math.isfinite(out) or out < lo:
        raise ContractError(f"{what} must be finite and >= {lo}")
    return out


def _opt_num(v: Any, what: str) -> float | None:
    return None if v is None else _num(v, what, lo=-math.inf)


def _str(v: Any, what: str, limit: int = _MAX_TEXT) -> str:
    if not isinstance(v, str) or len(v) > limit:
        raise ContractError(f"{what} must be a string of at most {limit} characters")
    if _UNSTORABLE.search(v):
        raise ContractError(f"{what} holds NUL or a lone surrogate (no database can store it)")
    return v


def _storable_text(text: str, limit: int = _MAX_TEXT) -> str:
    """``text`` cut to ``limit`` with NUL and surrogates replaced by U+FFFD (for a writer that
    builds free text, e.g. from an exception, which ``_str`` would otherwise refuse)."""
    return _UNSTORABLE.sub("\ufffd", text[:limit])


def _label(v: Any, what: str) -> str:
    if not isinstance(v, str) or not _LABEL.fullmatch(v):
        raise ContractError(f"{what} must be a label of 1-128 [A-Za-z0-9_.:/-]")
    return v


def _counts(v: Any, what: str) -> dict[str, int]:
    v = _obj(v, what)
    if len(v) > _MAX_MAP:
        raise ContractError(f"{what} has more than {_MAX_MAP} entries")
    return {_label(k, f"{what} key"): _int(n, f"{what}[{k!r}]") for k, n in v.items()}


def _device(v: Any) -> str:
    try:
        return validate_device_id(v)
    except IdentityError as exc:
        raise ContractError(f"device_id: {exc}") from exc


def _header(d: Any, kind: str) -> Mapping[str, Any]:
    m = _obj(d, kind)
    version = _get(m, "schema_version", kind)
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        raise ContractError(f"{kind}: schema_version {version!r} is not supported")
    if _get(m, "type", kind) != kind:
        raise ContractError(f"{kind}: type must be {kind!r}")
    return m


def _load(data: bytes, max_bytes: int) -> Any:
    """Strict JSON (``edge_agent.strict_json``) with integers of at most 20 digits.

    Raises:
        ContractError: not bytes, over ``max_bytes``, not UTF-8 JSON, or past a limit.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ContractError("payload must be bytes")
    return strict_json.loads(data, max_bytes=max_bytes, what="payload")


def _dump(d: Mapping[str, Any]) -> bytes:
    try:
        text = json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:
        raise ContractError(f"payload has a non-finite number: {exc}") from exc
    return text.encode("ascii")


class _Wire:
    """``to_bytes``/``from_bytes`` on top of each class's ``to_dict``/``from_dict``."""

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """Canonical JSON: sorted keys, no whitespace, ASCII, no NaN.

        Raises:
            ContractError: a non-finite float slipped into a field.
        """
        return _dump(self.to_dict())
