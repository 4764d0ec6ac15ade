"""Bounded readers and writers of the compact telemetry encoding's primitives (pure).

Owns the unsigned LEB128 varint, the zigzag mapping of signed integers, and the one-varint
"float code" the packed tier-A views use for edges and moments: a float64 that is an integer
of magnitude below 2^53 travels as ``zigzag(n) << 2 | 1`` (one byte for -15..15), the next
float64 above the previous value (a point-mass edge, ``nextafter``) as the code 0, a value
that float32 holds exactly as the code 2 and four bytes, and anything else (other values,
NaN with its payload, infinities, -0.0) as the code 3 and its eight IEEE bytes. Every code
decodes to the bit-identical float64.

``Reader`` never reads past its buffer, never accepts a varint of more than 10 bytes or above
2^64 - 1, and raises ``ContractError`` for every malformed input. ``Reader.uvarints`` reads a
run of varints at once (the packed views' counts: hundreds per view) with numpy, and gives
exactly what as many ``uvarint`` calls give: any run it cannot decode that way (a varint of 10
bytes, a value above the bound, too few bytes) is read again one varint at a time, so every
error is the scalar reader's. Does not own any format built
from these primitives (``edge_agent.wire.compact.views``, ``edge_agent.wire.compact.message``).
"""

from __future__ import annotations

import math
import struct
from typing import Final

import numpy as np

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
# Below this many varints a run is read one by one (numpy's per-call cost is higher).
_VECTOR_MIN: Final = 24
# Varints of up to 9 bytes hold below 2^63: exact in int64, no overflow check needed.
_VECTOR_BYTES: Final = 9


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

    @property
    def position(self) -> int:
        """Bytes read so far."""
        return self._pos

    def startswith(self, prefix: bytes) -> bool:
        """Whether the unread bytes begin with ``prefix`` (nothing is read)."""
        return self._data.startswith(prefix, self._pos)

    def peek(self, n: int) -> bytes:
        """Up to ``n`` unread bytes, without reading them."""
        return self._data[self._pos : self._pos + n]

    def consumed_since(self, start: int) -> bytes:
        """The bytes read from position ``start`` up to now."""
        return self._data[start : self._pos]

    def skip(self, n: int) -> None:
        """Move past ``n`` bytes. Raises ContractError (fewer remain)."""
        self.take(n)

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

    def uvarints(self, k: int, hi: int = _U64_MAX) -> list[int]:
        """``k`` unsigned varints, each at most ``hi``: what ``k`` calls of ``uvarint`` give.

        Raises:
            ContractError: as ``uvarint`` would for the first varint that fails.
        """
        if k >= _VECTOR_MIN:
            out = self._uvarints_vector(k, hi)
            if out is not None:
                return out
        return [self.uvarint(hi) for _ in range(k)]

    def _uvarints_vector(self, k: int, hi: int) -> list[int] | None:
        """``uvarints`` with numpy; None (nothing read) when any varint needs the scalar path."""
        pos = self._pos
        b = np.frombuffer(self._data, dtype=np.uint8, offset=pos)[: _VECTOR_BYTES * k]
        ends = np.flatnonzero(b < 0x80)[:k] + 1
        if len(ends) < k:
            return None  # truncated, or a varint longer than the vector path reads
        n = int(ends[-1])
        if n == k:  # every varint is one byte (most counts)
            values = b[:k].astype(np.int64)
        else:
            starts = np.empty(k, dtype=np.int64)
            starts[0] = 0
            starts[1:] = ends[:-1]
            lengths = ends - starts
            if int(lengths.max()) > _VECTOR_BYTES:
                return None
            shift = (np.arange(n) - np.repeat(starts, lengths)) * 7
            parts = (b[:n] & 0x7F).astype(np.int64) << shift
            values = np.add.reduceat(parts, starts)
        if hi < (1 << 63) - 1 and int(values.max()) > hi:
            return None  # the scalar reader raises at the right varint
        self._pos = pos + n
        out: list[int] = values.tolist()
        return out

    def _float_code(self, code: int, prev: float | None) -> float:
        """The value of a float code whose leading varint ``code`` was just read."""
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

    def floats(self, k: int) -> list[float]:
        """``k`` float codes without a previous value: what ``k`` calls of ``float()`` give.

        A run of integer codes only (the moments of a view over integer data) is decoded with
        numpy; otherwise the codes of 64-bit and 32-bit floats (one byte, then the IEEE bytes)
        are read inline and every other code as ``float`` reads it.

        Raises:
            ContractError: as ``float`` would for the first code that fails.
        """
        if k >= _VECTOR_MIN:
            start = self._pos
            codes = self._uvarints_vector(k, _U64_MAX)
            if codes is not None:
                z = np.array(codes, dtype=np.int64) >> 2
                n = np.where(z & 1, -((z + 1) >> 1), z >> 1)
                if all(c & 3 == _INTEGER for c in codes) and int(np.abs(n).max()) < _EXACT_INT:
                    ints: list[float] = n.astype(np.float64).tolist()
                    return ints
            self._pos = start  # not all small integers: code by code
        data, end = self._data, len(self._data)
        f64, f32 = _F64.unpack_from, _F32.unpack_from
        out: list[float] = []
        for _ in range(k):
            pos = self._pos
            code = data[pos] if pos < end else -1
            if code == _FLOAT64 and pos + 9 <= end:
                out.append(f64(data, pos + 1)[0])
                self._pos = pos + 9
            elif code == _FLOAT32 and pos + 5 <= end:
                out.append(f32(data, pos + 1)[0])
                self._pos = pos + 5
            else:
                out.append(self._float_code(self.uvarint(), None))
        return out

    def float(self, prev: float | None = None) -> float:
        """A float code (see the module docstring); ``prev`` as for ``put_float``.

        Raises:
            ContractError: a truncated or invalid code (next-up without a finite ``prev``).
        """
        return self._float_code(self.uvarint(), prev)
