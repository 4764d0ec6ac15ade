"""Strict field readers for ``from_dict``: a wrong type is a ContractError naming the field."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypeVar

from edge_agent.errors import ContractError

T = TypeVar("T")


def req(d: Mapping[str, Any], key: str, typ: type[T] | tuple[type, ...]) -> T:
    """``d[key]``, which must exist and be an instance of ``typ``."""
    if not isinstance(d, Mapping):
        raise ContractError(f"expected an object holding {key!r}, got {type(d).__name__}")
    if key not in d:
        raise ContractError(f"missing field {key!r}")
    value = d[key]
    # bool is an int subclass; a JSON true is never a valid count or version.
    if isinstance(value, bool) and typ in (int, float):
        raise ContractError(f"field {key!r} must be {_name(typ)}, got bool")
    if not isinstance(value, typ):
        raise ContractError(f"field {key!r} must be {_name(typ)}, got {type(value).__name__}")
    return value  # type: ignore[return-value]


def opt(d: Mapping[str, Any], key: str, typ: type[T] | tuple[type, ...], default: T) -> T:
    """``d[key]`` when present (checked as ``req`` does), else ``default``.

    An explicit JSON ``null`` is not absent: it is refused like any other wrong type.
    """
    if isinstance(d, Mapping) and key not in d:
        return default
    return req(d, key, typ)


def req_str(d: Mapping[str, Any], key: str) -> str:
    return req(d, key, str)


def req_int(d: Mapping[str, Any], key: str) -> int:
    return req(d, key, int)


def req_float(d: Mapping[str, Any], key: str) -> float:
    value: float = req(d, key, (int, float))
    if isinstance(value, bool) or not math.isfinite(float(value)):
        raise ContractError(f"field {key!r} must be a finite number")
    return float(value)


def req_list(d: Mapping[str, Any], key: str) -> list[Any]:
    return req(d, key, list)


def req_float_list(d: Mapping[str, Any], key: str) -> list[float]:
    values = req_list(d, key)
    out: list[float] = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ContractError(f"field {key!r} must hold numbers")
        out.append(float(v))
    return out


def opt_float_list(d: Mapping[str, Any], key: str) -> list[float] | None:
    return req_float_list(d, key) if d.get(key) is not None else None


def _name(typ: type | tuple[type, ...]) -> str:
    if isinstance(typ, tuple):
        return " or ".join(t.__name__ for t in typ)
    return typ.__name__
