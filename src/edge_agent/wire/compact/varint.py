"""Bounded readers and writers of the compact telemetry encoding's primitives (pure).

Owns the unsigned LEB128 varint, the zigzag mapping of signed integers, and the one-varint
"float code" the packed tier-A views use for edges and moments: a float64 that is an integer
of magnitude below 2^53 travels as ``zigzag(n) << 2 | 1`` (one byte for -15..15), the next
float64 above the previous value (a point-mass edge, ``nextafter``) as the code 0, a value
that float32 holds exactly as the code 2 and four bytes, and anything else (other values,
NaN with its payload, infinities, -0.0) as the code 3 and its eight IEEE bytes. Every code
decodes to the bit-identical float64.

``Reader`` never reads past its buffer, never accepts a varint of more than 10 bytes or above
2^64 - 1, and raises ``ContractError`` for every malformed input. Does not own any format built
from these primitives (``edge_agent.wire.compact.views``, ``edge_agent.wire.compact.message``).
"""

from __future__ import annotations

import math
import struct
from typing import Final

from edge_agent.errors import ContractError

__all__ = ["Reader", "put_float", "put_uvarint"]

_MAX_VARINT_BYTES: Final = 10
_U64_MAX: Final = (1 << 64) - 1
_EXACT_INT: Final = 1 << 53
_F32: Final = struct.Struct("<f")
_F64: Final = struct.Struct("<d")
_U64: Final = struct.Struct("<Q")
_F32_MAX: Final = 3.4028234663852886e38
# Float codes (the low two bits of the leading varint).
_NEXT_UP: Final = 0
_INTEGER: Final = 1
_FLOAT32: Final = 2
_FLOAT64: Final = 3


def put_uvarint(out: bytearray, value: int) -> None:
    """Append ``value`` (0 <= value < 2^64) as an unsigned LEB128 varint.

    Raises:
        ContractError: ``value`` is negative or does not fit 64 bits.
    """
    if not 0 <= value <= _U64_MAX:
        raise ContractError(f"varint out of range: {value}")
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _zigzag(n: int) -> int:
    return (n << 1) if n >= 0 else ((-n) << 1) - 1


def _unzigzag(z: int) -> int:
    return (z >> 1) if not z & 1 else -((z + 1) >> 1)


def _bits(x: float) -> int:
    value: int = _U64.unpack(_F64.pack(x))[0]
    return value


def _next_up(prev: float) -> float:
    return math.nextafter(prev, math.inf)


def put_float(out: bytearray, x: float, prev: float | None = None) -> None:
    """Append the float code of ``x`` (see the module docstring); ``prev`` is the value before
    it in a strictly increasing sequence (edges), or None where the next-up code does not apply.
    """
    if prev is not None and math.isfinite(prev) and _bits(x) == _bits(_next_up(prev)):
        put_uvarint(out, _NEXT_UP)
    elif math.isfinite(x) and x == int(x) and abs(x) < _EXACT_INT and _bits(x) != _bits(-0.0):
        put_uvarint(out, (_zigzag(int(x)) << 2) | _INTEGER)
    elif _float32_exact(x):
        put_uvarint(out, _FLOAT32)
        out += _F32.pack(x)
    else:
        put_uvarint(out, _FLOAT64)
        out += _U64.pack(_bits(x))


def _float32_exact(x: float) -> bool:
    """Whether float32 holds ``x`` exactly (finite values only: NaN payloads need 64 bits)."""
    if not math.isfinite(x) or abs(x) > _F32_MAX:
        return False
    return _bits(x) == _bits(_F32.unpack(_F32.pack(x))[0])


class Reader:
    """Reads primitives from ``data`` front to back; every failure is a ``ContractError``.

    Args:
        data: the bytes to read.
        what: names the format in error messages.
    """

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    @property
    def remaining(self) -> int:
        """Bytes not yet read."""
        return len(self._data) - self._pos

    def fail(self, why: str) -> ContractError:
        """A ``ContractError`` naming the format and the position."""
        return ContractError(f"{self._what}: {why} (at byte {self._pos})")

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes. Raises ContractError (fewer remain)."""
        if n < 0 or n > self.remaining:
            raise self.fail(f"truncated: {n} bytes wanted, {self.remaining} left")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def uvarint(self, hi: int = _U64_MAX) -> int:
        """An unsigned varint of at most 10 bytes, at most ``hi``.

        Raises:
            ContractError: truncated, longer than 10 bytes, or above ``hi``.
        """
        data, pos = self._data, self._pos
        end = len(data)
        # One byte is most of what a packed view holds (counts, small float codes): no loop.
        if pos < end and data[pos] < 0x80:
            self._pos = pos + 1
            value = data[pos]
            if value > hi:
                raise self.fail(f"value {value} above {hi}")
            return value
        value = shift = 0
        for _ in range(_MAX_VARINT_BYTES):
            if pos >= end:
                self._pos = pos
                raise self.fail("truncated varint")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                self._pos = pos
                if value > hi:
                    raise self.fail(f"value {value} above {hi}")
                return value
            shift += 7
        self._pos = pos
        raise self.fail("varint longer than 10 bytes")

    def float(self, prev: float | None = None) -> float:
        """A float code (see the module docstring); ``prev`` as for ``put_float``.

        Raises:
            ContractError: a truncated or invalid code (next-up without a finite ``prev``).
        """
        code = self.uvarint()
        tag = code & 3
        if tag == _INTEGER:
            n = _unzigzag(code >> 2)
            if abs(n) >= _EXACT_INT:
                raise self.fail("integer float code out of range")
            return float(n)
        if code == _NEXT_UP:
            if prev is None or not math.isfinite(prev):
                raise self.fail("next-up float code without a finite previous value")
            return _next_up(prev)
        if code in (_FLOAT32, _FLOAT64):
            fmt = _F32 if code == _FLOAT32 else _F64
            value: float = fmt.unpack(self.take(fmt.size))[0]
            return value
        raise self.fail(f"unknown float code {code}")
