"""Input validation compiled from a bundle's input contract into vectorised numpy checks.

Owns: the structural checks (inputs present, dtype, rank, shape and dynamic-dimension bounds,
batch size, payload size), which raise ``InputValidationError`` naming the field, and the per-row
checks (NaN, Inf, per-feature range), which are counted by reason and then either reject the
request or drop the bad rows, as the model's policy says. Pure: arrays in, a result out.

Types: a numpy array must already have the contract's dtype (never cast, as the Open Inference
Protocol asks: an FP64 tensor sent to an FP32 input is an error, not a silent rounding); nested
lists and Python scalars, which carry no element type, are converted to it.

The hot path is a handful of whole-array numpy reductions; per-row detail is only computed when a
fast check fails.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.contract import InputContract, TensorSpec
from edge_agent.contract.datatypes import PROTOCOL_DATATYPES
from edge_agent.errors import InputValidationError

Array = npt.NDArray[Any]
ROW_REASONS = ("nan", "inf", "out_of_range")
_NUMERIC_KINDS = frozenset("fiub")
# Bound ufunc reductions: the cheapest whole-array min/max numpy offers (hot path).
_MIN = np.minimum.reduce
_MAX = np.maximum.reduce


_NO_REJECTS: Mapping[str, int] = MappingProxyType({})


class ValidationResult:
    """Validated (possibly row-filtered) raw feeds and what was wrong with the dropped rows.

    A slotted class rather than a frozen dataclass: one is built per request on the hot path.
    """

    __slots__ = ("feeds", "kept", "rejected", "rows_in", "rows_kept")

    def __init__(
        self,
        feeds: dict[str, Array],
        rows_in: int,
        rows_kept: int,
        rejected: Mapping[str, int] = _NO_REJECTS,
        kept: npt.NDArray[np.bool_] | None = None,
    ) -> None:
        self.feeds = feeds
        self.rows_in = rows_in
        self.rows_kept = rows_kept
        self.rejected = rejected
        self.kept = kept

    @property
    def dropped(self) -> int:
        return self.rows_in - self.rows_kept


@dataclass(frozen=True)
class _CompiledTensor:
    spec: TensorSpec
    dtype: np.dtype[Any]
    rank: int
    dims: tuple[tuple[int, int], ...]  # (min, max) per dimension
    lo: Array | None
    hi: Array | None
    check_nan: bool
    is_float: bool
    scalar_range: tuple[float, float] | None  # one range for every feature, as Python floats
    fixed_tail: tuple[int, ...] | None  # the sample shape when no sample dimension is dynamic
    # ``0 <= x <= hi`` in one reduction (see ``_bits_bound``): the unsigned view dtype and the
    # bit pattern of the largest value of the tensor's dtype that is <= hi; None when unusable.
    bits: tuple[np.dtype[Any], int] | None
    max_only: bool  # unsigned integers with lo <= 0: only the maximum can be out of range


class Validator:
    """Validates requests against one input contract; build once per loaded model."""

    def __init__(self, contract: InputContract, policy: str = "reject") -> None:
        if policy not in ("reject", "drop"):
            raise ValueError(f"policy must be 'reject' or 'drop', not {policy!r}")
        self.contract = contract
        self.policy = policy
        self._tensors = tuple(self._compile(t) for t in contract.tensors)
        self._names = frozenset(t.name for t in contract.tensors)

    @staticmethod
    def _compile(spec: TensorSpec) -> _CompiledTensor:
        dtype = np.dtype(spec.dtype)
        lo = hi = None
        if spec.ranges is not None:
            lo = np.asarray(spec.ranges.low, dtype=np.float64)
            hi = np.asarray(spec.ranges.high, dtype=np.float64)
            if lo.size == 1:
                lo, hi = lo.reshape(()), hi.reshape(())
        scalar_range = (
            (float(lo), float(hi)) if lo is not None and hi is not None and lo.ndim == 0 else None
        )
        if scalar_range is not None and dtype.kind == "f" and spec.nan_policy == "reject":
            # The whole-array check compares min/max with the range: with an infinite bound,
            # +-Inf would pass it although the NaN policy rejects it (the per-row check counts it).
            top = sys.float_info.max
            scalar_range = (max(scalar_range[0], -top), min(scalar_range[1], top))
        return _CompiledTensor(
            spec=spec,
            dtype=dtype,
            rank=len(spec.shape),
            dims=tuple((d.min, d.max) for d in spec.shape),
            lo=lo,
            hi=hi,
            check_nan=spec.nan_policy == "reject",
            is_float=dtype.kind == "f",
            scalar_range=scalar_range,
            fixed_tail=tuple(d.max for d in spec.shape[1:])
            if all(d.size is not None for d in spec.shape[1:])
            else None,
            bits=_bits_bound(dtype, scalar_range),
            max_only=scalar_range is not None and dtype.kind == "u" and scalar_range[0] <= 0,
        )

    def validate(
        self, feeds: Mapping[str, Any], payload_bytes: int | None = None
    ) -> ValidationResult:
        """Check ``feeds`` (input name -> array-like) against the contract.

        Args:
            feeds: raw inputs as applications send them.
            payload_bytes: size of the request body, when known (else the arrays' size).

        Returns:
            The feeds in the contract's dtypes (only untyped values are converted), with bad
            rows removed under the ``drop`` policy, and counts of bad rows by reason.

        Raises:
            InputValidationError: a structural problem (``reason`` says which, ``field`` names
                the input), or bad rows under the ``reject`` policy (``counts`` by reason), or
                every row bad under ``drop``.
        """
        if len(self._tensors) == 1 and len(feeds) == 1:
            fast = self._validate_one(feeds, payload_bytes)
            if fast is not None:
                return fast
        extra = set(feeds) - self._names
        if extra:
            name = sorted(extra)[0]
            raise InputValidationError(
                f"unknown input {name!r}", field=name, reason="unknown_input"
            )
        arrays: dict[str, Array] = {}
        total = 0
        batch: int | None = None
        for t in self._tensors:
            name = t.spec.name
            if name not in feeds:
                raise InputValidationError(
                    f"missing input {name!r}", field=name, reason="missing_input"
                )
            x = self._cast(t, feeds[name])
            self._check_shape(t, x)
            if batch is None:
                batch = x.shape[0]
            elif x.shape[0] != batch:
                raise InputValidationError(
                    f"input {name!r} has batch {x.shape[0]}, other inputs have {batch}",
                    field=name,
                    reason="batch_mismatch",
                )
            total += x.nbytes
            arrays[name] = x
        size = payload_bytes if payload_bytes is not None else total
        if size > self.contract.max_payload_bytes:
            raise InputValidationError(
                f"payload of {size} bytes exceeds {self.contract.max_payload_bytes}",
                reason="payload_too_large",
            )
        n = int(batch or 0)
        bad = self._row_problems(arrays, n)
        if bad is None:
            return ValidationResult(arrays, n, n)
        counts, bad_rows = bad
        if self.policy == "reject" or bool(bad_rows.all()):
            first = next(r for r in ROW_REASONS if counts.get(r))
            raise InputValidationError(
                f"{int(bad_rows.sum())} of {n} rows invalid: "
                + ", ".join(f"{r}={c}" for r, c in counts.items()),
                field=self._first_bad_field(arrays),
                reason=first,
                counts=counts,
            )
        keep = ~bad_rows
        return ValidationResult(
            {k: v[keep] for k, v in arrays.items()}, n, int(keep.sum()), counts, keep
        )

    def check_datatypes(self, feeds: Mapping[str, Any]) -> None:
        """Refuse a typed tensor (a numpy array) whose dtype is not its input's.

        The first thing ``validate`` refuses, for a route that does not validate (the cloud
        fallback): no route casts a tensor silently. Missing and unknown inputs and untyped
        values (lists, scalars) are left to ``validate``.

        Raises:
            InputValidationError: ``reason`` ``dtype``, ``field`` the input.
        """
        for t in self._tensors:
            x = feeds.get(t.spec.name)
            if isinstance(x, np.ndarray) and x.dtype != t.dtype:
                raise _mismatch(t, x.dtype)

    def _validate_one(
        self, feeds: Mapping[str, Any], payload_bytes: int | None
    ) -> ValidationResult | None:
        """The common case (one input, all rows fine) in as few steps as possible; None sends
        the request down the general path, which produces the precise error."""
        t = self._tensors[0]
        x = feeds.get(t.spec.name)
        if type(x) is not np.ndarray or x.dtype != t.dtype or t.fixed_tail is None:
            return None
        shape = x.shape
        if shape[1:] != t.fixed_tail or not 1 <= shape[0] <= t.dims[0][1]:
            return None
        size = payload_bytes if payload_bytes is not None else x.nbytes
        if size > self.contract.max_payload_bytes or not self._all_fine(t, x):
            return None
        return ValidationResult({t.spec.name: x}, shape[0], shape[0])

    def _cast(self, t: _CompiledTensor, value: Any) -> Array:
        name = t.spec.name
        try:
            x = value if isinstance(value, np.ndarray) else np.asarray(value)
        except (ValueError, TypeError) as exc:
            raise InputValidationError(
                f"input {name!r} is not a rectangular array: {exc}", field=name, reason="dtype"
            ) from exc
        if x.dtype.kind not in _NUMERIC_KINDS:
            raise InputValidationError(
                f"input {name!r} has dtype {x.dtype}, expected {t.dtype}",
                field=name,
                reason="dtype",
            )
        if x.dtype == t.dtype:
            return x
        if isinstance(value, np.ndarray):
            # A typed tensor (every tensor the v2 API decodes) is never cast: an FP64, FP16 or
            # INT64 tensor sent to an FP32 input is refused, as the protocol asks.
            raise _mismatch(t, x.dtype)
        if x.dtype.kind == "b" and t.dtype.kind != "b":
            raise InputValidationError(
                f"input {name!r} is boolean, expected {t.dtype}", field=name, reason="dtype"
            )
        if t.is_float or np.can_cast(x.dtype, t.dtype, casting="same_kind"):
            return x.astype(t.dtype)
        raise InputValidationError(
            f"input {name!r} has dtype {x.dtype}, expected {t.dtype}", field=name, reason="dtype"
        )

    @staticmethod
    def _check_shape(t: _CompiledTensor, x: Array) -> None:
        name = t.spec.name
        if x.ndim != t.rank:
            raise InputValidationError(
                f"input {name!r} has rank {x.ndim}, expected {t.rank}", field=name, reason="rank"
            )
        if x.shape[1:] == t.fixed_tail and 1 <= x.shape[0] <= t.dims[0][1]:
            return
        for axis, (size, (lo, hi)) in enumerate(zip(x.shape, t.dims, strict=True)):
            if lo <= size <= hi:
                continue
            if axis == 0:
                reason = "batch_too_large" if size > hi else "empty_batch"
                raise InputValidationError(
                    f"input {name!r} batch {size} outside 1..{hi}", field=name, reason=reason
                )
            raise InputValidationError(
                f"input {name!r} dimension {axis} is {size}, allowed {lo}..{hi}",
                field=name,
                reason="shape",
            )

    def _row_problems(
        self, arrays: Mapping[str, Array], n: int
    ) -> tuple[dict[str, int], npt.NDArray[np.bool_]] | None:
        """None when every row is fine (the fast path); else counts and a bad-row mask."""
        suspects = [t for t in self._tensors if not self._all_fine(t, arrays[t.spec.name])]
        if not suspects:
            return None
        counts = dict.fromkeys(ROW_REASONS, 0)
        bad = np.zeros(n, dtype=bool)
        for t in suspects:
            flat = arrays[t.spec.name].reshape(n, -1)
            finite = np.isfinite(flat) if t.is_float else None
            if finite is not None and t.check_nan:
                nan = np.isnan(flat).any(axis=1)
                inf = (~finite & ~np.isnan(flat)).any(axis=1)
                counts["nan"] += int(nan.sum())
                counts["inf"] += int(inf.sum())
                bad |= nan | inf
            if t.lo is not None:
                # Non-finite values are the NaN policy's business, not the range's.
                vals = flat if finite is None else np.where(finite, flat, t.lo)
                out = ((vals < t.lo) | (vals > t.hi)).any(axis=1)
                counts["out_of_range"] += int(out.sum())
                bad |= out
        if not bad.any():
            return None
        return {k: v for k, v in counts.items() if v}, bad

    @staticmethod
    def _all_fine(t: _CompiledTensor, x: Array) -> bool:
        """Whole-array fast check: finite (if NaN is rejected) and within range.

        With one range for every feature, ``min``/``max`` answer both questions in two
        reductions (NaN propagates through them and fails the comparison); with a range
        starting at 0 one reduction over the bit patterns does (``_bits_bound``). A False
        here only sends the request to the exact per-row check.
        """
        if t.scalar_range is not None:
            if not x.size:
                return True  # no values, none out of range (a reduction would raise)
            if t.bits is not None:
                view, limit = t.bits
                return int(_MAX(x.view(view), axis=None)) <= limit
            lo, hi = t.scalar_range
            if t.max_only:
                return float(_MAX(x, axis=None)) <= hi
            return lo <= float(_MIN(x, axis=None)) and float(_MAX(x, axis=None)) <= hi
        flat = x.reshape(len(x), -1)
        if t.is_float and t.check_nan and not bool(np.isfinite(flat).all()):
            return False
        if t.lo is None or t.hi is None:
            return True
        return not (bool(np.less(flat, t.lo).any()) or bool(np.greater(flat, t.hi).any()))

    def _first_bad_field(self, arrays: Mapping[str, Array]) -> str | None:
        return next(
            (t.spec.name for t in self._tensors if not self._all_fine(t, arrays[t.spec.name])), None
        )


def _mismatch(t: _CompiledTensor, got: np.dtype[Any]) -> InputValidationError:
    name = t.spec.name
    return InputValidationError(
        f"input {name!r} is {_wire(got)} but the model's input is {_wire(t.dtype)}",
        field=name,
        reason="dtype",
    )


def _wire(dtype: np.dtype[Any]) -> str:
    """The protocol's datatype name for messages (numpy's name when it has none)."""
    if dtype.kind in "OSU":
        return "BYTES"
    return PROTOCOL_DATATYPES.get(dtype.name, dtype.name)


_UNSIGNED_OF: dict[int, np.dtype[Any]] = {
    2: np.dtype(np.uint16),
    4: np.dtype(np.uint32),
    8: np.dtype(np.uint64),
}


def _bits_bound(
    dtype: np.dtype[Any], scalar_range: tuple[float, float] | None
) -> tuple[np.dtype[Any], int] | None:
    """For a float tensor whose one range is ``[0, hi]``: check it with one max reduction.

    IEEE floats with the sign bit clear order like their bit patterns read as unsigned integers,
    and NaN patterns lie above +Inf's. So with ``h`` the largest value of ``dtype`` not above
    ``hi``, "every value is in ``[+0, hi]`` and none is NaN" is exactly "the largest bit pattern
    is at most ``h``'s". Negative values (and -0.0) have the sign bit set and fail the test; the
    exact per-row check then decides (-0.0 is in range there).
    """
    if scalar_range is None or dtype.kind != "f" or dtype.itemsize not in _UNSIGNED_OF:
        return None
    lo, hi = scalar_range
    if lo != 0.0 or not hi >= 0.0:
        return None
    with np.errstate(over="ignore"):  # a hi beyond the dtype's range becomes +Inf
        h = np.array(hi, dtype=dtype)  # may round up above hi: then step down one value
    if float(h) > hi:
        h = np.nextafter(h, np.array(-np.inf, dtype=dtype))
    unsigned = _UNSIGNED_OF[dtype.itemsize]
    return unsigned, int(h.view(unsigned))
