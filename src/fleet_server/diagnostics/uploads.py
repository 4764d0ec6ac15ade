"""Support-bundle uploads on the server: pull the blocks a device offers, assemble, verify.

Owns one transfer per ``support-bundle`` answer: the plan from the device's ``UploadOffer``
(length, SHA-256, block size), which blocks arrived (``edge_agent.wire.transfer_progress.
Progress``, the bitmap the device uses for model downloads), the partial file
``<dir>/<command id>.part`` written block by block at its offset, and the requests: a window of
``window`` blocks at a time, the next window when the last one arrived, and what is still
missing asked for again after ``retry_seconds`` of silence (a device that reconnects is asked
again; nothing depends on a message that was lost). Complete: the whole file's SHA-256 must be
the offered one, then it is renamed ``<dir>/<command id>.tar.gz``; otherwise it is deleted.
A transfer that has not completed ``deadline_seconds`` after it started fails.

The device's blocks are hostile input: each is checked against the plan (transfer id, index,
exact length) before a byte is written, so nothing lands beyond the offered length, and the
length is capped by ``edge_agent.wire.ops.diagnostics.MAX_OFFER_BYTES``.

Does not talk MQTT (``send`` is given) or keep command state (``book``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from edge_agent.errors import EdgefleetError
from edge_agent.wire.ops.diagnostics import UploadOffer
from edge_agent.wire.transfer import MAX_RANGES, BlockData, BlockRequest
from edge_agent.wire.transfer_progress import Progress

__all__ = ["DEFAULT_WINDOW", "UploadAssembler", "UploadResult"]

DEFAULT_WINDOW: Final = 16


@dataclass(frozen=True)
class UploadResult:
    """How one transfer ended: ``path`` when verified, else the reason."""

    command_id: str
    device_id: str
    ok: bool
    path: Path | None
    length: int
    sha256: str
    reason: str = ""


@dataclass
class _Transfer:
    command_id: str
    device_id: str
    offer: UploadOffer
    progress: Progress
    fd: int
    started: float
    last_activity: float
    asked: set[int] = field(default_factory=set)
    requests: int = 0


class UploadAssembler:
    """Every upload in progress; thread-safe.

    Args:
        directory: where partial and finished archives go.
        send: publishes a ``BlockRequest`` to a device (``(device_id, request)``).
        done: called with each finished transfer (verified or failed), outside the lock.
        clock: monotonic seconds.
        window: blocks asked for at once.
        retry_seconds: silence after which missing blocks are asked for again.
        deadline_seconds: a transfer fails if it has not completed this long after it started.
    """

    def __init__(
        self,
        directory: Path,
        send: Callable[[str, BlockRequest], None],
        done: Callable[[UploadResult], None],
        *,
        clock: Callable[[], float],
        window: int = DEFAULT_WINDOW,
        retry_seconds: float = 2.0,
        deadline_seconds: float = 600.0,
    ) -> None:
        self._dir = directory
        self._dir.mkdir(parents=True, exist_ok=True)
        self._send = send
        self._done = done
        self._clock = clock
        self._window = window
        self._retry = retry_seconds
        self._deadline = deadline_seconds
        self._lock = threading.Lock()
        self._transfers: dict[str, _Transfer] = {}  # by transfer id
        self.counts: Counter[str] = Counter()

    def path(self, command_id: str) -> Path:
        """Where the verified archive of ``command_id`` is (or will be)."""
        return self._dir / f"{command_id}.tar.gz"

    def active(self) -> int:
        """Transfers in progress."""
        with self._lock:
            return len(self._transfers)

    def start(self, command_id: str, device_id: str, offer: UploadOffer) -> None:
        """Begin pulling ``offer`` from ``device_id`` (asks for the first window at once).

        Raises:
            OSError: the partial file cannot be created.
        """
        part = self._dir / f"{command_id}.part"
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        now = self._clock()
        transfer = _Transfer(command_id, device_id, offer, Progress(offer.plan), fd, now, now)
        with self._lock:
            old = self._transfers.pop(offer.plan.transfer_id, None)
            self._transfers[offer.plan.transfer_id] = transfer
        if old is not None:
            os.close(old.fd)
        self._request(transfer, now)

    def on_block(self, device_id: str, payload: bytes) -> None:
        """Write one block from ``device_id`` (gateway handler thread). Never raises; refusals
        are counted (``counts``)."""
        try:
            block = BlockData.from_bytes(payload)
        except EdgefleetError:
            self.counts["malformed"] += 1
            return
        with self._lock:
            transfer = self._transfers.get(block.transfer_id)
            if transfer is None or transfer.device_id != device_id:
                self.counts["unknown_transfer"] += 1
                return
            try:
                block.check(transfer.offer.plan)
                if not transfer.progress.check(block.index, len(block.payload)):
                    self.counts["duplicates"] += 1
                    return
                start, _stop = transfer.offer.plan.block_range(block.index)
                os.pwrite(transfer.fd, block.payload, start)
            except EdgefleetError:
                self.counts["bad_blocks"] += 1
                return
            except OSError as exc:
                self._transfers.pop(block.transfer_id, None)
                finished: UploadResult | None = self._close(transfer, f"write failed: {exc}")
            else:
                transfer.progress.mark(block.index)
                transfer.asked.discard(block.index)
                transfer.last_activity = self._clock()
                self.counts["blocks"] += 1
                finished = None
                if transfer.progress.complete:
                    self._transfers.pop(block.transfer_id, None)
                    finished = self._close(transfer, None)
                elif not transfer.asked:
                    self._request(transfer, transfer.last_activity)
        if finished is not None:
            self._done(finished)

    def tick(self) -> None:
        """Ask again for what stalled; fail transfers past their deadline (any thread)."""
        now = self._clock()
        finished: list[UploadResult] = []
        with self._lock:
            for tid, transfer in list(self._transfers.items()):
                if now - transfer.started > self._deadline:
                    del self._transfers[tid]
                    finished.append(self._close(transfer, "not complete before the deadline"))
                elif now - transfer.last_activity >= self._retry:
                    transfer.asked.clear()
                    self._request(transfer, now)
        for result in finished:
            self._done(result)

    def prune(self, max_age_seconds: float, now: float) -> int:
        """Delete finished archives older than ``max_age_seconds`` (by mtime, wall clock
        ``now``); returns how many. Never raises."""
        removed = 0
        for path in self._dir.glob("*.tar.gz"):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > max_age_seconds:
                    path.unlink()
                    removed += 1
        return removed

    def close(self) -> None:
        """Abandon every transfer (partial files are deleted). Never raises."""
        with self._lock:
            transfers = list(self._transfers.values())
            self._transfers.clear()
        for transfer in transfers:
            self._close(transfer, "server stopping")

    # ------------------------------------------------------------------ internals
    def _request(self, transfer: _Transfer, now: float) -> None:
        """Ask for the next window of missing blocks (called under the lock or before the
        transfer is shared)."""
        ranges: list[tuple[int, int]] = []
        budget = self._window
        for start, stop in transfer.progress.missing_ranges(MAX_RANGES):
            take = min(stop - start, budget)
            ranges.append((start, start + take))
            budget -= take
            if budget == 0:
                break
        if not ranges:
            return
        transfer.asked = {i for start, stop in ranges for i in range(start, stop)}
        transfer.last_activity = now
        transfer.requests += 1
        self.counts["requests"] += 1
        try:
            self._send(
                transfer.device_id, BlockRequest(transfer.offer.plan.transfer_id, tuple(ranges))
            )
        except EdgefleetError:
            self.counts["request_failed"] += 1  # asked again after retry_seconds

    def _close(self, transfer: _Transfer, failure: str | None) -> UploadResult:
        part = self._dir / f"{transfer.command_id}.part"
        offer = transfer.offer
        reason = failure or ""
        ok = False
        try:
            if failure is None:
                digest = hashlib.sha256()
                os.lseek(transfer.fd, 0, os.SEEK_SET)
                while chunk := os.read(transfer.fd, 1 << 20):
                    digest.update(chunk)
                size = os.fstat(transfer.fd).st_size
                if size == offer.length and digest.hexdigest() == offer.sha256:
                    os.fsync(transfer.fd)
                    part.replace(self.path(transfer.command_id))
                    ok = True
                else:
                    reason = "the archive does not match the SHA-256 and length offered"
        except OSError as exc:
            reason = f"archive not stored: {exc}"
        finally:
            os.close(transfer.fd)
            if not ok:
                with contextlib.suppress(OSError):
                    part.unlink()
        self.counts["verified" if ok else "failed"] += 1
        return UploadResult(
            transfer.command_id,
            transfer.device_id,
            ok,
            self.path(transfer.command_id) if ok else None,
            offer.length,
            offer.sha256,
            reason,
        )
