"""The device side of one bundle download over MQTT: which blocks to ask for, and when.

Owns the pacing of block requests for one assigned bundle: at most ``window`` blocks are
asked for at a time; the next window is asked for as soon as the previous one has arrived, and
missing blocks are asked for again when nothing arrived for ``retry_seconds`` (a lost request,
a lost response, a broker restart). Blocks that arrive unasked (a rollout wave broadcast on
the shared topic) are written too, and while they keep arriving the device stays quiet.

Bytes on disk, resumption after a restart and the digest check are ``PartialDownload``'s
(``edge_agent.sync.transfer_store``); the wire messages and the signed-length checks are
``edge_agent.wire.transfer``'s. Does not publish (the sync loop sends what ``due_request`` returns)
and does not install (the sync loop hands ``finish()``'s file to the model store).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from edge_agent.sync.transfer_store import PartialDownload
from edge_agent.trust.assignment import ModelAssignment
from edge_agent.wire.transfer import (
    DEFAULT_BLOCK_SIZE,
    MAX_RANGES,
    BlockData,
    BlockPlan,
    BlockRequest,
)

__all__ = ["Download"]


class Download:
    """One assigned bundle being fetched block by block (resumes what is already on disk).

    Not thread-safe: the caller serialises ``accept``, ``due_request`` and ``finish``.

    Raises:
        ContractError: invalid block size or window (on construction).
        OSError: the download directory or part file cannot be created.
    """

    def __init__(
        self,
        name: str,
        assignment: ModelAssignment,
        directory: Path,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        window: int = 16,
        retry_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window < 1 or retry_seconds <= 0:
            raise ValueError("window must be >= 1 and retry_seconds positive")
        self.name = name
        self.assignment = assignment
        self.plan = BlockPlan.from_assignment(assignment, block_size)
        self._part = PartialDownload(directory, self.plan)
        self._window = window
        self._retry = retry_seconds
        self._clock = clock
        self._asked: set[int] = set()
        self._unasked = False
        self._last_request = -float("inf")
        self._last_block = clock()
        self.requests_sent = 0
        self.duplicates = 0

    @property
    def transfer_id(self) -> str:
        """The id every block of this transfer carries."""
        return self.plan.transfer_id

    @property
    def resumed_blocks(self) -> int:
        """Blocks found on disk when the download was (re)opened."""
        return self._part.resumed_blocks

    @property
    def received(self) -> int:
        """Blocks on disk."""
        return self._part.progress.received

    @property
    def total(self) -> int:
        """Blocks in the bundle."""
        return self.plan.n_blocks

    @property
    def complete(self) -> bool:
        """Every block is on disk (the digest is checked by ``finish``)."""
        return self._part.progress.complete

    def accept(self, block: BlockData) -> bool:
        """Write a received block; False for a duplicate.

        Raises:
            TransferMismatchError: the block belongs to another transfer (ignore it).
            LengthMismatchError: beyond the signed length or of the wrong size (count it).
            OSError: the write failed.
        """
        new = self._part.accept(block)
        if new:
            if block.index in self._asked:
                self._asked.discard(block.index)
            else:
                self._unasked = True
            self._last_block = self._clock()
        else:
            self.duplicates += 1
        return new

    def due_request(self) -> BlockRequest | None:
        """The request to send now, or None (complete, or waiting for blocks in flight).

        A new window is asked for when everything asked for has arrived; what is still missing
        is asked for again once nothing has arrived for ``retry_seconds``.
        """
        if self.complete:
            return None
        now = self._clock()
        if self._asked:
            if now - max(self._last_block, self._last_request) < self._retry:
                return None  # the window asked for is still arriving
        elif self._unasked and now - self._last_block < self._retry / 4:
            return None  # blocks are arriving unasked (a broadcast wave): let it run
        ranges: list[tuple[int, int]] = []
        budget = self._window
        for start, stop in self._part.progress.missing_ranges(MAX_RANGES):
            take = min(stop - start, budget)
            ranges.append((start, start + take))
            budget -= take
            if budget == 0:
                break
        self._asked = {i for start, stop in ranges for i in range(start, stop)}
        self._unasked = False
        self._last_request = now
        self.requests_sent += 1
        return BlockRequest(self.plan.transfer_id, tuple(ranges))

    def finish(self) -> Path:
        """Verify the whole file against the signed length and digest; return its path.

        Raises:
            TransferIncompleteError: blocks are missing.
            LengthMismatchError, DigestMismatchError: the file is wrong (it is discarded).
            OSError: reading or renaming failed.
        """
        return self._part.finish()

    def close(self) -> None:
        """Persist progress and release the file (a later ``Download`` resumes). Never raises."""
        with contextlib.suppress(OSError):
            self._part.close()

    def abandon(self) -> None:
        """Discard the partial file (another version was assigned meanwhile)."""
        with contextlib.suppress(OSError):
            self._part.abandon()
