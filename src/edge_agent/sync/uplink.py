"""Telemetry from the outbox to the server: batches out, acknowledgements in.

Owns the sending half of "nothing lost": every report and event first goes into the on-disk
``Outbox`` (which assigns its ``seq``), then leaves in ``Batch`` messages carrying the outbox's
oldest held ``seq`` as ``floor``. That is the one path of an event: it is not also published
on ``.../events`` (a second copy the server would count as a duplicate), so a consumer reads
events as the ``event`` items of batches on ``.../telemetry``. When the outbox had to drop
entries for lack of space, the next report is followed by one ``telemetry_dropped`` event
saying how many; while that event waits for its ack no other is added (later drops are counted
in the next one), so offline notices cannot crowd the reports out. Drops before this process
started are only in the reports' cumulative ``telemetry_dropped``.

One batch is in flight at a time; the server's ``TelemetryAck`` (highest contiguous stored
``seq``) deletes what it covers and releases the next batch at once, so a backlog drains at one
round trip per batch. A batch that is not acknowledged within ``ack_timeout`` is sent again (the
server deduplicates by ``(device, seq)``).

Ack-timeout backoff: an overloaded server that cannot ack within ``ack_timeout`` must not get a
resend from the whole fleet every ``ack_timeout`` (each resend is a duplicate it has to parse and
drop, on top of the backlog that made it slow). After the ``n``-th consecutive resend the wait
for an ack is uniform in ``[ack_timeout, min(ack_timeout_max, ack_timeout * 2**n)]``
(``ack_wait``): exponential, with full jitter over the whole window so devices that timed out
together spread out, and never shorter than ``ack_timeout`` (an ack is always given that long,
so a resend never races an ack the server is about to send). The first wait is exactly
``ack_timeout``. Any ack that makes progress (deletes entries or covers the batch in flight)
resets the backoff; a reconnect does not (the server has not answered yet), but the batch in
flight still goes again at once on a new session.

Coalescing: with ``coalesce_seconds`` the first send of a batch of plain reports may wait up to
that long for more reports to join it (``coalesce.CoalescePolicy``: never an event, an alerting
drift window, a model on probation or in shadow, nor a resend).

Encoding: a batch leaves as canonical JSON unless the latest acknowledgement listed
``compact.PACKED_ENCODING`` in ``accepts`` (a server that reads it says so in every ack); then it
leaves packed (``edge_agent.wire.compact``: the same JSON, losslessly about a tenth of the size
with drift windows). A resend after an ack timeout goes as JSON and packing stops until an ack
lists the encoding again, as it does after a reconnect: a server replaced by one that cannot
read the packed form costs one ack timeout, never a jammed outbox.

Entries are stored with ``seq`` 0 and get their real ``seq`` when a batch is built, because the
outbox assigns it on insert. Does not build reports (``telemetry.report_from_status`` does) and
does not own the MQTT session: ``publish`` is whatever sends bytes to a topic.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import (
    AckOutOfRangeError,
    ContractError,
    OutboxError,
    TransportError,
)
from edge_agent.strict_json import loads as strict_loads
from edge_agent.sync.coalesce import CoalescePolicy
from edge_agent.sync.outbox import Outbox, Priority
from edge_agent.wire.compact import PACKED_ENCODING, pack_message
from edge_agent.wire.telemetry import (
    MAX_PAYLOAD_BYTES,
    Batch,
    Event,
    TelemetryAck,
    TelemetryReport,
)

__all__ = ["MAX_ITEM_BYTES", "Uplink", "UplinkStats", "ack_wait"]

log = logging.getLogger(__name__)

#: Largest stored item that fits in a batch message under the receivers' cap.
MAX_ITEM_BYTES = MAX_PAYLOAD_BYTES - 4096

Publish = Callable[[str, bytes], None]


def ack_wait(resends: int, ack_timeout: float, ack_timeout_max: float, rand: float) -> float:
    """Seconds to wait for an ack after the ``resends``-th consecutive resend (0: first send).

    Uniform in ``[ack_timeout, min(ack_timeout_max, ack_timeout * 2**resends)]`` for ``rand``
    uniform in ``[0, 1)``; exactly ``ack_timeout`` when ``resends`` is 0 or the cap is not above
    it. Pure: the caller supplies the random draw.
    """
    window = min(ack_timeout_max, ack_timeout * 2.0 ** min(resends, 32))
    return ack_timeout + rand * max(0.0, window - ack_timeout)


@dataclass(frozen=True)
class UplinkStats:
    """Counters since start."""

    batches_sent: int = 0
    resends: int = 0
    acks: int = 0
    acked_entries: int = 0
    bad_acks: int = 0
    publish_failures: int = 0
    unreadable_entries: int = 0
    oversized_entries: int = 0
    unsendable_dropped: int = 0
    packed_sent: int = 0
    batches_held: int = 0  # batches of plain reports held back to share a message


class Uplink:
    """Sends the outbox's entries in acknowledged batches. Thread-safe."""

    def __init__(
        self,
        outbox: Outbox,
        publish: Publish,
        *,
        device_id: str,
        telemetry_topic: str,
        max_items: int = 64,
        max_bytes: int = 192 * 1024,
        ack_timeout: float = 10.0,
        ack_timeout_max: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        coalesce_seconds: float = 0.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """``ack_timeout_max``: the longest wait for an ack after consecutive resends (None:
        ``ack_timeout``, no backoff); ``rand``: uniform draws in ``[0, 1)`` for the jitter."""
        self._outbox = outbox
        self._publish = publish
        self._device_id = device_id
        self._telemetry_topic = telemetry_topic
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._ack_timeout = ack_timeout
        self._ack_timeout_max = ack_timeout if ack_timeout_max is None else ack_timeout_max
        self._rand = rand
        self._timeouts = 0  # resends since the last ack that made progress
        self._wait = ack_timeout  # how long the batch in flight is given for its ack
        self._clock = clock
        self._coalesce = CoalescePolicy(max_delay=coalesce_seconds, max_bytes=max_bytes // 2)
        self._held_since: float | None = None  # when the pending batch was first held back
        self._held_key: tuple[int | None, int] | None = None  # the outbox's seqs at the hold
        self._lock = threading.Lock()
        self._in_flight: int | None = None  # highest seq of the batch awaiting its ack
        self._sent_max = 0  # highest seq ever published: an entry at or below it is a resend
        self._sent_at = 0.0
        self._packed = False  # the latest ack said the server reads the packed encoding
        self._stats: dict[str, int] = dict.fromkeys(UplinkStats.__dataclass_fields__, 0)
        try:
            self._drops_seen = _drop_totals(outbox)  # drops already counted when we started
        except OutboxError:
            self._drops_seen = {}
        self._drop_notice: int | None = None  # seq of the telemetry_dropped event not yet acked

    # ------------------------------------------------------------------ entering the outbox
    def add_report(self, report: TelemetryReport) -> int:
        """Store a report (its ``seq`` is replaced by the outbox's); return the seq.

        Then, if the outbox dropped entries since the last report, store one
        ``telemetry_dropped`` event counting them.

        Raises:
            OutboxError: the outbox could not store it (disk full, I/O error).
        """
        seq = self._store(report.to_dict(), "report", "report")
        try:
            self._note_drops(report.window_end)
        except OutboxError as exc:  # the report is stored; the notice is best effort
            log.warning("telemetry_dropped notice not recorded: %s", exc)
        return seq

    def add_event(self, event: Event) -> Event:
        """Store an event (it leaves in an acknowledged batch) and return it with its seq.

        Raises:
            OutboxError: the outbox could not store it.
        """
        seq = self._store(event.to_dict(), "event", "event")
        return Event.from_dict({**event.to_dict(), "seq": seq})

    def _note_drops(self, at: float) -> None:
        with self._lock:
            if self._drop_notice is not None:
                return  # one notice waits for its ack: it must not crowd reports out while offline
        dropped = _drop_totals(self._outbox)
        new = {kind: n - self._drops_seen.get(kind, 0) for kind, n in dropped.items()}
        new = {kind: n for kind, n in new.items() if n > 0}
        if not new:
            return
        counts = ", ".join(f"{n} {kind}(s)" for kind, n in sorted(new.items(), reverse=True))
        detail = f"outbox full: {counts} dropped since the last notice"
        event = Event(self._device_id, 0, "telemetry_dropped", max(at, 0.0), detail=detail)
        seq = self._store(event.to_dict(), "event", "event")
        with self._lock:
            self._drops_seen = dropped
            self._drop_notice = seq

    def _store(self, item: dict[str, Any], kind: str, priority: Priority) -> int:
        item["seq"] = 0
        payload = json.dumps(item, sort_keys=True, separators=(",", ":")).encode()
        return self._outbox.append(kind, payload, priority)

    # ------------------------------------------------------------------ sending
    def pump(self) -> bool:
        """Send the next batch if none is in flight (or the one in flight timed out).

        Returns:
            True when a batch was published.
        """
        with self._lock:
            now = self._clock()
            resend = self._in_flight is not None
            if resend and now - self._sent_at < self._wait:
                return False
            # Held and nothing appended or removed since (oldest and next seq unchanged): still
            # held, without reading and decoding the batch again (the loop pumps 5 times a second).
            key = None if resend or not self._coalesce.max_delay else self._outbox_key()
            if (
                key is not None
                and key == self._held_key
                and self._held_since is not None
                and now - self._held_since < self._coalesce.max_delay
            ):
                return False
            try:
                entries = self._outbox.pending(self._max_items, self._max_bytes)
            except OutboxError as exc:
                log.error("outbox unreadable: %s", exc)
                return False
            items: list[TelemetryReport | Event] = []
            head: int | None = None  # last seq of the leading run of entries never sendable
            for e in entries:
                item = self._decode(e.seq, e.payload)
                if item is not None:
                    items.append(item)
                elif not items:
                    head = e.seq
            if head is not None:
                # Entries that can never be sent must not jam the outbox: delete them here;
                # the next batch's floor tells the server they are gone (it counts them lost).
                try:
                    self._stats["unsendable_dropped"] += self._outbox.ack(head)
                except OutboxError as exc:
                    log.error("cannot drop unsendable outbox entries: %s", exc)
            if not items:
                self._in_flight = None
                self._held_since = None
                return False
            size = sum(len(e.payload) for e in entries)
            # A batch whose oldest entry went out before (then a reconnect or a partial ack
            # cleared the in-flight mark) is a resend too: never held again.
            first_send = not resend and items[0].seq > self._sent_max
            if first_send and self._coalesce.hold(items, size, self._held_since, now):
                if self._held_since is None:
                    self._held_since = now
                    self._stats["batches_held"] += 1
                self._held_key = key  # read before the batch: an entry added since differs
                return False
            # The floor is the first item sent: entries before it (unreadable ones) are gone.
            batch = Batch(self._device_id, tuple(items), floor=items[0].seq)
            body = batch.to_bytes()
            if resend:
                self._packed = False  # perhaps a server that cannot read it: JSON until told
            packed = self._packed
            if packed:
                try:
                    body = pack_message(body)
                except ContractError as exc:  # our own canonical JSON: a bug, send it as JSON
                    log.error("telemetry batch not packed, sent as JSON: %s", exc)
                    packed = False
            try:
                self._publish(self._telemetry_topic, body)
            except TransportError as exc:
                self._stats["publish_failures"] += 1
                log.debug("telemetry batch not sent: %s", exc)
                return False
            self._stats["packed_sent"] += int(packed)
            self._stats["resends" if resend else "batches_sent"] += 1
            if resend:
                self._timeouts += 1
            self._wait = ack_wait(
                self._timeouts, self._ack_timeout, self._ack_timeout_max, self._rand()
            )
            self._in_flight = items[-1].seq
            self._sent_max = max(self._sent_max, items[-1].seq)
            self._sent_at = now
            self._held_since = None
            return True

    def _outbox_key(self) -> tuple[int | None, int] | None:
        """The outbox's oldest and next ``seq`` (None if unreadable): unchanged, so are its
        entries."""
        try:
            st = self._outbox.stats()
        except OutboxError:
            return None
        return (st.oldest_seq, st.next_seq)

    def _decode(self, seq: int, payload: bytes) -> TelemetryReport | Event | None:
        """The stored entry as a wire item with its seq, or None (counted) if never sendable."""
        if len(payload) > MAX_ITEM_BYTES:
            self._stats["oversized_entries"] += 1
            log.error("outbox entry %d has %d bytes, more than a message takes", seq, len(payload))
            return None
        try:
            # The strict reader: a damaged entry must be skipped, never stop every later pump.
            stored = strict_loads(payload, max_bytes=MAX_ITEM_BYTES, what="outbox entry")
            if not isinstance(stored, dict):
                raise ContractError("outbox entry is not a JSON object")
            d = {**stored, "seq": seq}
            return TelemetryReport.from_dict(d) if d.get("type") == "report" else Event.from_dict(d)
        except ContractError as exc:
            self._stats["unreadable_entries"] += 1
            log.error("outbox entry %d is unreadable, skipped: %s", seq, exc)
            return None

    def on_ack(self, data: bytes) -> None:
        """Handle a ``TelemetryAck``: delete what it covers, then send the next batch."""
        try:
            ack = TelemetryAck.from_bytes(data)
            if ack.device_id != self._device_id:
                raise ContractError(f"ack addressed to {ack.device_id!r}")
            with self._lock:
                deleted = self._outbox.ack(ack.upto_seq)
                if self._drop_notice is not None and ack.upto_seq >= self._drop_notice:
                    self._drop_notice = None
                self._stats["acks"] += 1
                self._packed = PACKED_ENCODING in ack.accepts
                self._stats["acked_entries"] += deleted
                if deleted or (self._in_flight is not None and ack.upto_seq >= self._in_flight):
                    # Progress: send what is left (a partial ack means the server lacks the
                    # rest of the batch; it deduplicates whatever it already has). The server
                    # answers again: the ack-timeout backoff starts over.
                    self._in_flight = None
                    self._timeouts = 0
        except (ContractError, AckOutOfRangeError) as exc:
            with self._lock:
                self._stats["bad_acks"] += 1
            log.warning("telemetry ack refused: %s", exc)
            return
        except OutboxError as exc:
            log.error("outbox ack failed: %s", exc)
            return
        self.pump()

    def reset_in_flight(self) -> None:
        """Forget the batch in flight (after a reconnect: send again at once)."""
        with self._lock:
            self._in_flight = None
            self._packed = False

    def stats(self) -> UplinkStats:
        """A snapshot of the counters."""
        with self._lock:
            return UplinkStats(**self._stats)


def _drop_totals(outbox: Outbox) -> dict[str, int]:
    """Entries the outbox ever dropped, by kind (``report``, ``event``).

    Raises:
        OutboxError: the read failed.
    """
    totals: dict[str, int] = {}
    for (_priority, kind), count in outbox.dropped().items():
        totals[kind] = totals.get(kind, 0) + count.entries
    return totals
