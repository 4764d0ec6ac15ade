"""Affine (de)quantization of a quantized model's inputs and outputs, precomputed per tensor.

Owns: turning float feeds into a tensor's integer type (``round_half_away(x / scale) + zero
point``, clipped, as TFLite's own QUANTIZE kernel does) and integer outputs back into float32
(``(q - zero_point) * scale``), computed once per tensor so the per-request cost is one or two
numpy calls. Pure numpy: no interpreter (``litert`` owns that).

Why precompute: at batch 1 the element-wise formula is about ten numpy calls (cast, divide, abs,
add, floor, copysign, add, clip, cast; then cast, subtract, multiply for the output), and their
fixed cost (about 1 us each) ate the whole speed-up of int8 kernels on small models. Both
directions are monotone maps with few distinct results, so:

* **Quantize** with the sorted float32 thresholds at which the integer result steps up:
  ``searchsorted`` + ``take`` (two calls) for small feeds. Each threshold is the smallest float32
  the formula maps to that integer or higher, found from the formula itself, so the result is
  the formula's, bit for bit, for every float32 (NaN, which the input contract refuses before
  the runtime, is the exception: it maps to the top value). Above ``SEARCH_MAX_VALUES`` values a
  binary search per value costs more than the formula, so large feeds run the formula in place,
  with the same float32 operations and therefore the same result.
* **Dequantize** 8-bit outputs through a 256-entry table computed with the formula (one ``take``),
  wider types with the formula.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]

# Feeds up to this many values use the threshold search (2 numpy calls, ~30 ns per value);
# larger ones the in-place formula (7 calls, a few ns per value). Both give the same integers.
SEARCH_MAX_VALUES = 256
_F32 = np.dtype(np.float32)
_U8 = np.dtype(np.uint8)
_HALF = np.float32(0.5)


def quantize_formula(
    x: Array, scale: float, zero_point: int, dtype: np.dtype[Any]
) -> npt.NDArray[Any]:
    """The reference: float32 ``x / scale``, rounded half away from zero, plus the zero point,
    clipped to ``dtype``'s range. Every float32 operation here is the one TFLite's reference
    quantizer (and this adapter before the precomputed path) performs."""
    info = np.iinfo(dtype)
    y = np.asarray(x, dtype=np.float32) / np.float32(scale)
    q = np.copysign(np.floor(np.abs(y) + _HALF), y)
    q += np.float32(zero_point)
    out: npt.NDArray[Any] = np.clip(q, info.min, info.max).astype(dtype)
    return out


class Quantizer:
    """Float feeds to one quantized tensor's integer type; build once per tensor.

    Raises nothing at call time for float input: any float array converts.
    """

    __slots__ = ("_bounds", "_codes", "_dtype", "_hi", "_lo", "_scale", "_zero")

    def __init__(self, scale: float, zero_point: int, dtype: np.dtype[Any]) -> None:
        info = np.iinfo(dtype)
        self._dtype = np.dtype(dtype)
        self._scale = np.float32(scale)
        self._zero = np.float32(zero_point)
        # Clipping y = x / scale to these (integer-valued) bounds before rounding gives the same
        # integers as clipping the rounded result, and keeps the integer cast in range.
        self._lo = np.float32(info.min - zero_point)
        self._hi = np.float32(info.max - zero_point)
        self._codes = np.arange(info.min, info.max + 1, dtype=np.int64).astype(self._dtype)
        self._bounds = _thresholds(scale, zero_point, self._dtype, self._codes[1:])

    def __call__(self, x: Array) -> npt.NDArray[Any]:
        """``quantize_formula(x, ...)``, bit for bit, for float ``x`` of any shape."""
        if x.dtype != _F32:
            x = x.astype(np.float32)  # as the formula does: round to float32 first
        if x.size <= SEARCH_MAX_VALUES:
            # ndarray methods, not the np.* wrappers: a third less per call at batch 1.
            out: npt.NDArray[Any] = self._codes.take(self._bounds.searchsorted(x, "right"))
            return out
        y = np.divide(x, self._scale)
        np.clip(y, self._lo, self._hi, out=y)
        # copysign(floor(|y| + 0.5), y) == trunc(y + copysign(0.5, y)) exactly (IEEE negation
        # is exact), and the cast to an integer type truncates toward zero.
        y += np.copysign(_HALF, y)
        np.trunc(y, out=y)
        y += self._zero  # after truncating: the zero point is an exact integer shift
        return y.astype(self._dtype)


def _thresholds(
    scale: float, zero_point: int, dtype: np.dtype[Any], steps: npt.NDArray[Any]
) -> npt.NDArray[np.float32]:
    """For each integer ``k`` in ``steps``, the smallest float32 the formula maps to ``>= k``.

    Starts from the exact real boundary ``(k - zero_point - 0.5) * scale`` rounded to float32
    and moves by one float32 step until the formula agrees: the formula is monotone, so the
    result is exact; a handful of rounds suffice.
    """
    want = steps.astype(np.int64)
    bounds = ((want - zero_point - 0.5) * float(scale)).astype(np.float32)
    up, down = np.float32(np.inf), np.float32(-np.inf)
    for _ in range(64):
        low = quantize_formula(bounds, scale, zero_point, dtype).astype(np.int64) < want
        bounds[low] = np.nextafter(bounds[low], up)
        prev = np.nextafter(bounds, down)
        high = quantize_formula(prev, scale, zero_point, dtype).astype(np.int64) >= want
        bounds[high] = prev[high]
        if not low.any() and not high.any():
            break
    return bounds


class Dequantizer:
    """One quantized output tensor back to float32: ``(q - zero_point) * scale``."""

    __slots__ = ("_scale", "_table", "_zero")

    def __init__(self, scale: float, zero_point: int, dtype: np.dtype[Any]) -> None:
        self._scale = np.float32(scale)
        self._zero = np.float32(zero_point)
        self._table: npt.NDArray[np.float32] | None = None
        dt = np.dtype(dtype)
        if dt.itemsize == 1:
            # Index by the byte's unsigned value: int8 -1 is entry 255.
            raw = np.arange(256, dtype=np.uint8).view(dt)
            self._table = (raw.astype(np.float32) - self._zero) * self._scale

    def __call__(self, q: Array) -> npt.NDArray[np.float32]:
        """Float32 values, a new array (callers may keep it)."""
        if self._table is not None:
            out: npt.NDArray[np.float32] = self._table.take(
                q if q.dtype == _U8 else q.view(np.uint8)
            )
            return out
        y = q.astype(np.float32)
        y -= self._zero
        y *= self._scale
        return y
