"""Telemetry ingest statements: the per-device path behind ``Registry.ingest`` and the set-wise
path behind ``Registry.ingest_many``.

Owns: the SQL of one ingest inside an already open write transaction (creating and locking
the ``device_seq`` row, deduplicating entries by their keys, storing the new ones, advancing
``acked_upto``, counting gaps, losses, recoveries and duplicates) and the set-wise variant that
does the same for a whole batch of items with a fixed number of statements. The
acknowledgement rule and the locking scheme are described in ``store``. Does not own: sessions,
transactions or error mapping (``store.Registry``), nor the entry checks themselves
(``_checks``), nor pruning keys (``fleet_server.history.retention``).

Deduplication, the same on both backends: an entry whose ``seq`` is at or below the device's
``pruned_upto`` is a duplicate (retention pruned keys only up to there, and only at or below
``acked_upto``); every other entry's ``(device_id, epoch, seq)`` goes into ``telemetry_keys``
with ``INSERT ... ON CONFLICT DO NOTHING RETURNING``, and only the entries whose key came back
are inserted into ``telemetry``, in the same transaction, under the ``device_seq`` row lock.
``telemetry`` itself has no unique key (on PostgreSQL it is partitioned by ``received_at``, and
a unique key there would have to include it: a redelivery received on another day would not
conflict). The seq scans of the acknowledgement rule read ``telemetry_keys`` too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any, Final, cast

from sqlalchemy import (
    Connection,
    Table,
    and_,
    bindparam,
    func,
    insert,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from edge_agent.wire.telemetry import Event, TelemetryReport
from fleet_server.errors import (
    DeviceRevokedError,
    RegistryError,
    RegistryUnavailableError,
    TelemetryRejectedError,
    UnknownDeviceError,
)
from fleet_server.registry._checks import checked_rows
from fleet_server.registry.tables.core import Device, DeviceSeq, TelemetryKey, TelemetryRow
from fleet_server.registry.values import IngestResult, TelemetryEntry

__all__ = ["check_batches", "ingest_one", "ingest_set"]

_INSERT_CHUNK: Final = 500  # rows per INSERT statement (5 params each; far below SQLite's cap)
_SCAN_CHUNK: Final = 1000
_IN_CHUNK: Final = 500  # ids per IN (...) list

_DEVICES: Final = cast(Table, Device.__table__)
_SEQ: Final = cast(Table, DeviceSeq.__table__)
_TELEMETRY: Final = cast(Table, TelemetryRow.__table__)
_KEYS: Final = cast(Table, TelemetryKey.__table__)


def check_batches(
    batches: Sequence[tuple[str, Sequence[TelemetryReport | Event | TelemetryEntry], int | None]],
) -> list[list[dict[str, Any]] | RegistryError]:
    """Per item of an ``ingest_many`` call: its checked rows, or the rejection (never raises)."""
    checked: list[list[dict[str, Any]] | RegistryError] = []
    for device_id, entries, floor in batches:
        try:
            checked.append(checked_rows(device_id, entries, floor))
        except TelemetryRejectedError as exc:
            checked.append(exc)
    return checked


def ingest_set(
    conn: Connection,
    dialect: str,
    batches: Sequence[tuple[str, Sequence[Any], int | None]],
    checked: list[list[dict[str, Any]] | RegistryError],
    now: datetime,
) -> list[IngestResult | RegistryError]:
    """``ingest_many``'s body, set-wise: a fixed number of statements per batch.

    Statements: the batch's devices (one select), their ``device_seq`` rows (one upsert,
    one locking select, in id order so concurrent workers lock in the same order), the
    entries' keys (one ``INSERT ... ON CONFLICT DO NOTHING RETURNING``) and the new entries
    (one insert), every stored seq above each device's ``acked_upto`` (one select of keys) and
    the new counters (one ``UPDATE ... FROM unnest`` on PostgreSQL, an executemany on SQLite)
    plus ``last_seen`` (one update). The inserts are multi-row ``VALUES`` statements of up to
    1,000 rows (SQLAlchemy's "insertmanyvalues", which ``RETURNING`` turns on): a plain
    executemany is one statement per row on psycopg. The per-item arithmetic of
    ``ingest_one`` then runs in Python over those seqs, item by item in batch order, so
    several items of one device give exactly what sequential ``ingest`` calls give.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the database failed (``Registry`` maps it).
    """
    wanted = sorted(
        {d for (d, _e, _f), c in zip(batches, checked, strict=True) if isinstance(c, list)}
    )
    devices: dict[str, tuple[bool, int]] = {}
    for part in _chunks(wanted, _IN_CHUNK):
        for dev_id, revoked_at, epoch in conn.execute(
            select(_DEVICES.c.id, _DEVICES.c.revoked_at, _DEVICES.c.epoch).where(
                _DEVICES.c.id.in_(part)
            )
        ):
            devices[dev_id] = (revoked_at is not None, int(epoch or 1))
    out: list[IngestResult | RegistryError | None] = []
    for (device_id, _e, _f), rows in zip(batches, checked, strict=True):
        if isinstance(rows, RegistryError):
            out.append(rows)
        elif device_id not in devices:
            out.append(UnknownDeviceError(f"device {device_id!r} is not enrolled"))
        elif devices[device_id][0]:
            # Revocation means its data is no longer trusted, even while the broker has
            # not reloaded the CRL yet; the gateway drops and counts the message.
            out.append(DeviceRevokedError(f"device {device_id!r} is revoked"))
        else:
            out.append(None)
    live = sorted({b[0] for b, o in zip(batches, out, strict=True) if o is None})
    if not live:
        return [o for o in out if o is not None]
    # device_seq rows: create the missing ones, then lock them all for this transaction.
    zero = {"acked_upto": 0, "gaps": 0, "lost": 0, "duplicates": 0, "pruned_upto": 0}
    conn.execute(_seq_insert_ignore(dialect), [{"device_id": d, **zero} for d in live])
    state: dict[str, list[int]] = {}
    pruned: dict[str, int] = {}
    for part in _chunks(live, _IN_CHUNK):
        stmt = (
            select(
                _SEQ.c.device_id,
                _SEQ.c.acked_upto,
                _SEQ.c.gaps,
                _SEQ.c.lost,
                _SEQ.c.duplicates,
                _SEQ.c.pruned_upto,
            )
            .where(_SEQ.c.device_id.in_(part))
            .order_by(_SEQ.c.device_id)
            .with_for_update()
        )
        for dev_id, acked, gaps, lost, dups, pruned_upto in conn.execute(stmt):
            state[dev_id] = [int(acked), int(gaps), int(lost), int(dups)]
            pruned[dev_id] = int(pruned_upto)
    # Every entry once, first occurrence in batch order wins (as sequential calls would).
    first: dict[tuple[str, int], int] = {}  # (device, seq) -> index of the item storing it
    values: list[dict[str, Any]] = []
    for index, (rows, result) in enumerate(zip(checked, out, strict=True)):
        if result is not None or isinstance(rows, RegistryError):
            continue
        for r in rows:
            key = (r["device_id"], r["seq"])
            # At or below pruned_upto: a duplicate whose key retention pruned.
            if key not in first and r["seq"] > pruned[r["device_id"]]:
                first[key] = index
                epoch = devices[r["device_id"]][1]
                values.append({**r, "epoch": epoch, "received_at": now})
    inserted: set[tuple[str, int]] = set()
    if values:
        keys = [{k: v[k] for k in ("device_id", "epoch", "seq", "received_at")} for v in values]
        inserted = {(str(d), int(n)) for d, n in conn.execute(_keys_insert_ignore(dialect), keys)}
        new_rows = [v for v in values if (v["device_id"], v["seq"]) in inserted]
        if new_rows:
            conn.execute(_rows_insert(), new_rows)
    # Stored seqs above each device's mark (now including this batch's rows).
    above: dict[str, set[int]] = {d: set() for d in live}
    for part in _chunks(live, _IN_CHUNK):
        for row in conn.execute(_above_marks(dialect, part)):
            above[row[0]].add(int(row[1]))
    # What was stored before this batch: the rows of later items are added item by item.
    mine: dict[int, list[int]] = {}
    for key in inserted:
        mine.setdefault(first[key], []).append(key[1])
        above[key[0]].discard(key[1])
    results: list[IngestResult | RegistryError] = []
    for index, ((device_id, _e, floor), rows, result) in enumerate(
        zip(batches, checked, out, strict=True)
    ):
        if result is not None:
            results.append(result)
            continue
        assert isinstance(rows, list)
        st, seqs = state[device_id], above[device_id]
        mark = start = st[0]
        new = mine.get(index, [])
        recovered = 0
        for q in new:
            if q <= start:
                recovered += 1
            else:
                seqs.add(q)
        lost = 0
        if floor is not None and floor - 1 > mark:
            below = [q for q in seqs if q < floor]
            lost = (floor - 1 - mark) - len(below)
            seqs.difference_update(below)
            mark = floor - 1
        while mark + 1 in seqs:
            mark += 1
            seqs.discard(mark)
        top = max(seqs, default=None)
        gaps = 0 if top is None else top - mark - len(seqs)
        duplicates = len(rows) - len(new)
        st[0], st[1] = mark, gaps
        st[2] += lost - recovered
        st[3] += duplicates
        results.append(
            IngestResult(
                device_id=device_id,
                acked_upto=mark,
                gaps=gaps,
                inserted=len(new),
                duplicates=duplicates,
                lost=lost,
                recovered=recovered,
            )
        )
    _update_counters(conn, dialect, sorted(state.items()))
    for part in _chunks(live, _IN_CHUNK):
        conn.execute(update(_DEVICES).where(_DEVICES.c.id.in_(part)).values(last_seen=now))
    return results


def ingest_one(
    s: Session,
    dialect: str,
    device_id: str,
    rows: list[dict[str, Any]],
    floor: int | None,
    now: datetime,
) -> IngestResult:
    """One device's ingest inside an open write transaction (see ``ingest``).

    Raises:
        UnknownDeviceError, DeviceRevokedError: before anything is written.
        sqlalchemy.exc.SQLAlchemyError: the database failed (``Registry`` maps it).
    """
    dev = s.get(Device, device_id)
    if dev is None:
        raise UnknownDeviceError(f"device {device_id!r} is not enrolled")
    if dev.revoked_at is not None:
        # Revocation means its data is no longer trusted, even while the broker has
        # not reloaded the CRL yet; the gateway drops and counts the message.
        raise DeviceRevokedError(f"device {device_id!r} is revoked")
    state = _locked_seq(s, dialect, device_id)
    epoch = dev.epoch
    start = state.acked_upto
    # First occurrence of each seq; at or below pruned_upto: a duplicate whose key was pruned.
    fresh: dict[int, dict[str, Any]] = {}
    for r in rows:
        if r["seq"] > state.pruned_upto:
            fresh.setdefault(r["seq"], {**r, "epoch": epoch, "received_at": now})
    candidates = list(fresh.values())
    inserted: list[int] = []
    for i in range(0, len(candidates), _INSERT_CHUNK):
        chunk = [
            {k: r[k] for k in ("device_id", "epoch", "seq", "received_at")}
            for r in candidates[i : i + _INSERT_CHUNK]
        ]
        new = [int(q) for _d, q in s.execute(_keys_insert_ignore(dialect).values(chunk))]
        if new:
            s.execute(insert(TelemetryRow).values([fresh[q] for q in new]))
        inserted.extend(new)
    recovered = sum(1 for q in inserted if q <= start)
    mark, lost = start, 0
    if floor is not None and floor - 1 > mark:
        have = s.scalar(
            select(func.count())
            .select_from(TelemetryKey)
            .where(
                TelemetryKey.device_id == device_id,
                TelemetryKey.epoch == epoch,
                TelemetryKey.seq > mark,
                TelemetryKey.seq < floor,
            )
        )
        lost = (floor - 1 - mark) - int(have or 0)
        mark = floor - 1
    mark = _advance(s, device_id, epoch, mark)
    top, above = s.execute(
        select(func.max(TelemetryKey.seq), func.count()).where(
            TelemetryKey.device_id == device_id,
            TelemetryKey.epoch == epoch,
            TelemetryKey.seq > mark,
        )
    ).one()
    gaps = 0 if top is None else int(top) - mark - int(above)
    duplicates = len(rows) - len(inserted)
    state.acked_upto = mark
    state.gaps = gaps
    state.lost += lost - recovered
    state.duplicates += duplicates
    dev.last_seen = now
    # Write the counters now: a later item of the same device in this transaction
    # re-reads the row (populate_existing) and must see these values.
    s.flush()
    return IngestResult(
        device_id=device_id,
        acked_upto=mark,
        gaps=gaps,
        inserted=len(inserted),
        duplicates=duplicates,
        lost=lost,
        recovered=recovered,
    )


def _above_marks(dialect: str, devices: Sequence[str]) -> Any:
    """``(device_id, seq)`` of every key of ``devices``' current epochs above ``acked_upto``.

    Driven from ``device_seq``, one primary-key range scan of ``telemetry_keys`` per device
    (``device_id = d AND epoch = e AND seq > acked_upto``), so it reads what lies above the
    marks, never a device's whole key history. On PostgreSQL a ``LATERAL`` subquery makes
    that plan certain (a plain join with ``device_id IN (...)`` was planned as a scan of
    every key of those devices, or of the table); SQLite's nested loops already do it.
    """
    if dialect == "postgresql":
        keys = (
            select(_KEYS.c.seq)
            .where(
                _KEYS.c.device_id == _SEQ.c.device_id,
                _KEYS.c.epoch == _DEVICES.c.epoch,
                _KEYS.c.seq > _SEQ.c.acked_upto,
            )
            .offset(0)  # a fence: PostgreSQL would pull a plain subquery up into a join
            .lateral("above")
        )
        return (
            select(_SEQ.c.device_id, keys.c.seq)
            .select_from(_SEQ.join(_DEVICES, _DEVICES.c.id == _SEQ.c.device_id).join(keys, true()))
            .where(_SEQ.c.device_id.in_(devices))
        )
    return (
        select(_SEQ.c.device_id, _KEYS.c.seq)
        .select_from(_SEQ)
        .join(_DEVICES, _DEVICES.c.id == _SEQ.c.device_id)
        .join(
            _KEYS,
            and_(
                _KEYS.c.device_id == _SEQ.c.device_id,
                _KEYS.c.epoch == _DEVICES.c.epoch,
                _KEYS.c.seq > _SEQ.c.acked_upto,
            ),
        )
        .where(_SEQ.c.device_id.in_(devices))
    )


def _seq_insert_ignore(dialect: str) -> Any:
    """Core ``INSERT INTO device_seq ... ON CONFLICT DO NOTHING`` (for executemany).

    ``RETURNING`` makes SQLAlchemy send the rows as multi-row ``VALUES`` statements
    ("insertmanyvalues"); without it the driver runs one statement per row.
    """
    ins = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return ins(_SEQ).on_conflict_do_nothing().returning(_SEQ.c.device_id)


def _rows_insert() -> Any:
    """Core insert of telemetry rows, multi-row ``VALUES`` statements (see above)."""
    return insert(_TELEMETRY).returning(_TELEMETRY.c.id)


# One statement for every device's counters (PostgreSQL): arrays in, joined by device id.
_PG_UPDATE_COUNTERS: Final = text(
    "UPDATE device_seq AS s SET acked_upto = v.acked, gaps = v.gaps, lost = v.lost,"
    " duplicates = v.dups"
    " FROM unnest(CAST(:ids AS VARCHAR[]), CAST(:acked AS BIGINT[]), CAST(:gaps AS BIGINT[]),"
    " CAST(:lost AS BIGINT[]), CAST(:dups AS BIGINT[])) AS v(id, acked, gaps, lost, dups)"
    " WHERE s.device_id = v.id"
)


def _update_counters(
    conn: Connection, dialect: str, state: Sequence[tuple[str, Sequence[int]]]
) -> None:
    """Write each device's new ``(acked_upto, gaps, lost, duplicates)``, in device id order.

    PostgreSQL: one ``UPDATE ... FROM unnest(arrays)`` statement (an executemany there is one
    statement per device). SQLite: an executemany (in-process, no round trips).
    """
    if dialect == "postgresql":
        conn.execute(
            _PG_UPDATE_COUNTERS,
            {
                "ids": [d for d, _ in state],
                "acked": [st[0] for _, st in state],
                "gaps": [st[1] for _, st in state],
                "lost": [st[2] for _, st in state],
                "dups": [st[3] for _, st in state],
            },
        )
        return
    conn.execute(
        update(_SEQ)
        .where(_SEQ.c.device_id == bindparam("b_device"))
        .values(
            acked_upto=bindparam("b_acked"),
            gaps=bindparam("b_gaps"),
            lost=bindparam("b_lost"),
            duplicates=bindparam("b_dups"),
        ),
        [
            {"b_device": d, "b_acked": a, "b_gaps": g, "b_lost": lo, "b_dups": du}
            for d, (a, g, lo, du) in state
        ],
    )


def _keys_insert_ignore(dialect: str) -> Any:
    """Core key insert returning the ``(device_id, seq)`` of the keys that were new.

    Executed with a list of rows, SQLAlchemy's "insertmanyvalues" batches them into
    multi-row ``VALUES`` statements compiled once (no per-row statement building).
    """
    ins = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return (
        ins(_KEYS)
        .on_conflict_do_nothing(index_elements=["device_id", "epoch", "seq"])
        .returning(_KEYS.c.device_id, _KEYS.c.seq)
    )


def _locked_seq(s: Session, dialect: str, device_id: str) -> DeviceSeq:
    """Create the device's ``device_seq`` row if absent, then lock it for this transaction."""
    values = {
        "device_id": device_id,
        "acked_upto": 0,
        "gaps": 0,
        "lost": 0,
        "duplicates": 0,
        "pruned_upto": 0,
    }
    if dialect == "postgresql":
        s.execute(postgresql.insert(DeviceSeq).values(values).on_conflict_do_nothing())
    else:
        s.execute(sqlite.insert(DeviceSeq).values(values).on_conflict_do_nothing())
    row = s.get(DeviceSeq, device_id, with_for_update=True, populate_existing=True)
    if row is None:  # pragma: no cover - inserted just above in this transaction
        raise RegistryUnavailableError(f"device_seq row of {device_id!r} vanished")
    return row


def _advance(s: Session, device_id: str, epoch: int, mark: int) -> int:
    """Move ``mark`` up through stored seqs ``mark+1, mark+2, ...`` until the first hole."""
    while True:
        seqs = s.scalars(
            select(TelemetryKey.seq)
            .where(
                TelemetryKey.device_id == device_id,
                TelemetryKey.epoch == epoch,
                TelemetryKey.seq > mark,
            )
            .order_by(TelemetryKey.seq)
            .limit(_SCAN_CHUNK)
        ).all()
        for q in seqs:
            if q != mark + 1:
                return mark
            mark = q
        if len(seqs) < _SCAN_CHUNK:
            return mark


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
