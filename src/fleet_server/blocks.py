"""Server side of the block transfer: serve blocks of a bundle and plan re-sends.

Owns: ``BlockSource``, which slices the blocks of one published bundle file (positional reads,
the file's size checked against the signed length), and ``plan_resend``, a pure function that
merges many devices' ``BlockRequest``s into the blocks worth re-broadcasting to the whole wave
and the blocks to unicast to single devices. Does not own MQTT (the gateway publishes what this
returns) or the protocol itself (``edge_agent.transfer``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from edge_agent.errors import (
    ContractError,
    DigestMismatchError,
    EdgefleetError,
    LengthMismatchError,
)
from edge_agent.transfer import BlockData, BlockPlan, BlockRequest

__all__ = ["BlockSource", "ResendPlan", "plan_resend"]

_HASH_CHUNK = 1 << 20


class BlockSource:
    """Reads blocks of one bundle file for a transfer plan.

    Args:
        path: the published bundle file.
        plan: the transfer (signed length and SHA-256, block size).

    Raises:
        OSError: the file cannot be opened.
        LengthMismatchError: the file is not exactly ``plan.length`` bytes.
    """

    def __init__(self, path: Path, plan: BlockPlan) -> None:
        self.path = Path(path)
        self.plan = plan
        self._fd: int | None = os.open(self.path, os.O_RDONLY)
        size = os.fstat(self._fd).st_size
        if size != plan.length:
            self.close()
            raise LengthMismatchError(f"{self.path} has {size} bytes, plan says {plan.length}")

    def _require_fd(self) -> int:
        if self._fd is None:
            raise ContractError(f"block source {self.path} is closed")
        return self._fd

    def verify(self) -> None:
        """Hash the whole file and compare it with the plan (before starting a wave).

        Raises:
            DigestMismatchError: the file's SHA-256 is not ``plan.sha256``.
            ContractError: the source is closed.
            OSError: reading failed.
        """
        fd = self._require_fd()
        digest = hashlib.sha256()
        offset = 0
        while offset < self.plan.length:
            chunk = os.pread(fd, min(_HASH_CHUNK, self.plan.length - offset), offset)
            if not chunk:
                break
            digest.update(chunk)
            offset += len(chunk)
        if not hmac.compare_digest(digest.hexdigest(), self.plan.sha256):
            raise DigestMismatchError(f"{self.path} does not hash to {self.plan.sha256}")

    def block(self, index: int) -> bytes:
        """The bytes of block ``index``.

        Raises:
            LengthMismatchError: ``index`` is not a block of the plan, or the file shrank.
            ContractError: the source is closed.
            OSError: reading failed.
        """
        fd = self._require_fd()
        start, stop = self.plan.block_range(index)
        data = os.pread(fd, stop - start, start)
        if len(data) != stop - start:
            raise LengthMismatchError(f"{self.path} shrank: block {index} is short")
        return data

    def message(self, index: int) -> BlockData:
        """Block ``index`` as a wire message.

        Raises:
            LengthMismatchError: see ``block``.
            ContractError: the source is closed.
            OSError: reading failed.
        """
        return BlockData(self.plan.transfer_id, index, self.block(index))

    def close(self) -> None:
        """Release the file (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> BlockSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True)
class ResendPlan:
    """What to send after a round of block requests.

    Attributes:
        broadcast: block indices to publish once on the wave's shared topic, ascending.
        unicast: per device, the block indices to send to it alone, ascending.
        rejected: per device, how many requests were refused (another transfer, beyond the
            last block); counted, never raised, so one bad device cannot stall the wave.
    """

    broadcast: tuple[int, ...]
    unicast: Mapping[str, tuple[int, ...]]
    rejected: Mapping[str, int] = field(default_factory=dict)


def plan_resend(
    requests: Iterable[tuple[str, BlockRequest]],
    plan: BlockPlan,
    *,
    broadcast_min_devices: int = 2,
) -> ResendPlan:
    """Merge the devices' requests: blocks many devices miss are re-broadcast, others unicast.

    A block requested by at least ``broadcast_min_devices`` distinct devices is re-broadcast
    (one publish serves them all); a block fewer devices want is sent to each of them alone.
    Several requests from one device are merged.

    Args:
        requests: ``(device_id, request)`` pairs received since the last round.
        plan: the transfer being served.
        broadcast_min_devices: distinct requesters that make a block worth re-broadcasting.

    Returns:
        The ``ResendPlan``; a block is either broadcast or unicast, never both.

    Raises:
        ContractError: ``broadcast_min_devices`` is not a positive integer.
    """
    if type(broadcast_min_devices) is not int or broadcast_min_devices < 1:
        raise ContractError(f"broadcast_min_devices must be >= 1: {broadcast_min_devices!r}")
    wanted: dict[str, set[int]] = {}
    rejected: Counter[str] = Counter()
    for device_id, request in requests:
        try:
            indices = request.blocks(plan)
        except EdgefleetError:
            rejected[device_id] += 1
            continue
        wanted.setdefault(device_id, set()).update(indices)
    demand: Counter[int] = Counter()
    for blocks in wanted.values():
        demand.update(blocks)
    broadcast = {i for i, count in demand.items() if count >= broadcast_min_devices}
    unicast = {
        device_id: tuple(sorted(blocks - broadcast))
        for device_id, blocks in sorted(wanted.items())
        if blocks - broadcast
    }
    return ResendPlan(tuple(sorted(broadcast)), unicast, dict(rejected))
