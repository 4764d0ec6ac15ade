"""The gateway's batching telemetry ingest: many MQTT messages, one database transaction.

Owns: ``IngestWorker``, a bounded, per-device fair queue that MQTT handlers feed with already
parsed telemetry (``IngestItem``), and one thread that drains up to ``max_batch`` items (or
whatever arrived within ``max_wait`` seconds), stores them with ``Registry.ingest_many`` and
hands each stored item's ``IngestResult`` to an ``on_stored`` callback (the gateway publishes
the acknowledgement there).

Fairness: every device has its own FIFO (at most ``per_device`` items) and a batch takes items
round-robin over the devices that have any, so a device with a backlog of thousands delays
another device's message by at most one turn. ``put`` never blocks the MQTT thread: an item
beyond its device's share (or the total capacity) is dropped, counted and not acknowledged (the
device resends it). Items of one device are stored in the order they were queued.

Failure rule, per message and never per batch: when the batch transaction fails because of its
data (the database refused a value: ``DataError``, a value the driver cannot encode), the batch
is split in halves and each half is stored on its own, down to the one message that fails; that
message is stored as ``refused`` placeholders for its seqs (``ingest_parse.refused_entry``) so
its device is acknowledged past it, and it is counted as ``unstorable``. When the database is
down (anything else), nothing of the failing part is stored or acknowledged; devices resend.
Per-item refusals (unknown or revoked device, structurally wrong batch) are counted by reason
and never acked.

``drain`` waits until the worker is idle (nothing queued, no batch being stored), so a test
waits on the ingest instead of sleeping; production never calls it.

Does not parse payloads (``fleet_server.gateway.ingest_parse``), publish anything or know about
MQTT.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from sqlalchemy.exc import DataError, DBAPIError, StatementError

from edge_agent.wire.telemetry import TelemetryReport
from fleet_server.errors import RegistryError, RegistryUnavailableError
from fleet_server.gateway.ingest_parse import IngestItem, refusal_reason, refused_entry
from fleet_server.registry.store import Registry
from fleet_server.registry.values import IngestResult, TelemetryEntry

__all__ = ["IngestStats", "IngestWorker", "is_data_failure"]

log = logging.getLogger(__name__)

_LOG_EVERY: Final = 10.0  # seconds between two log lines about failing transactions

#: ``on_refused(device_id, reason, n)``: ``n`` entries or messages of a device were refused.
OnRefused = Callable[[str, str, int], None]


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
    isolations: int = 0  # batch transactions split because of one message's data


def is_data_failure(exc: BaseException) -> bool:
    """True if a failed ingest was refused for its data, not because the database is down.

    ``DataError`` (PostgreSQL: ``\\u0000`` or a lone surrogate in JSONB, NUL in TEXT) and a bind
    value the driver could not encode (a ``StatementError`` that is not a database error) are
    the message's fault; everything else (connection, lock, disk) is the database's.
    """
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, DataError):
            return True
        if isinstance(cause, StatementError) and not isinstance(cause, DBAPIError):
            return True
        cause = cause.__cause__
    return False


class _FairQueue:
    """Per-device FIFOs drained round-robin (see the module docstring). Thread-safe."""

    def __init__(self, capacity: int, per_device: int) -> None:
        self._capacity = capacity
        self._per_device = per_device
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # items arrived or the queue closed (the taker)
        self._idle = threading.Condition(lock)  # a taken batch is done (``wait_idle``)
        self._queues: dict[str, deque[IngestItem]] = {}
        self._turns: deque[str] = deque()  # devices with queued items, in round-robin order
        self._size = 0
        self._in_flight = 0  # items taken and not yet reported done
        self._closed = False

    def put(self, item: IngestItem) -> bool:
        with self._cond:
            q = self._queues.get(item.device_id)
            if self._size >= self._capacity or (q is not None and len(q) >= self._per_device):
                return False
            if q is None:
                q = self._queues[item.device_id] = deque()
                self._turns.append(item.device_id)
            q.append(item)
            self._size += 1
            self._cond.notify()
            return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def size(self) -> int:
        with self._cond:
            return self._size

    def take(
        self, max_items: int, max_wait: float, monotonic: Callable[[], float]
    ) -> tuple[list[IngestItem], bool]:
        """Wait for a first item, then collect up to ``max_items`` within ``max_wait``.

        Returns the items and whether the queue is closed and now empty.
        """
        out: list[IngestItem] = []
        with self._cond:
            while self._size == 0 and not self._closed:
                self._cond.wait()
            deadline = monotonic() + max_wait
            while len(out) < max_items:
                while self._size and len(out) < max_items:
                    out.append(self._pop())
                remaining = deadline - monotonic()
                if len(out) >= max_items or self._closed or remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._in_flight += len(out)
            return out, self._closed and self._size == 0

    def done(self, n: int) -> None:
        """``n`` taken items have been handled (stored, refused or failed)."""
        with self._cond:
            self._in_flight -= n
            if self._size == 0 and self._in_flight == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or in flight; False if that took over ``timeout``."""
        with self._cond:
            return self._idle.wait_for(lambda: self._size == 0 and self._in_flight == 0, timeout)

    def _pop(self) -> IngestItem:
        device = self._turns.popleft()
        q = self._queues[device]
        item = q.popleft()
        if q:
            self._turns.append(device)
        else:
            del self._queues[device]
        self._size -= 1
        return item


class IngestWorker:
    """A fair queue plus one thread that stores telemetry in batched transactions.

    Args:
        registry: where telemetry is stored.
        on_stored: called on the worker thread with each stored item's result, in order.
        max_batch: most items stored in one transaction.
        max_wait: seconds to keep collecting after the first item of a batch arrived.
        capacity: most items queued in total.
        per_device: most items queued for one device (its fair share of the queue).
        on_refused: called with ``(device_id, reason, n)`` for every refusal (per-device
            counters); never for queue drops.
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
        per_device: int = 200,
        on_refused: OnRefused | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._on_stored = on_stored
        self._on_refused = on_refused
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._monotonic = monotonic
        self._queue = _FairQueue(capacity, max(1, per_device))
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
        self._queue.close()
        if self._thread is None:
            return
        self._thread.join(timeout)
        self._thread = None

    def put(self, item: IngestItem) -> bool:
        """Queue an item without waiting. Returns False if it had to be dropped.

        A dropped item (its device's share or the whole queue is full) is simply not
        acknowledged: the device resends it.
        """
        if not self._queue.put(item):
            self._count("dropped_queue_full")
            return False
        self._count("queued")
        for reason, n in item.refused:
            if n:
                self._refuse(item.device_id, reason, n)
        return True

    def pending(self) -> int:
        """Items queued and not yet taken by the worker."""
        return self._queue.size()

    def drain(self, timeout: float) -> bool:
        """Wait until every item queued so far has been handled: stored (and ``on_stored``
        returned for it, i.e. its ack was handed to the client), refused, or failed.

        For tests, which wait on this instead of sleeping. Items queued meanwhile are waited
        for too. Needs the worker thread (``start``) to make progress.

        Returns:
            True once nothing is queued or being stored; False if that did not happen within
            ``timeout`` seconds.
        """
        return self._queue.wait_idle(timeout)

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
                isolations=c["isolations"],
            )

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        while True:
            batch, done = self._queue.take(self._max_batch, self._max_wait, self._monotonic)
            if batch:
                try:
                    self.store(batch)
                finally:
                    self._queue.done(len(batch))
            if done:
                return

    def store(self, batch: Sequence[IngestItem]) -> None:
        """Store ``batch``, isolating a message the database refuses (worker thread).

        Never raises: a database failure is counted and logged (rate-limited), and what it
        prevented from being stored is not reported as stored.
        """
        try:
            self._store(list(batch))
        except RegistryUnavailableError as exc:
            self._count("db_failures")
            now = self._monotonic()
            if now - self._last_failure_log >= _LOG_EVERY:
                self._last_failure_log = now
                log.warning("telemetry batch of %d not stored (not acked): %s", len(batch), exc)
        except Exception:  # a bug must not kill the only ingest thread
            self._count("db_failures")
            log.exception("telemetry batch of %d failed unexpectedly", len(batch))

    def _store(self, batch: list[IngestItem]) -> None:
        """Store in one transaction; on a data failure, bisect down to the culprit.

        Raises:
            RegistryUnavailableError: the database is down; the rest is not stored.
        """
        try:
            results = self._registry.ingest_many([(i.device_id, i.entries, i.floor) for i in batch])
        except RegistryUnavailableError as exc:
            if not is_data_failure(exc):
                raise
            self._count("isolations")
            if len(batch) > 1:
                half = len(batch) // 2
                self._store(batch[:half])
                self._store(batch[half:])
                return
            self._store_refused(batch[0], exc)
            return
        self._report(batch, results)

    def _store_refused(self, item: IngestItem, exc: RegistryUnavailableError) -> None:
        """The database refused this one message: store placeholders for its seqs.

        Raises:
            RegistryUnavailableError: the database is down.
        """
        log.warning("telemetry of %s refused by the database: %s", item.device_id, exc)
        placeholders = [
            refused_entry(
                e.seq,
                "unstorable",
                e.kind
                if isinstance(e, TelemetryEntry)
                else ("report" if isinstance(e, TelemetryReport) else "event"),
            )
            for e in item.entries
        ]
        self._refuse(item.device_id, "unstorable", 1)
        try:
            results = self._registry.ingest_many([(item.device_id, placeholders, item.floor)])
        except RegistryUnavailableError as again:
            if is_data_failure(again):  # pragma: no cover - placeholders are plain ASCII
                log.error("refused placeholders of %s not stored: %s", item.device_id, again)
                return
            raise
        self._report([item], results)

    def _report(
        self, batch: Sequence[IngestItem], results: Sequence[IngestResult | RegistryError]
    ) -> None:
        self._count("transactions")
        for item, result in zip(batch, results, strict=True):
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
                self._refuse(item.device_id, refusal_reason(result), 1)

    def _refuse(self, device_id: str, reason: str, n: int) -> None:
        with self._lock:
            self._refused[reason] += n
        if self._on_refused is not None:
            try:
                self._on_refused(device_id, reason, n)
            except Exception:
                log.exception("refusal callback failed for %s", device_id)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n
