"""Strict readers and writers shared by the drift wire formats (dicts and bytes).

Owns: typed field access for ``from_dict`` (every failure is a ``ContractError`` naming the
field), the JSON encoding of float arrays that may hold non-finite values, and the bounds every
sketch format shares. Does not own: any particular format (see ``edges``, ``view``, ``kll``,
``baseline``). Kept apart from ``edge_agent.contract._fields`` on purpose: the contract package
imports this one, so importing back would be a cycle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.errors import ContractError

#: Largest bin count a sketch may declare; keeps headers small and garbage from allocating.
MAX_BINS = 4096
#: Largest feature count a sketch may declare (well above ``flatten_features``' default 256).
MAX_FEATURES = 65536
_INT64_MAX = (1 << 63) - 1
# Non-finite float64 values travel as these strings, so ``json.dumps(allow_nan=False)`` works.
_NONFINITE = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def require_mapping(d: Any, what: str) -> Mapping[str, Any]:
    """``d`` as a mapping, or a ContractError saying ``what`` it should have been."""
    if not isinstance(d, Mapping):
        raise ContractError(f"{what} must be a JSON object, got {type(d).__name__}")
    return d


def check_keys(d: Mapping[str, Any], allowed: Sequence[str], what: str) -> None:
    """Reject fields this schema version does not define (they would be silently dropped)."""
    unknown = sorted(str(k) for k in d if k not in allowed)
    if unknown:
        raise ContractError(f"{what}: unknown field(s) {unknown}")


def get(d: Mapping[str, Any], key: str, what: str) -> Any:
    """``d[key]``, or a ContractError naming the missing field."""
    if key not in d:
        raise ContractError(f"{what}: missing field {key!r}")
    return d[key]


def read_int(d: Mapping[str, Any], key: str, what: str, lo: int, hi: int) -> int:
    """An integer field within ``[lo, hi]`` (a JSON ``true`` is not an integer)."""
    value = get(d, key, what)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ContractError(f"{what}: field {key!r} must be an integer")
    if not lo <= value <= hi:
        raise ContractError(f"{what}: field {key!r} must be in [{lo}, {hi}], got {value}")
    return value


def read_schema_version(d: Mapping[str, Any], what: str, supported: int) -> int:
    """The ``schema_version`` field, which must equal ``supported``."""
    version = read_int(d, "schema_version", what, 0, _INT64_MAX)
    if version != supported:
        raise ContractError(
            f"{what}: schema_version {version} is not supported (this agent reads {supported})"
        )
    return version


def count_vector(value: Any, field: str, length: int) -> npt.NDArray[np.int64]:
    """A list of ``length`` non-negative int64 counts."""
    if not isinstance(value, list) or len(value) != length:
        raise ContractError(f"field {field!r} must be a list of {length} counts")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _INT64_MAX:
            raise ContractError(f"field {field!r} must hold non-negative 64-bit integers")
    return np.asarray(value, dtype=np.int64).reshape(length)


def count_matrix(value: Any, field: str, rows: int, cols: int) -> npt.NDArray[np.int64]:
    """A ``rows`` x ``cols`` list of lists of non-negative int64 counts."""
    if not isinstance(value, list) or len(value) != rows:
        raise ContractError(f"field {field!r} must be a list of {rows} rows")
    out = np.empty((rows, cols), dtype=np.int64)
    for i, row in enumerate(value):
        out[i] = count_vector(row, f"{field}[{i}]", cols)
    return out


def float_vector(value: Any, field: str, length: int) -> npt.NDArray[np.float64]:
    """A list of ``length`` float64 values; non-finite ones arrive as strings (``floats_out``)."""
    if not isinstance(value, list) or len(value) != length:
        raise ContractError(f"field {field!r} must be a list of {length} numbers")
    out = np.empty(length, dtype=np.float64)
    for i, v in enumerate(value):
        if isinstance(v, str) and v in _NONFINITE:
            out[i] = _NONFINITE[v]
        elif isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ContractError(
                f"field {field!r} must hold numbers or 'Infinity', '-Infinity', 'NaN'"
            )
        else:
            out[i] = float(v)
    return out


def floats_out(values: npt.NDArray[np.float64]) -> list[float | str]:
    """JSON-safe list of float64 values: non-finite ones become ``"Infinity"`` etc."""
    out: list[float | str] = []
    for v in values.tolist():
        if math.isfinite(v):
            out.append(v)
        elif math.isnan(v):
            out.append("NaN")
        else:
            out.append("Infinity" if v > 0 else "-Infinity")
    return out


def frozen(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """A read-only copy of ``array``: value objects must not change under their holders."""
    out = np.array(array, copy=True)
    out.setflags(write=False)
    return out
