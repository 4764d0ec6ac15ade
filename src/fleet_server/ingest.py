"""The gateway's batching telemetry ingest: many MQTT messages, one database transaction.

Owns: ``IngestWorker``, a bounded queue that MQTT handlers feed with already parsed and
validated telemetry (``IngestItem``), and one thread that drains up to ``max_batch`` items (or
whatever arrived within ``max_wait`` seconds), stores them with ``Registry.ingest_many`` and
hands each stored item's ``IngestResult`` to an ``on_stored`` callback (the gateway publishes
the acknowledgement there). Items of one device are stored in the order they were queued,
because a single thread drains a FIFO and ``ingest_many`` applies items in order.

Failure rule: when the transaction fails (database down or locked) nothing of the batch is
stored and nothing is acknowledged; devices resend what stays unacknowledged. Per-item refusals
(unknown or revoked device, structurally wrong batch) are counted by reason and never acked.

Does not parse payloads (the gateway does), publish anything or know about MQTT.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from edge_agent.errors import ContractError
from edge_agent.telemetry import (
    MAX_PAYLOAD_BYTES,
    Batch,
    Event,
    TelemetryReport,
    decode_message,
)
from fleet_server.errors import (
    DeviceRevokedError,
    RegistryError,
    RegistryUnavailableError,
    UnknownDeviceError,
)
from fleet_server.registry.store import IngestResult, Registry

__all__ = ["IngestItem", "IngestStats", "IngestWorker", "parse_telemetry", "refusal_reason"]

log = logging.getLogger(__name__)

_PUT_TIMEOUT: Final = 5.0  # seconds a handler waits for queue space before dropping


@dataclass(frozen=True)
class IngestItem:
    """One received telemetry message, parsed and checked against its topic's device."""

    device_id: str
    entries: tuple[TelemetryReport | Event, ...]
    floor: int | None = None


@dataclass(frozen=True)
class IngestStats:
    """Counters of an ``IngestWorker`` since it was created."""

    queued: int = 0
    stored_messages: int = 0
    inserted: int = 0
    duplicates: int = 0
    lost: int = 0
    transactions: int = 0
    db_failures: int = 0
    dropped_queue_full: int = 0
    refused: tuple[tuple[str, int], ...] = ()  # (reason, count), sorted by reason


def parse_telemetry(kind: str, device_id: str, payload: bytes) -> IngestItem | str:
    """Parse one message of a device's ``telemetry`` or ``events`` topic (pure).

    Args:
        kind: the topic kind, ``"telemetry"`` (a ``Batch`` or a single report or event) or
            ``"events"`` (a single ``Event``).
        device_id: the device named by the topic (the broker ACL ties it to the certificate).
        payload: the message bytes.

    Returns:
        The ``IngestItem`` to store, or the reject reason: ``oversized`` (above
        ``MAX_PAYLOAD_BYTES``, not parsed at all), ``malformed`` (not JSON, unknown schema
        version or type, invalid field), ``wrong_type`` (a valid payload that does not belong
        on this topic) or ``device_mismatch`` (a payload or item names another device).
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        return "oversized"
    try:
        decoded = decode_message(payload)
    except ContractError:
        return "malformed"
    if isinstance(decoded, Batch) and kind == "telemetry":
        item = IngestItem(device_id, decoded.items, decoded.floor)
    elif isinstance(decoded, Event) or (
        isinstance(decoded, TelemetryReport) and kind == "telemetry"
    ):
        item = IngestItem(device_id, (decoded,))
    else:
        return "wrong_type"
    if decoded.device_id != device_id or any(e.device_id != device_id for e in item.entries):
        return "device_mismatch"
    return item


def refusal_reason(error: RegistryError) -> str:
    """The stable reject label of a per-item ingest refusal."""
    if isinstance(error, UnknownDeviceError):
        return "unknown_device"
    if isinstance(error, DeviceRevokedError):
        return "revoked_device"
    return "rejected"


class IngestWorker:
    """A queue plus one thread that stores telemetry in batched transactions.

    Args:
        registry: where telemetry is stored.
        on_stored: called on the worker thread with each stored item's result, in order.
        max_batch: most items stored in one transaction.
        max_wait: seconds to keep collecting after the first item of a batch arrived.
        capacity: queue size; a full queue makes ``put`` wait (back-pressure on MQTT).
        monotonic: clock for ``max_wait`` (injectable for tests).
    """

    def __init__(
        self,
        registry: Registry,
        on_stored: Callable[[IngestResult], None],
        *,
        max_batch: int = 500,
        max_wait: float = 0.05,
        capacity: int = 10_000,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._on_stored = on_stored
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._monotonic = monotonic
        self._queue: queue.Queue[IngestItem | None] = queue.Queue(capacity)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._refused: Counter[str] = Counter()
        self._thread: threading.Thread | None = None
        self._last_failure_log = -1e9

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fleet-ingest", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Store everything queued so far, then stop the thread (idempotent)."""
        if self._thread is None:
            return
        self._queue.put(None)  # FIFO: everything queued before it is stored first
        self._thread.join(timeout)
        self._thread = None

    def put(self, item: IngestItem) -> bool:
        """Queue an item; wait for space when full. Returns False if it had to be dropped.

        A dropped item is simply not acknowledged: the device resends it.
        """
        try:
            self._queue.put(item, timeout=_PUT_TIMEOUT)
        except queue.Full:
            self._count("dropped_queue_full")
            return False
        self._count("queued")
        return True

    def pending(self) -> int:
        """Items queued and not yet taken by the worker."""
        return self._queue.qsize()

    def stats(self) -> IngestStats:
        """A snapshot of the counters."""
        with self._lock:
            c = self._counts
            return IngestStats(
                queued=c["queued"],
                stored_messages=c["stored_messages"],
                inserted=c["inserted"],
                duplicates=c["duplicates"],
                lost=c["lost"],
                transactions=c["transactions"],
                db_failures=c["db_failures"],
                dropped_queue_full=c["dropped_queue_full"],
                refused=tuple(sorted(self._refused.items())),
            )

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = self._monotonic() + self._max_wait
            while len(batch) < self._max_batch:
                remaining = deadline - self._monotonic()
                try:
                    item = (
                        self._queue.get(timeout=max(0.0, remaining))
                        if remaining > 0
                        else (self._queue.get_nowait())
                    )
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self.store(batch)

    def store(self, batch: Sequence[IngestItem]) -> None:
        """Store ``batch`` in one transaction and report each stored item (worker thread).

        Never raises: a database failure is counted and logged (rate-limited), and nothing of
        the batch is reported as stored.
        """
        try:
            results = self._registry.ingest_many([(i.device_id, i.entries, i.floor) for i in batch])
        except RegistryUnavailableError as exc:
            self._count("db_failures")
            now = self._monotonic()
            if now - self._last_failure_log >= 10.0:
                self._last_failure_log = now
                log.warning("telemetry batch of %d not stored (not acked): %s", len(batch), exc)
            return
        except Exception:  # a bug must not kill the only ingest thread
            self._count("db_failures")
            log.exception("telemetry batch of %d failed unexpectedly", len(batch))
            return
        self._count("transactions")
        for result in results:
            if isinstance(result, IngestResult):
                with self._lock:
                    self._counts["stored_messages"] += 1
                    self._counts["inserted"] += result.inserted
                    self._counts["duplicates"] += result.duplicates
                    self._counts["lost"] += result.lost
                try:
                    self._on_stored(result)
                except Exception:
                    log.exception("ack callback failed for %s", result.device_id)
            else:
                with self._lock:
                    self._refused[refusal_reason(result)] += 1

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n
