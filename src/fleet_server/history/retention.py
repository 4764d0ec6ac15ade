"""Retention of raw telemetry: PostgreSQL partitions, batched deletes and pruned dedupe keys.

Owns: the storage side of retention that the history job (``fleet_server.jobs.history``) calls
with a cut it has already bounded by the fold (``min(now - retention, folded_until)``):

- ``ensure_partitions``: on PostgreSQL, the daily partitions ``telemetry_pYYYYMMDD`` of today
  and the next days, created ahead so ingest lands in them. A row whose day has no partition
  lands in ``telemetry_default`` (never fails); creating a day's partition later moves that
  day's rows out of the default partition first, unless there are more than ``MAX_MOVE`` of
  them (the move holds inserts into the default partition, that day's ingest, until commit):
  then the day stays in the default partition and its rows go by batched deletes.
- ``drop_partitions``: on PostgreSQL, ``DROP TABLE`` of every daily partition that ends at or
  before the cut (every row in it is older than the cut, so folded). A partition that still
  holds a row newer than the cut waits for its whole day: raw rows live up to one day longer
  than ``raw_days`` on PostgreSQL.
- ``delete_raw_batch``: one short transaction deleting at most ``batch`` rows older than the
  cut: the whole table on SQLite, only ``telemetry_default`` on PostgreSQL.
- ``prune_keys_batch``: deletes dedupe keys (``telemetry_keys``) older than the cut that can no
  longer deduplicate anything new: of an older epoch, or at or below the device's
  ``acked_upto``; and raises the device's ``pruned_upto`` past them (ingest refuses any seq at
  or below it as a duplicate), so exactly-once holds after the key is gone.

Does not own: the cut and the fold (``fleet_server.jobs.history``), ingest and its dedupe
(``fleet_server.registry._ingest``), the schema (``registry.tables.core``, migration ``0006``).

Locks on PostgreSQL: creating a partition is ``CREATE TABLE ... (LIKE telemetry)`` then
``ATTACH PARTITION`` (SHARE UPDATE EXCLUSIVE on ``telemetry``, which inserts do not wait for),
with the default partition locked against inserts while its rows of that day move; attaching
also adds the foreign key to ``devices`` on the new (empty) table, a SHARE ROW EXCLUSIVE lock on
``devices`` that ingest's ``last_seen`` update waits for until commit (milliseconds: the table
is empty). Dropping a partition takes ACCESS EXCLUSIVE on ``telemetry`` for a catalog change.
Both ask with ``lock_timeout`` (``LOCK_TIMEOUT``), so they never queue behind a long read with
ingest queued behind them: on a timeout the partition is left for the next run.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, cast

from sqlalchemy import Connection, Table, and_, bindparam, delete, or_, select, text, update
from sqlalchemy.orm import Session

from fleet_server.errors import RegistryUnavailableError
from fleet_server.registry.store import Registry
from fleet_server.registry.tables.core import Device, DeviceSeq, TelemetryKey, TelemetryRow

__all__ = [
    "DAY",
    "LOCK_TIMEOUT",
    "MAX_MOVE",
    "Partition",
    "delete_raw_batch",
    "drop_partitions",
    "ensure_partitions",
    "is_partitioned",
    "partitions",
    "prune_keys_batch",
]

log = logging.getLogger(__name__)

DAY: Final = timedelta(days=1)
LOCK_TIMEOUT: Final = "5s"
MAX_MOVE: Final = 10_000  # rows of a day moved out of the default partition at most
_CHUNK: Final = 500
_BOUND: Final = re.compile(r"FROM \('([^']+)'\) TO \('([^']+)'\)")
_DAILY: Final = re.compile(r"telemetry_p\d{8}")
_PARTITION_LOCK: Final = 0x65646770  # pg advisory lock key ("edgp") serialising creation
_KEYS: Final = cast(Table, TelemetryKey.__table__)
_SEQ: Final = cast(Table, DeviceSeq.__table__)


@dataclass(frozen=True, order=True)
class Partition:
    """One range partition of ``telemetry``: rows with ``start <= received_at < end``."""

    start: datetime
    end: datetime
    name: str


def _day(t: datetime) -> datetime:
    u = t.astimezone(UTC)
    return datetime(u.year, u.month, u.day, tzinfo=UTC)


def _name(day: datetime) -> str:
    return f"telemetry_p{day:%Y%m%d}"


def is_partitioned(registry: Registry) -> bool:
    """True when ``telemetry`` is a partitioned table (PostgreSQL at revision 0006 or later).

    Raises:
        RegistryUnavailableError: the database failed.
    """
    if registry.engine.dialect.name != "postgresql":
        return False
    with registry.read_session("reading the telemetry table's kind") as s:
        kind = s.scalar(text("SELECT relkind FROM pg_class WHERE oid = to_regclass('telemetry')"))
    return str(kind) == "p"


def partitions(registry: Registry) -> list[Partition]:
    """The daily range partitions of ``telemetry``, oldest first (not the default one).

    Raises:
        RegistryUnavailableError: the database failed.
    """
    with registry.read_session("listing telemetry partitions") as s:
        return _partitions(s)


def _partitions(s: Session) -> list[Partition]:
    s.execute(text("SET LOCAL TimeZone = 'UTC'"))  # bounds printed in UTC
    rows = s.execute(
        text(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = to_regclass('telemetry')"
        )
    ).all()
    out = []
    for name, bound in rows:
        found = _BOUND.search(str(bound))
        if found is None or not _DAILY.fullmatch(str(name)):
            continue  # the default partition, or one this module did not make
        start, end = (datetime.fromisoformat(g).astimezone(UTC) for g in found.groups())
        out.append(Partition(start, end, str(name)))
    return sorted(out)


def ensure_partitions(registry: Registry, now: datetime, ahead_days: int) -> int:
    """Create the daily partitions of ``now``'s day and the ``ahead_days`` after it.

    Returns:
        How many partitions were created (0 on SQLite and when all exist).

    Raises:
        RegistryUnavailableError: the database failed (partitions made before stay).
    """
    if not is_partitioned(registry):
        return 0
    have = {p.start for p in partitions(registry)}
    created = 0
    for i in range(ahead_days + 1):
        day = _day(now) + i * DAY
        if day in have:
            continue
        try:
            with registry.write_session("creating a telemetry partition") as s:
                made = _create_partition(s.connection(), day)
            created += int(made)
        except RegistryUnavailableError as exc:
            if not _lock_timeout(exc):
                raise
            log.warning("telemetry partition %s not created (lock timeout); next run", _name(day))
    return created


def _create_partition(conn: Connection, day: datetime) -> bool:
    """Make ``day``'s partition, moving its rows out of the default partition first.

    Returns:
        False when it exists already or too many of the day's rows are in the default one.
    """
    name, start, end = _name(day), day.isoformat(), (day + DAY).isoformat()
    conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
    # Two workers making the same partition: the second waits here, then finds it made.
    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PARTITION_LOCK})
    exists = conn.scalar(text("SELECT to_regclass(:n) IS NOT NULL"), {"n": name})
    if exists:  # another worker made it since we listed
        return False
    waiting = conn.scalar(
        text(
            "SELECT count(*) FROM (SELECT 1 FROM telemetry_default WHERE received_at >= :a "
            "AND received_at < :b LIMIT :m) AS t"
        ),
        {"a": day, "b": day + DAY, "m": MAX_MOVE + 1},
    )
    if int(waiting or 0) > MAX_MOVE:
        log.warning("telemetry of %s stays in the default partition (over %d rows)", name, MAX_MOVE)
        return False
    # Inserts routed to the default partition wait from here to commit (nothing else does).
    conn.execute(text("LOCK TABLE telemetry_default IN SHARE ROW EXCLUSIVE MODE"))
    conn.execute(text(f"CREATE TABLE {name} (LIKE telemetry INCLUDING DEFAULTS)"))
    take = "DELETE FROM telemetry_default WHERE received_at >= :a AND received_at < :b"
    move = f"WITH moved AS ({take} RETURNING *) INSERT INTO {name} SELECT * FROM moved"  # noqa: S608
    moved = conn.execute(text(move), {"a": day, "b": day + DAY})
    bounds = f"FOR VALUES FROM ('{start}') TO ('{end}')"
    conn.execute(text(f"ALTER TABLE telemetry ATTACH PARTITION {name} {bounds}"))
    count = int(moved.rowcount)
    log.info("created telemetry partition %s (%d rows moved from the default one)", name, count)
    return True


def drop_partitions(registry: Registry, cut: datetime) -> int:
    """Drop every daily partition whose end is at or before ``cut`` (oldest first).

    Returns:
        How many were dropped (a partition whose lock timed out is left for the next run).

    Raises:
        RegistryUnavailableError: the database failed.
    """
    if not is_partitioned(registry):
        return 0
    dropped = 0
    for p in partitions(registry):
        if p.end > cut:
            break
        try:
            with registry.write_session("dropping a telemetry partition") as s:
                s.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
                s.execute(text(f"DROP TABLE IF EXISTS {p.name}"))
            dropped += 1
            log.info("dropped telemetry partition %s (before %s)", p.name, cut.isoformat())
        except RegistryUnavailableError as exc:
            if not _lock_timeout(exc):
                raise
            log.warning("telemetry partition %s not dropped (lock timeout); next run", p.name)
            break
    return dropped


def delete_raw_batch(registry: Registry, cut: datetime, batch: int) -> int:
    """Delete at most ``batch`` raw rows received before ``cut``, in one short transaction.

    SQLite: from ``telemetry``. PostgreSQL: from ``telemetry_default`` only (the daily
    partitions go whole, ``drop_partitions``).

    Raises:
        RegistryUnavailableError: the database failed.
    """
    if is_partitioned(registry):
        with registry.write_session("deleting old telemetry") as s:
            res = s.execute(
                text(
                    "DELETE FROM telemetry_default WHERE id IN (SELECT id FROM telemetry_default"
                    " WHERE received_at < :cut ORDER BY received_at LIMIT :n)"
                ),
                {"cut": cut, "n": batch},
            )
            return int(res.rowcount)  # type: ignore[attr-defined]
    ids = (
        select(TelemetryRow.id)
        .where(TelemetryRow.received_at < cut)
        .order_by(TelemetryRow.received_at)
        .limit(batch)
    )
    with registry.write_session("deleting old telemetry") as s:
        found = list(s.scalars(ids))
        if found:
            s.execute(delete(TelemetryRow).where(TelemetryRow.id.in_(found)))
        return len(found)


def prune_keys_batch(registry: Registry, cut: datetime, batch: int) -> int:
    """Delete at most ``batch`` dedupe keys received before ``cut`` that are safe to forget.

    A key is safe to forget when it is of an epoch older than the device's (ingest stamps
    every entry with the current epoch, so it is never looked up again) or at or below the
    device's ``acked_upto``; the device's ``pruned_upto`` then rises to the highest pruned seq
    of its current epoch, and ingest counts any entry at or below it as a duplicate. The
    devices' ``device_seq`` rows are locked first, in id order, as ingest locks them.

    Returns:
        The keys selected (prunable keys in the same per-device seq ranges go with them and
        are not counted).

    Raises:
        RegistryUnavailableError: the database failed.
    """
    k, seq, dev = TelemetryKey, DeviceSeq, Device
    prunable = and_(
        k.received_at < cut,
        or_(k.epoch < dev.epoch, and_(seq.acked_upto.is_not(None), k.seq <= seq.acked_upto)),
    )
    found = (
        select(k.device_id, k.epoch, k.seq, dev.epoch)
        .join(dev, dev.id == k.device_id)
        .outerjoin(seq, seq.device_id == k.device_id)
        .where(prunable)
        .order_by(k.received_at)
        .limit(batch)
    )
    with registry.write_session("pruning telemetry keys") as s:
        devices = sorted({str(r[0]) for r in s.execute(found)})
        if not devices:
            return 0
        for part in _chunks(devices, _CHUNK):
            s.execute(
                select(seq.device_id)
                .where(seq.device_id.in_(part))
                .order_by(seq.device_id)
                .with_for_update()
            ).all()
        # Under the locks (acked_upto and the epoch only grow), read the batch again.
        rows = s.execute(found.where(k.device_id.in_(devices))).all()
        # Per (device, epoch), the seq range of its selected keys: every key in that range
        # that is older than the cut is prunable too (at or below the highest selected seq,
        # so at or below acked_upto in the current epoch), so ranges are deleted whole, one
        # index range scan each.
        ranges: dict[tuple[str, int], tuple[int, int]] = {}
        marks: dict[str, int] = {}
        for d, epoch, number, current in rows:
            key, q = (str(d), int(epoch)), int(number)
            lo, hi = ranges.get(key, (q, q))
            ranges[key] = (min(lo, q), max(hi, q))
            if epoch == current:
                marks[str(d)] = max(marks.get(str(d), 0), q)
        conn = s.connection()
        conn.execute(
            delete(_KEYS).where(
                _KEYS.c.device_id == bindparam("b_device"),
                _KEYS.c.epoch == bindparam("b_epoch"),
                _KEYS.c.seq >= bindparam("b_lo"),
                _KEYS.c.seq <= bindparam("b_hi"),
                _KEYS.c.received_at < cut,
            ),
            [
                {"b_device": d, "b_epoch": e, "b_lo": lo, "b_hi": hi}
                for (d, e), (lo, hi) in sorted(ranges.items())
            ],
        )
        if marks:
            conn.execute(
                update(_SEQ)
                .where(
                    _SEQ.c.device_id == bindparam("b_device"),
                    _SEQ.c.pruned_upto < bindparam("b_mark"),
                )
                .values(pruned_upto=bindparam("b_mark")),
                [{"b_device": d, "b_mark": m} for d, m in sorted(marks.items())],
            )
        return len(rows)


def _lock_timeout(exc: RegistryUnavailableError) -> bool:
    """True when the database error behind ``exc`` is PostgreSQL's lock_timeout (55P03)."""
    orig: Any = getattr(exc.__cause__, "orig", None)
    return getattr(orig, "sqlstate", None) == "55P03"


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
