"""The device's on-disk telemetry outbox: what waits here survives crashes until the server acks it.

Owns: one SQLite database (WAL) per device holding telemetry entries in ``seq`` order, the
per-device sequence counter, the byte bound with priority dropping, and the persistent drop
counters that the next report quotes so no loss is ever silent. Does not own: serialising
reports, MQTT publishing or the wire format of a batch (the telemetry sender does that).

Durability choice: ``PRAGMA synchronous=FULL``. In WAL mode ``NORMAL`` survives a process crash
but may roll back the last commits on power loss. The sender publishes an entry as soon as
``append`` returns; if that commit were then lost, the same ``seq`` would be assigned again to
different content and the server, which deduplicates by ``(device, seq)``, would silently discard
the new entry. ``FULL`` costs one fsync of the WAL per append, which is negligible at telemetry
rates (a report per window, a few events).

Sequence numbers are never reused, not even after the database is lost: blocks of ``seq`` values
are reserved in a sidecar file (``<db>.seq``, written atomically through ``durable``) before they
are handed out, and a fresh database starts after the reservation.

Sequence gaps the server will see, and how it tells them apart from messages in flight: entries
dropped for space and entries lost with a corrupt database leave holes in ``seq``. ``pending``
always starts at the oldest entry still held, so a batch that carries ``stats().oldest_seq`` as its
floor tells the server that every lower ``seq`` it lacks is gone for good, and holes between
entries of one batch are drops too.

Corruption recovery: opening a damaged file raises ``OutboxCorruptError``; the caller then uses
``Outbox.recover``, which moves the database (and its ``-wal``/``-shm``) aside as
``<db>.corrupt-<unix time>``, starts a fresh outbox whose ``seq`` continues after the reservation,
and counts one drop of kind ``outbox_corrupt`` (bytes = size of the quarantined file, since the
number of entries it held is unknowable).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, get_args

from edge_agent.common import durable
from edge_agent.errors import (
    AckOutOfRangeError,
    OutboxCorruptError,
    OutboxError,
    PayloadTooLargeError,
)
from edge_agent.sync.outbox_sqlite import SqliteGuard, Transaction, wrap_sqlite_error

Priority = Literal["event", "report"]
PRIORITIES: tuple[Priority, ...] = get_args(Priority)
CORRUPT_KIND = "outbox_corrupt"
SCHEMA_VERSION = 1
SEQ_BLOCK = 4096  # seq values reserved per sidecar write (one fsync+rename per block)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY, priority TEXT NOT NULL, kind TEXT NOT NULL,
    created REAL NOT NULL, size INTEGER NOT NULL, payload BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS entries_by_priority ON entries (priority, seq);
CREATE TABLE IF NOT EXISTS drops (
    priority TEXT NOT NULL, kind TEXT NOT NULL, entries INTEGER NOT NULL, bytes INTEGER NOT NULL,
    PRIMARY KEY (priority, kind));
"""


@dataclass(frozen=True, slots=True)
class Entry:
    """One telemetry entry waiting for the server's acknowledgement."""

    seq: int
    priority: Priority
    kind: str
    payload: bytes
    created: float


@dataclass(frozen=True, slots=True)
class DropCount:
    """Cumulative entries and payload bytes dropped for one (priority, kind); never reset."""

    entries: int
    bytes: int


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """A snapshot of the outbox.

    ``oldest_seq`` is the floor a batch carries (``None`` when empty); ``oldest_age`` is seconds
    since the oldest held entry was created, by the outbox's clock.
    """

    entries: int
    bytes: int
    oldest_age: float | None
    oldest_seq: int | None
    next_seq: int
    acked_upto: int
    dropped: dict[tuple[str, str], DropCount]


class Outbox:
    """A byte-bounded, crash-safe FIFO of telemetry entries with per-device ``seq`` numbers.

    Thread-safe: one SQLite connection guarded by a lock. ``max_bytes`` bounds the sum of payload
    sizes, not the file size (SQLite pages and the WAL add overhead). ``clock`` returns wall-clock
    seconds (``time.time``): creation times must stay meaningful across reboots.
    """

    def __init__(self, path: Path, max_bytes: int, clock: Callable[[], float] = time.time) -> None:
        """Open (or create) the outbox at ``path``.

        Raises:
            OutboxCorruptError: the file is not a usable SQLite database.
            OutboxError: ``max_bytes`` is not positive, WAL mode is unavailable, the schema
                version is unknown, or an I/O error occurred.
        """
        if max_bytes <= 0:
            raise OutboxError(f"max_bytes must be positive, got {max_bytes}")
        self._path = Path(path)
        self._seq_file = self._path.with_name(self._path.name + ".seq")
        self._max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(
                self._path, timeout=10.0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise wrap_sqlite_error(exc, self._path) from exc
        try:
            self._reserved = self._open()
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def recover(cls, path: Path, max_bytes: int, clock: Callable[[], float] = time.time) -> Outbox:
        """Quarantine a corrupt database and start a fresh outbox, counting the loss.

        Raises:
            OutboxError: moving the file aside or creating the new database failed.
        """
        path = Path(path)
        stamp = int(clock())
        lost_bytes = 0
        for suffix in ("", "-wal", "-shm"):
            src = path.with_name(path.name + suffix)
            if src.exists():
                lost_bytes += src.stat().st_size if suffix != "-shm" else 0
                src.replace(path.with_name(f"{path.name}.corrupt-{stamp}{suffix}"))
        durable.fsync_dir(path.parent)
        outbox = cls(path, max_bytes, clock)
        with outbox._lock, outbox._txn():
            outbox._count_drop("event", CORRUPT_KIND, 1, lost_bytes)
        return outbox

    def append(self, kind: str, payload: bytes, priority: Priority = "report") -> int:
        """Store one entry durably and return its ``seq``.

        When the payload does not fit, the oldest reports are dropped first (the new entry
        included, if it is a report and only events are older), then the oldest events. Every
        drop is counted in ``dropped()``.

        Raises:
            PayloadTooLargeError: ``len(payload) > max_bytes``.
            OutboxError: unknown priority, or the write failed (disk full, I/O error).
            OutboxCorruptError: the database turned out to be damaged.
        """
        if priority not in PRIORITIES:
            raise OutboxError(f"unknown priority {priority!r}; expected one of {PRIORITIES}")
        size = len(payload)
        if size > self._max_bytes:
            raise PayloadTooLargeError(
                f"payload of {size} bytes exceeds the outbox bound of {self._max_bytes} bytes"
            )
        with self._lock, self._txn():
            seq = self._meta("next_seq")
            if seq > self._reserved:
                self._reserve(seq + SEQ_BLOCK - 1)
            self._db.execute(
                "INSERT INTO entries (seq, priority, kind, created, size, payload)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (seq, priority, kind, float(self._clock()), size, payload),
            )
            self._set_meta("next_seq", seq + 1)
            total = self._meta("total_bytes") + size
            for victim_priority in ("report", "event"):
                total = self._evict(victim_priority, total)
            self._set_meta("total_bytes", total)
        return seq

    def pending(self, limit: int = 100, max_batch_bytes: int | None = None) -> list[Entry]:
        """Return the oldest entries in ``seq`` order, for one batch.

        At most ``limit`` entries whose payloads sum to at most ``max_batch_bytes``; the first
        entry is returned even if it alone exceeds ``max_batch_bytes``, so the outbox never jams.

        Raises:
            OutboxError: ``limit`` < 1 or a read failed.
            OutboxCorruptError: the database turned out to be damaged.
        """
        if limit < 1:
            raise OutboxError(f"limit must be >= 1, got {limit}")
        out: list[Entry] = []
        used = 0
        with self._lock, self._guard():
            rows = self._db.execute(
                "SELECT seq, priority, kind, payload, created FROM entries ORDER BY seq LIMIT ?",
                (limit,),
            )
            for seq, priority, kind, payload, created in rows:
                if out and max_batch_bytes is not None and used + len(payload) > max_batch_bytes:
                    break
                used += len(payload)
                out.append(Entry(seq, priority, kind, bytes(payload), created))
        return out

    def ack(self, upto_seq: int) -> int:
        """Delete every entry with ``seq <= upto_seq``; return how many were deleted.

        Idempotent: an ack at or below the previous one deletes nothing.

        Raises:
            AckOutOfRangeError: ``upto_seq`` was never assigned by this outbox.
            OutboxError: the write failed.
            OutboxCorruptError: the database turned out to be damaged.
        """
        with self._lock, self._txn():
            next_seq = self._meta("next_seq")
            if upto_seq >= next_seq:
                raise AckOutOfRangeError(
                    f"ack of seq {upto_seq} but the highest assigned seq is {next_seq - 1}"
                )
            if upto_seq <= self._meta("acked_upto"):
                return 0
            count, freed = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries WHERE seq <= ?", (upto_seq,)
            ).fetchone()
            self._db.execute("DELETE FROM entries WHERE seq <= ?", (upto_seq,))
            self._set_meta("acked_upto", upto_seq)
            self._set_meta("total_bytes", self._meta("total_bytes") - freed)
        return int(count)

    def dropped(self) -> dict[tuple[str, str], DropCount]:
        """Cumulative drops by ``(priority, kind)`` since the outbox was created.

        Raises:
            OutboxError: the read failed.
            OutboxCorruptError: the database turned out to be damaged.
        """
        with self._lock, self._guard():
            return self._dropped()

    def stats(self) -> OutboxStats:
        """A consistent snapshot of size, age, sequence position and drops.

        Raises:
            OutboxError: the read failed.
            OutboxCorruptError: the database turned out to be damaged.
        """
        with self._lock, self._txn():
            count, total, oldest_seq, oldest_created = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(seq),"
                " (SELECT created FROM entries ORDER BY seq LIMIT 1) FROM entries"
            ).fetchone()
            age = None if oldest_created is None else max(0.0, self._clock() - oldest_created)
            return OutboxStats(
                entries=int(count),
                bytes=int(total),
                oldest_age=age,
                oldest_seq=oldest_seq,
                next_seq=self._meta("next_seq"),
                acked_upto=self._meta("acked_upto"),
                dropped=self._dropped(),
            )

    def close(self) -> None:
        """Close the database connection (committed data is already durable)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals (callers hold self._lock) --------------------------------------------------

    def _open(self) -> int:
        with self._guard():
            check = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise OutboxCorruptError(f"{self._path}: integrity check failed: {check}")
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise OutboxError(f"{self._path}: WAL journal mode unavailable (got {mode})")
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise OutboxError(f"{self._path}: unknown outbox schema version {version}")
        reserved = self._read_reservation()
        with self._txn():
            # Statement by statement: executescript() would commit the open transaction.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._db.executemany(
                "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                [("next_seq", reserved + 1), ("acked_upto", 0), ("total_bytes", 0)],
            )
            return max(reserved, self._meta("next_seq") - 1)

    def _read_reservation(self) -> int:
        try:
            return int(self._seq_file.read_text(encoding="ascii").strip())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            raise OutboxError(f"{self._seq_file}: unreadable seq reservation: {exc}") from exc

    def _reserve(self, upto: int) -> None:
        try:
            durable.write_atomic(self._seq_file, f"{upto}\n".encode("ascii"))
        except OSError as exc:
            raise OutboxError(f"{self._seq_file}: cannot reserve seq values: {exc}") from exc
        self._reserved = upto

    def _evict(self, priority: Priority, total: int) -> int:
        while total > self._max_bytes:
            row = self._db.execute(
                "SELECT seq, kind, size FROM entries WHERE priority = ? ORDER BY seq LIMIT 1",
                (priority,),
            ).fetchone()
            if row is None:
                break
            seq, kind, size = row
            self._db.execute("DELETE FROM entries WHERE seq = ?", (seq,))
            self._count_drop(priority, kind, 1, size)
            total -= size
        return total

    def _count_drop(self, priority: str, kind: str, entries: int, nbytes: int) -> None:
        self._db.execute(
            "INSERT INTO drops (priority, kind, entries, bytes) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (priority, kind) DO UPDATE SET"
            " entries = entries + excluded.entries, bytes = bytes + excluded.bytes",
            (priority, kind, entries, nbytes),
        )

    def _dropped(self) -> dict[tuple[str, str], DropCount]:
        rows = self._db.execute("SELECT priority, kind, entries, bytes FROM drops ORDER BY 1, 2")
        return {(p, k): DropCount(int(n), int(b)) for p, k, n, b in rows}

    def _meta(self, key: str) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))

    def _guard(self) -> SqliteGuard:
        return SqliteGuard(self._path)

    def _txn(self) -> Transaction:
        return Transaction(self._db, self._path)
