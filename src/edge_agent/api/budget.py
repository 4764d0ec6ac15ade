"""What decoding a request body may cost in memory, and the budget large requests share.

Owns ``decode_cost`` (a pure upper bound of the memory decoding a body takes, computed from the
body's bytes before any parsing), ``MemoryBudget`` (an asyncio weighted semaphore in bytes:
requests wait in arrival order for their share) and ``admit`` (reading a large body within the
budget). Does not own the endpoints (``edge_agent.api.endpoints``, which read small bodies
themselves) or the decoding (``edge_agent.api.decode``).

Why a bound from the bytes: ``json.loads`` of an 8 MiB body of empty arrays (``[[],[],...]``)
builds ~2.8 million list objects, about 27 bytes of memory per byte of body; a dense array of
short numbers costs ~9 bytes per byte; a binary FP32 tensor is a view of the body (no copy).
Counting ``[``, ``{``, ``,`` and ``"`` (a few passes at memory speed, small next to
``json.loads``) bounds the number of containers, values and strings ``json.loads`` can create,
whatever the nesting; each gets the most memory one of its kind takes through the whole decode (the
Python object, its slot in the parent, the numpy element, a cast, the BYTES copies). Characters
inside strings are counted too, which only makes the bound larger. ``tests/unit/test_api_budget``
checks the bound against ``tracemalloc``'s measured peak for hostile and ordinary bodies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.types import Receive

from edge_agent.api.decode import FAST_JSON_BYTES
from edge_agent.api.fastpath import read_body, read_prefix

__all__ = ["MAX_COST_RATIO", "Admitted", "MemoryBudget", "Reservation", "admit", "decode_cost"]

# A body whose bound exceeds this many bytes per byte is refused whatever the budget: ordinary
# requests stay under ~35 (a column of short numbers, ``[[0.5],[0.5],...]``, is the worst).
MAX_COST_RATIO = 48

# Upper bounds, in bytes, of what one token of each kind makes decoding hold at its peak.
_PER_LIST = 112  # list object + GC header + json's first item block (4 slots)
_PER_DICT = 240  # dict with up to 5 keys + GC header
_PER_VALUE = 48  # a float (24) + its parent slot with overallocation + numpy element + cast
_PER_STRING = 112  # str object header + tolist slot + encoded bytes header + object array slot
# A binary BYTES element: 4 length bytes on the wire become a bytes object (>= 40 bytes with
# allocator rounding) + a list slot + an object-array slot, i.e. <= 12 bytes per wire byte.
_BINARY_BYTES_FACTOR = 12
# orjson (JSON texts up to ``FAST_JSON_BYTES``, ``edge_agent.api.decode.parse_json``) first
# parses into a document it sizes from the text's length: ~11 bytes per byte, held while the
# Python objects are built.
_FAST_PARSE_FACTOR = 12
# What any decode allocates whatever the body (error objects, small caches): bodies this small
# are decoded without a reservation anyway.
_BASE = 64 * 1024


def decode_cost(body: bytes, header_end: int | None = None) -> int:
    """An upper bound of the memory (bytes) decoding ``body`` and answering it holds at once.

    Args:
        body: the whole request body.
        header_end: where the JSON header ends (binary tensor data extension), ``None`` when
            the whole body is JSON. Out-of-range values are bounded as the whole body.

    Returns:
        A fixed 64 KiB, the body and one working copy (``2 * len(body)``), plus what
        ``json.loads`` (and orjson's document, for a short JSON part) and the tensor conversion
        of the JSON part can allocate, plus the BYTES
        elements of the binary part when the header may declare any.
    """
    size = len(body)
    end = size if header_end is None or not 0 <= header_end <= size else header_end
    header = body if end == size else body[:end]
    cost = _BASE + 2 * size + _json_cost(header)
    if len(header) <= FAST_JSON_BYTES:
        cost += _FAST_PARSE_FACTOR * len(header)
    tail = size - end
    if tail and (b"BYTES" in header or b"\\" in header):  # a datatype may be escaped
        cost += _BINARY_BYTES_FACTOR * tail
    return cost


def _json_cost(text: bytes) -> int:
    lists = text.count(b"[")
    dicts = text.count(b"{")
    values = text.count(b",") + lists + dicts + 1
    strings = text.count(b'"') // 2
    # The decoded str of the body, and the strings' payloads as str and again as bytes: one
    # byte per byte for ASCII, up to four (UCS-4) otherwise.
    chars = len(text) if text.isascii() else 4 * len(text)
    return (
        3 * chars
        + _PER_LIST * lists
        + _PER_DICT * dicts
        + _PER_VALUE * values
        + _PER_STRING * strings
    )


class Reservation:
    """Bytes held from a ``MemoryBudget``; ``shrink`` gives back what is not needed."""

    def __init__(self, budget: MemoryBudget, amount: int) -> None:
        self._budget = budget
        self.amount = amount

    def shrink(self, amount: int) -> None:
        """Keep only ``amount`` bytes (no-op when that is not less than what is held)."""
        if 0 <= amount < self.amount:
            self._budget._release(self.amount - amount)
            self.amount = amount


class MemoryBudget:
    """An asyncio weighted semaphore counting bytes, first come first served.

    A request reserves once (``hold``), never while holding another reservation, so waiters
    cannot deadlock; a reservation is capped at the whole budget. Not thread-safe: use it from
    one event loop.
    """

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("a memory budget must be positive")
        self.total = total
        self.free = total
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        """Requests waiting for their share."""
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def hold(self, amount: int) -> AsyncIterator[Reservation]:
        """Reserve ``min(amount, total)`` bytes, waiting behind earlier reservations.

        Raises:
            asyncio.CancelledError: cancelled while waiting (nothing is held then).
        """
        amount = max(0, min(amount, self.total))
        if self._waiters or amount > self.free:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (amount, future)
            self._waiters.append(entry)
            try:
                await future
            except BaseException:
                if future.done() and not future.cancelled():
                    self.free += amount  # granted just as we were cancelled: give it back
                else:
                    self._waiters.remove(entry)
                self._wake()
                raise
        else:
            self.free -= amount
        reservation = Reservation(self, amount)
        try:
            yield reservation
        finally:
            self._release(reservation.amount)
            reservation.amount = 0

    def _release(self, amount: int) -> None:
        self.free += amount
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.free:
            amount, future = self._waiters.popleft()
            if not future.done():
                self.free -= amount
                future.set_result(None)


@dataclass(frozen=True, slots=True)
class Admitted:
    """A body read within the budget, or why not: ``refusal`` is ``payload_too_large`` (over
    ``max_bytes``), ``decode_memory`` (``cost`` over what may be held) or ``read_timeout``
    (not complete in time), ``None`` when read."""

    body: bytes
    refusal: str | None = None
    cost: int = 0


@contextlib.asynccontextmanager
async def admit(
    receive: Receive,
    budget: MemoryBudget,
    *,
    declared: int | None,
    header_length: str | None,
    max_bytes: int,
    small: int,
    read_seconds: float,
) -> AsyncIterator[Admitted]:
    """Read a body declared larger than ``small`` bytes (or of unknown length) within ``budget``.

    The most the body may cost (``declared`` or ``max_bytes``, times ``MAX_COST_RATIO``) is
    reserved before it is read, never while anything else is held (so waiters cannot deadlock);
    once read, only its ``decode_cost`` stays held, until the block ends. A body of unknown
    length is first read up to ``small`` bytes: a short one needs no reservation. A body still
    arriving ``read_seconds`` after its reservation is refused (``read_timeout``), so a slow
    client holds the budget for a bounded time (growing the share as bytes arrive instead
    would let partial holders wait for each other).

    Raises:
        ClientDisconnect: the client went away before the body was complete.
        asyncio.CancelledError: cancelled while waiting for the budget (nothing held).
    """
    prefix: list[bytes] | None = None
    body: bytes | None = None
    if declared is None:
        prefix, complete = await read_prefix(receive, min(small, max_bytes))
        if sum(map(len, prefix)) > max_bytes:
            yield Admitted(b"", "payload_too_large")
            return
        if complete:
            body = b"".join(prefix)
            if len(body) <= small:
                yield Admitted(body)
                return
    async with budget.hold((declared or max_bytes) * MAX_COST_RATIO) as held:
        if body is None:
            try:
                async with asyncio.timeout(read_seconds):
                    body = await read_body(receive, max_bytes, prefix)
            except TimeoutError:
                yield Admitted(b"", "read_timeout")
                return
        if body is None or len(body) > max_bytes:
            yield Admitted(b"", "payload_too_large")
            return
        end = header_length.strip() if header_length is not None else ""
        cost = decode_cost(body, int(end) if end.isascii() and end.isdigit() else None)
        if cost > held.amount:
            yield Admitted(b"", "decode_memory", cost)
            return
        held.shrink(cost)
        yield Admitted(body, None, cost)
