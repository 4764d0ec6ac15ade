"""The device-side bookkeeping of a block transfer: which blocks of a plan arrived (pure).

Owns: ``Progress``, a bitmap of received blocks (bit ``i`` of byte ``i // 8``, LSB first) that
checks each block's index and exact length before it is written, counts what arrived, and asks
for the first missing ranges. Its ``to_bytes`` is what ``edge_agent.sync.transfer_store`` persists.
Values in, values out or a typed error: no sockets, files or clocks.

Does not own the plan or the wire messages (``edge_agent.wire.transfer``), the partial file on
disk (``edge_agent.sync.transfer_store``) or MQTT.
"""

from __future__ import annotations

from edge_agent.errors import ContractError, LengthMismatchError
from edge_agent.wire.transfer import MAX_RANGES, BlockPlan, BlockRequest, checked_int

__all__ = ["Progress"]


class Progress:
    """Which blocks of a plan have arrived: a bitmap, bit ``i`` of byte ``i // 8`` (LSB first).

    Mutable tracker owned by one download; ``to_bytes`` is what gets persisted.

    Raises:
        ContractError: ``bitmap`` has the wrong size or sets bits beyond the last block.
    """

    def __init__(self, plan: BlockPlan, bitmap: bytes | None = None) -> None:
        self.plan = plan
        size = (plan.n_blocks + 7) // 8
        if bitmap is None:
            self._bits = bytearray(size)
        else:
            if len(bitmap) != size:
                raise ContractError(f"bitmap of {len(bitmap)} bytes, expected {size}")
            self._bits = bytearray(bitmap)
            spare = size * 8 - plan.n_blocks
            if spare and self._bits[-1] >> (8 - spare):
                raise ContractError("bitmap marks blocks beyond the last block")
        self._received = sum(b.bit_count() for b in self._bits)

    @property
    def received(self) -> int:
        """Number of distinct blocks received."""
        return self._received

    @property
    def received_bytes(self) -> int:
        """Bytes received so far (for progress display)."""
        if self.has(self.plan.n_blocks - 1):
            short = self.plan.block_size - self.plan.block_length(self.plan.n_blocks - 1)
            return self._received * self.plan.block_size - short
        return self._received * self.plan.block_size

    @property
    def complete(self) -> bool:
        """Whether every block has arrived."""
        return self._received == self.plan.n_blocks

    def has(self, index: int) -> bool:
        """Whether block ``index`` has arrived.

        Raises:
            LengthMismatchError: ``index`` is not a block of the plan.
        """
        self.plan.block_range(index)
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def check(self, index: int, payload_len: int) -> bool:
        """Validate a block before writing it; return whether it is new.

        Raises:
            LengthMismatchError: ``index`` is beyond the last block, or ``payload_len`` is not
                that block's exact length (so nothing is ever written past the signed length).
        """
        expected = self.plan.block_length(index)
        if payload_len != expected:
            raise LengthMismatchError(
                f"block {index} has {payload_len} bytes, expected exactly {expected}"
            )
        return not self.has(index)

    def mark(self, index: int) -> None:
        """Record block ``index`` as received (after its bytes were written).

        Raises:
            LengthMismatchError: ``index`` is not a block of the plan.
        """
        if not self.has(index):
            self._bits[index >> 3] |= 1 << (index & 7)
            self._received += 1

    def accept(self, index: int, payload_len: int) -> bool:
        """Validate and record a block in one step; return whether it was new.

        Raises:
            LengthMismatchError: see ``check``.
        """
        new = self.check(index, payload_len)
        if new:
            self.mark(index)
        return new

    def missing_ranges(self, limit: int = MAX_RANGES) -> tuple[tuple[int, int], ...]:
        """The first ``limit`` half-open ranges of missing blocks, ascending.

        Raises:
            ContractError: ``limit`` is not 1..``MAX_RANGES``.
        """
        checked_int(limit, "limit", minimum=1, maximum=MAX_RANGES)
        n = self.plan.n_blocks
        bits = self._bits
        ranges: list[tuple[int, int]] = []
        i = 0
        while i < n and len(ranges) < limit:
            # Skip whole received bytes quickly, then single blocks.
            if i & 7 == 0 and bits[i >> 3] == 0xFF:
                i += 8
                continue
            if bits[i >> 3] & (1 << (i & 7)):
                i += 1
                continue
            start = i
            while i < n:
                if i & 7 == 0 and bits[i >> 3] == 0:
                    i = min(i + 8, n)
                    continue
                if bits[i >> 3] & (1 << (i & 7)):
                    break
                i += 1
            ranges.append((start, i))
        return tuple(ranges)

    def request(self, limit: int = MAX_RANGES) -> BlockRequest | None:
        """A request for the first missing ranges, or None when complete.

        Raises:
            ContractError: ``limit`` is not 1..``MAX_RANGES``.
        """
        ranges = self.missing_ranges(limit)
        return BlockRequest(self.plan.transfer_id, ranges) if ranges else None

    def to_bytes(self) -> bytes:
        """The raw bitmap (``ceil(n_blocks / 8)`` bytes)."""
        return bytes(self._bits)
