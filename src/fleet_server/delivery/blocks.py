"""Server side of the block transfer: serve blocks of a bundle and plan re-sends.

Owns: ``BlockSource``, which slices the blocks of one published bundle file (positional reads,
the file's size checked against the signed length), and ``plan_resend``, a pure function that
merges many devices' ``BlockRequest``s into the blocks worth re-broadcasting to the whole wave
and the blocks to unicast to single devices, ``plan_round`` (a round of ``(device,
BlockRequest)`` pairs -> per transfer a ``ResendPlan``, unknown transfers and out-of-range
requests counted), ``RecentBroadcasts``, the memory of which blocks are already on their way
to every subscriber (broadcast in the last ``hold_seconds``, or still ahead of a running wave)
so a round does not broadcast them again, and ``Entitlements``, the cached answer to "which
bundles may this device fetch": only those its latest signed desired state names, so a device
cannot download another group's bundle by knowing its digest and length. Does not own MQTT
(the gateway publishes what this returns) or the protocol itself (``edge_agent.wire.transfer``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from edge_agent.errors import (
    ContractError,
    DigestMismatchError,
    EdgefleetError,
    LengthMismatchError,
)
from edge_agent.wire.transfer import BlockData, BlockPlan, BlockRequest

__all__ = [
    "BlockSource",
    "Entitlements",
    "RecentBroadcasts",
    "ResendPlan",
    "RoundPlan",
    "plan_resend",
    "plan_round",
]

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
        suppressed: blocks that would have been re-broadcast but are already in flight to
            every subscriber (see ``RecentBroadcasts``), ascending.
    """

    broadcast: tuple[int, ...]
    unicast: Mapping[str, tuple[int, ...]]
    rejected: Mapping[str, int] = field(default_factory=dict)
    suppressed: tuple[int, ...] = ()


def plan_resend(
    requests: Iterable[tuple[str, BlockRequest]],
    plan: BlockPlan,
    *,
    broadcast_min_devices: int = 2,
    in_flight: Set[int] = frozenset(),
) -> ResendPlan:
    """Merge the devices' requests: blocks many devices miss are re-broadcast, others unicast.

    A block requested by at least ``broadcast_min_devices`` distinct devices is re-broadcast
    (one publish serves them all) unless it is ``in_flight``: a broadcast copy is already on
    its way to every subscriber, so it is sent nothing (``suppressed``); the requesters ask
    again if that copy never arrives. A block fewer devices want is sent to each of them alone
    (cheap, and it keeps a lone late joiner fast). Several requests from one device are merged.

    Args:
        requests: ``(device_id, request)`` pairs received since the last round.
        plan: the transfer being served.
        broadcast_min_devices: distinct requesters that make a block worth re-broadcasting.
        in_flight: blocks of this transfer not to broadcast again now.

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
    shared = {i for i, count in demand.items() if count >= broadcast_min_devices}
    broadcast = shared - in_flight
    unicast = {
        device_id: tuple(sorted(blocks - shared))
        for device_id, blocks in sorted(wanted.items())
        if blocks - shared
    }
    return ResendPlan(
        tuple(sorted(broadcast)), unicast, dict(rejected), tuple(sorted(shared & in_flight))
    )


@dataclass(frozen=True)
class RoundPlan:
    """What one round of block requests asks for.

    Attributes:
        transfers: per known transfer id, the merged ``ResendPlan``.
        unknown: requests naming a transfer that is not a published bundle.
        out_of_range: requests refused by their transfer (beyond the last block).
        suppressed: blocks not re-broadcast because a copy is already in flight.
    """

    transfers: Mapping[str, ResendPlan] = field(default_factory=dict)
    unknown: int = 0
    out_of_range: int = 0
    suppressed: int = 0


def plan_round(
    requests: Sequence[tuple[str, BlockRequest]],
    plans: Mapping[str, BlockPlan],
    *,
    broadcast_min_devices: int,
    in_flight: Mapping[str, Set[int]] | None = None,
) -> RoundPlan:
    """Group a round's requests by transfer and merge each group with ``plan_resend``.

    Args:
        requests: ``(device_id, request)`` in arrival order.
        plans: the transfers that can be served, by transfer id.
        broadcast_min_devices: distinct requesters that make a block worth broadcasting.
        in_flight: per transfer, blocks not to broadcast again now (see ``plan_resend``).

    Returns:
        The ``RoundPlan``.

    Raises:
        ContractError: ``broadcast_min_devices`` is not a positive integer.
    """
    grouped: dict[str, list[tuple[str, BlockRequest]]] = {}
    unknown = 0
    for device_id, request in requests:
        if request.transfer_id in plans:
            grouped.setdefault(request.transfer_id, []).append((device_id, request))
        else:
            unknown += 1
    transfers: dict[str, ResendPlan] = {}
    out_of_range = suppressed = 0
    for transfer_id, group in grouped.items():
        resend = plan_resend(
            group,
            plans[transfer_id],
            broadcast_min_devices=broadcast_min_devices,
            in_flight=(in_flight or {}).get(transfer_id, frozenset()),
        )
        out_of_range += sum(resend.rejected.values())
        suppressed += len(resend.suppressed)
        if resend.broadcast or resend.unicast:
            transfers[transfer_id] = resend
    return RoundPlan(transfers, unknown, out_of_range, suppressed)


class RecentBroadcasts:
    """Which blocks are already on their way to every subscriber of a transfer's wave topic.

    Pure bookkeeping with the clock passed in (the caller locks). A block counts as in flight
    for ``hold_seconds`` after it was broadcast (the broker fans one publish out to every
    subscriber, which takes seconds for a large fleet), and while a running wave has not yet
    reached it (the wave will send it anyway). ``forget_sent`` drops the first kind after a
    publish failure: a broker that went away may have lost what it was still delivering.

    Raises:
        ContractError: ``hold_seconds`` is negative (on construction).
    """

    def __init__(self, hold_seconds: float) -> None:
        if not hold_seconds >= 0:
            raise ContractError(f"hold_seconds must be >= 0: {hold_seconds!r}")
        self._hold = hold_seconds
        self._sent: dict[str, dict[int, float]] = {}  # transfer -> block -> broadcast time
        self._waves: dict[str, tuple[int, int]] = {}  # transfer -> (next index, n_blocks)

    def record(self, transfer_id: str, index: int, now: float) -> None:
        """Block ``index`` was just broadcast."""
        self._sent.setdefault(transfer_id, {})[index] = now

    def wave_at(self, transfer_id: str, next_index: int, n_blocks: int) -> None:
        """A wave of ``transfer_id`` will still broadcast blocks ``next_index .. n_blocks-1``."""
        self._waves[transfer_id] = (next_index, n_blocks)

    def wave_ended(self, transfer_id: str) -> None:
        """The wave finished or was aborted: it will send nothing more."""
        self._waves.pop(transfer_id, None)

    def forget_sent(self) -> None:
        """Forget every recorded broadcast (running waves stay pending)."""
        self._sent.clear()

    def in_flight(self, transfer_id: str, now: float) -> frozenset[int]:
        """Blocks of ``transfer_id`` not worth broadcasting again at ``now``."""
        sent = self._sent.get(transfer_id, {})
        expired = [i for i, at in sent.items() if now - at >= self._hold]
        for i in expired:
            del sent[i]
        if not sent:
            self._sent.pop(transfer_id, None)
        start, stop = self._waves.get(transfer_id, (0, 0))
        return frozenset(sent).union(range(start, stop))


class Entitlements:
    """Per device, the bundle digests its latest desired state names (cached). Thread-safe.

    Args:
        load: ``load(device_id)`` -> the SHA-256s of the bundles the device's newest stored
            desired state names (empty: none); may raise ``EdgefleetError`` (then nothing is
            allowed for now and the answer is not cached).
        ttl: seconds an answer is reused; ``forget(device_id)`` drops it at once (a new
            desired state was published).
        max_devices: most answers kept (the cache is emptied when full).
        monotonic: clock for ``ttl``.
    """

    def __init__(
        self,
        load: Callable[[str], frozenset[str]],
        *,
        ttl: float = 5.0,
        max_devices: int = 100_000,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self._ttl = ttl
        self._max = max_devices
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}

    def allows(self, device_id: str, sha256: str) -> bool:
        """Whether ``device_id`` may fetch blocks of the bundle with this SHA-256."""
        now = self._monotonic()
        with self._lock:
            hit = self._cache.get(device_id)
        if hit is None or now - hit[0] >= self._ttl:
            try:
                allowed = self._load(device_id)
            except EdgefleetError:
                return False
            with self._lock:
                if len(self._cache) >= self._max:
                    self._cache.clear()
                self._cache[device_id] = (now, allowed)
            hit = (now, allowed)
        return sha256 in hit[1]

    def forget(self, device_id: str) -> None:
        """Drop the cached answer of one device (its desired state changed)."""
        with self._lock:
            self._cache.pop(device_id, None)
