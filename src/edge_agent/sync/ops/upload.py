"""Device side of a support-bundle upload: hold the archive, serve the blocks the server asks for.

Owns the archives on offer (at most ``MAX_OFFERS``, each for ``OFFER_TTL_SECONDS``, in memory
only: a restart drops them and the server's transfer then expires), serving a
``BlockRequest`` from ``.../upload/req`` as ``BlockData`` on ``.../upload/data`` (the same
messages a model bundle travels in, the other way: the server pulls, so it paces the
transfer and repairs gaps by asking again), and the daily upload budget (bytes served per UTC
day, persisted in ``upload_budget.json`` so a restart does not reset it).

Does not build archives (``support_bundle``) or decide whether a command is authorized
(``commands``). Thread-safe: requests arrive on the MQTT handler thread, offers from the
command thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from edge_agent.common.durable import write_atomic
from edge_agent.errors import CommandLimitError, EdgefleetError, TransportError
from edge_agent.wire.ops.diagnostics import UploadOffer
from edge_agent.wire.transfer import DEFAULT_BLOCK_SIZE, BlockData, BlockRequest

__all__ = ["MAX_OFFERS", "OFFER_TTL_SECONDS", "UploadServer"]

log = logging.getLogger("edge_agent.sync.ops.commands")

MAX_OFFERS: Final = 2
OFFER_TTL_SECONDS: Final = 3600.0


@dataclass
class _Offer:
    data: bytes
    offer: UploadOffer
    created: float


class UploadServer:
    """Archives on offer and the daily budget; see the module doc.

    Args:
        path: the budget file (``<state>/sync/upload_budget.json``).
        daily_bytes: bytes this device may upload per UTC day.
        publish: publishes one ``BlockData`` payload on the device's ``upload_data`` topic.
        clock: wall-clock seconds (the budget's day, offer expiry).
    """

    def __init__(
        self,
        path: Path,
        daily_bytes: int,
        publish: Callable[[bytes], object],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = path
        self._daily = daily_bytes
        self._publish = publish
        self._clock = clock
        self._lock = threading.Lock()
        self._offers: dict[str, _Offer] = {}
        self.counts: Counter[str] = Counter()
        self._day, self._used = self._load()

    def _load(self) -> tuple[str, int]:
        try:
            doc = json.loads(self._path.read_bytes())
            return str(doc["day"]), int(doc["bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            return self._today(), 0

    def _today(self) -> str:
        return datetime.fromtimestamp(self._clock(), UTC).strftime("%Y-%m-%d")

    def _roll(self) -> None:
        today = self._today()
        if today != self._day:
            self._day, self._used = today, 0

    def remaining(self) -> int:
        """Bytes left in today's budget."""
        with self._lock:
            self._roll()
            return max(0, self._daily - self._used)

    def offer(self, data: bytes) -> UploadOffer:
        """Hold ``data`` for upload and describe it (the ``support-bundle`` answer's result).

        Raises:
            CommandLimitError: ``data`` is larger than what is left of today's budget.
        """
        offer = UploadOffer(len(data), hashlib.sha256(data).hexdigest(), DEFAULT_BLOCK_SIZE)
        with self._lock:
            self._roll()
            if len(data) > self._daily - self._used:
                self.counts["budget_refused"] += 1
                raise CommandLimitError(
                    f"upload budget: {max(0, self._daily - self._used)} bytes left today, "
                    f"the bundle has {len(data)}"
                )
            now = self._clock()
            for tid in [t for t, o in self._offers.items() if now - o.created > OFFER_TTL_SECONDS]:
                del self._offers[tid]
            while len(self._offers) >= MAX_OFFERS:  # the oldest goes first
                del self._offers[next(iter(self._offers))]
            self._offers[offer.plan.transfer_id] = _Offer(data, offer, now)
        return offer

    def on_request(self, payload: bytes) -> None:
        """Serve one block request (MQTT handler thread). Never raises; refusals are counted."""
        try:
            request = BlockRequest.from_bytes(payload)
        except EdgefleetError:
            self.counts["bad_requests"] += 1
            return
        with self._lock:
            held = self._offers.get(request.transfer_id)
            if held is None or self._clock() - held.created > OFFER_TTL_SECONDS:
                self.counts["unknown_transfer"] += 1
                return
            plan = held.offer.plan
            try:
                indices = request.blocks(plan)
            except EdgefleetError:
                self.counts["bad_requests"] += 1
                return
            self._roll()
            todo = []
            for index in indices:
                start, stop = plan.block_range(index)
                if self._used + (stop - start) > self._daily:
                    self.counts["budget_refused"] += 1
                    break
                self._used += stop - start
                todo.append(BlockData(plan.transfer_id, index, held.data[start:stop]))
            self._save()
        for block in todo:
            try:
                self._publish(block.to_bytes())
            except TransportError as exc:  # the server asks again for what it misses
                self.counts["publish_failed"] += 1
                log.debug("upload block %d not sent: %s", block.index, exc)
                return
            self.counts["blocks_sent"] += 1

    def _save(self) -> None:
        try:
            write_atomic(self._path, json.dumps({"day": self._day, "bytes": self._used}).encode())
        except OSError as exc:  # the budget still holds in memory until the next restart
            log.warning("upload budget not saved: %s", exc)
