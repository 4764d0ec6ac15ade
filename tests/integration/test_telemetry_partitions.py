"""Telemetry storage that lasts, on real SQLite and real PostgreSQL (``registry_url``).

Deduplication by ``telemetry_keys`` (the same code on both backends), PostgreSQL's daily
partitions of ``telemetry`` (migration ``0006``, ``fleet_server.history.retention``): a
migration from 0005 with rows keeps every row, a redelivery after a partition boundary is not
stored twice, rows far in the past or future land in the default partition, retention drops
whole partitions only once folded, pruned keys still refuse redeliveries, and workers that
ingest (and prune) the same keys at once store each entry once.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text

from clock import FakeClock
from fleet_server.history import retention
from fleet_server.jobs.history import HistoryJob, HistoryPolicy
from fleet_server.registry.store import Registry
from fleet_server.registry.tables.core import DeviceSeq, TelemetryKey, TelemetryRow
from fleet_server.registry.values import TelemetryEntry
from pg import PgCluster

DAY0 = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(wall=DAY0 + timedelta(hours=23, minutes=59, seconds=50))


@pytest.fixture
def reg(registry_url: str, clock: FakeClock) -> Iterator[Registry]:
    registry = Registry.open(registry_url, clock=clock.wall)
    registry.upgrade()
    registry.enroll("cam-1")
    yield registry
    registry.close()


def entries(*seqs: int) -> list[TelemetryEntry]:
    return [TelemetryEntry(seq=s, kind="report", payload={"n": s}) for s in seqs]


def stored(reg: Registry, device: str = "cam-1") -> list[int]:
    """The stored seqs of ``device``, with repeats (a duplicate shows twice)."""
    with reg.engine.connect() as c:
        seqs = c.scalars(
            select(TelemetryRow.seq).where(TelemetryRow.device_id == device).order_by("seq")
        )
        return [int(s) for s in seqs]


def by_partition(reg: Registry) -> dict[str, int]:
    """PostgreSQL: rows per partition of ``telemetry``."""
    with reg.engine.connect() as c:
        rows = c.execute(
            text("SELECT tableoid::regclass::text, count(*) FROM telemetry GROUP BY 1")
        )
        return {str(name): int(n) for name, n in rows}


def is_pg(reg: Registry) -> bool:
    return reg.engine.dialect.name == "postgresql"


# --------------------------------------------------------------------------- migration
def test_a_0005_database_with_rows_upgrades_keeping_every_row(registry_url: str) -> None:
    registry = Registry.open(registry_url)
    registry.upgrade("0005")
    rows = []
    with registry.engine.begin() as c:  # rows as 0005 stored them, over three days
        c.exec_driver_sql(
            'INSERT INTO devices (id, "group", tags, enrolled_at, epoch) '
            "VALUES ('old-1', 'g', '{}', '2026-06-01 09:00:00+00:00', 1)"
        )
        c.exec_driver_sql(
            "INSERT INTO device_seq (device_id, acked_upto, gaps, lost, duplicates) "
            "VALUES ('old-1', 60, 0, 0, 0)"
        )
        for i in range(1, 61):
            at = DAY0 + timedelta(hours=i * 1.2)
            c.execute(
                text(
                    "INSERT INTO telemetry (device_id, epoch, seq, kind, received_at, payload) "
                    "VALUES ('old-1', 1, :seq, 'report', :at, :payload)"
                ),
                {"seq": i, "at": at, "payload": json.dumps({"n": i})},
            )
        rows = sorted(c.execute(text("SELECT id, seq, received_at FROM telemetry")).all())
    registry.upgrade("0006")
    assert registry.current_revision() == "0006"
    with registry.engine.connect() as c:
        after = sorted(c.execute(text("SELECT id, seq, received_at FROM telemetry")).all())
        keys = c.scalar(select(func.count()).select_from(TelemetryKey))
    assert after == rows  # same ids, seqs and times
    assert keys == len(rows)
    if is_pg(registry):
        parts = by_partition(registry)
        assert "telemetry_default" not in parts  # every old day got its partition
        assert parts == {"telemetry_p20260601": 19, "telemetry_p20260602": 20,
                         "telemetry_p20260603": 20, "telemetry_p20260604": 1}  # fmt: skip
        with registry.engine.connect() as c:
            kind = c.scalar(text("SELECT relkind FROM pg_class WHERE relname = 'telemetry'"))
        assert kind == "p"
    # A redelivery of an old entry is a duplicate; a new entry gets a higher id.
    clock = FakeClock(wall=DAY0 + timedelta(days=3, hours=2))
    upgraded = Registry.open(registry_url, clock=clock.wall)
    res = upgraded.ingest("old-1", entries(60, 61))
    assert (res.inserted, res.duplicates, res.acked_upto) == (1, 1, 61)
    with upgraded.engine.connect() as c:
        new_id = c.scalar(select(TelemetryRow.id).where(TelemetryRow.seq == 61))
    assert new_id is not None
    assert new_id > max(r[0] for r in rows)
    assert stored(upgraded, "old-1") == list(range(1, 62))
    # Down to 0005 and up again: the rows survive both ways.
    upgraded.downgrade("0005")
    with upgraded.engine.connect() as c:
        assert c.scalar(text("SELECT count(*) FROM telemetry")) == 61
    upgraded.upgrade()
    assert stored(upgraded, "old-1") == list(range(1, 62))
    upgraded.close()
    registry.close()


# --------------------------------------------------------------------------- dedupe
def test_a_redelivery_after_a_partition_boundary_is_stored_once(
    reg: Registry, clock: FakeClock
) -> None:
    retention.ensure_partitions(reg, clock.wall(), 2)
    first = reg.ingest("cam-1", entries(1, 2, 3))
    assert first.inserted == 3
    clock.advance(20)  # past midnight: the next day's partition
    again = reg.ingest("cam-1", entries(1, 2, 3, 4))
    many = reg.ingest_many([("cam-1", entries(2, 4, 5), None)])
    assert (again.inserted, again.duplicates) == (1, 3)
    assert isinstance(many[0], type(again))
    assert (many[0].inserted, many[0].duplicates, many[0].acked_upto) == (1, 2, 5)
    assert stored(reg) == [1, 2, 3, 4, 5]
    if is_pg(reg):
        assert by_partition(reg) == {"telemetry_p20260601": 3, "telemetry_p20260602": 2}


def test_rows_far_in_the_past_or_future_are_stored(
    reg: Registry, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock.set_wall(datetime(1999, 3, 1, tzinfo=UTC))
    assert reg.ingest("cam-1", entries(1)).inserted == 1
    clock.set_wall(datetime(2199, 3, 1, tzinfo=UTC))
    assert reg.ingest("cam-1", entries(2)).inserted == 1
    assert stored(reg) == [1, 2]
    if is_pg(reg):
        assert by_partition(reg) == {"telemetry_default": 2}
        # The day's partition made later takes that day's rows out of the default one.
        assert retention.ensure_partitions(reg, clock.wall(), 0) == 1
        assert by_partition(reg) == {"telemetry_default": 1, "telemetry_p21990301": 1}
        assert stored(reg) == [1, 2]
        # A day with more rows in the default partition than a move may take stays there.
        monkeypatch.setattr(retention, "MAX_MOVE", 0)
        assert retention.ensure_partitions(reg, datetime(1999, 3, 1, tzinfo=UTC), 0) == 0
        assert by_partition(reg) == {"telemetry_default": 1, "telemetry_p21990301": 1}


# --------------------------------------------------------------------------- retention
def test_retention_drops_whole_partitions_only_once_folded(reg: Registry) -> None:
    start = DAY0 + timedelta(days=1)  # 2026-06-02 00:00
    clock = FakeClock(wall=start)
    registry = Registry(reg.engine, clock=clock.wall)
    retention.ensure_partitions(registry, start, 2)
    for i in range(1, 181):  # every 10 minutes for 30 hours: day 1 whole, day 2 until 06:00
        clock.set_wall(start + timedelta(minutes=10 * (i - 1)))
        registry.ingest("cam-1", entries(i))
    now = start + timedelta(hours=31)
    day1 = len([i for i in range(180) if i * 10 < 24 * 60])
    policy = HistoryPolicy(raw_retention_seconds=3600.0, max_buckets_per_run=100)
    # 100 buckets folded (8 h 20 min): the cut stops there; day 1's partition may not go.
    report = HistoryJob(registry, policy, clock=lambda: now).run_once()
    assert report.partitions_dropped == 0
    if is_pg(registry):
        assert report.raw_deleted == 0
        assert len(stored(registry)) == 180
    else:  # SQLite deletes row by row up to the cut
        assert report.raw_deleted == 50
    # Folded up to now: the cut is now - 1 h (day 2, 06:00); day 1 ends before it and goes.
    report = HistoryJob(registry, HistoryPolicy(raw_retention_seconds=3600.0),
                        clock=lambda: now).run_once()  # fmt: skip
    left = stored(registry)
    if is_pg(registry):
        assert report.partitions_dropped == 1
        assert report.raw_deleted == 0  # nothing in the default partition
        assert left == list(range(day1 + 1, 181))  # day 2 is kept whole, even before the cut
        assert next(p.name for p in retention.partitions(registry)) == "telemetry_p20260603"
    else:
        assert report.raw_deleted == 130
        assert left == []
    # Every key is older than the cut and acked: pruned, and a redelivery is still refused.
    with registry.engine.connect() as c:
        pruned = c.scalar(select(DeviceSeq.pruned_upto).where(DeviceSeq.device_id == "cam-1"))
        keys = c.scalar(select(func.count()).select_from(TelemetryKey))
    assert (pruned, keys) == (180, 0)
    res = registry.ingest("cam-1", entries(1, 2, day1, 181))
    assert (res.inserted, res.duplicates, res.acked_upto) == (1, 3, 181)
    assert stored(registry).count(1) == 0
    assert stored(registry).count(181) == 1


def test_keys_above_the_mark_are_never_pruned(reg: Registry, clock: FakeClock) -> None:
    reg.ingest("cam-1", entries(1, 2, 4, 5))  # 3 is missing: the device still holds 4 and 5
    later = clock.utc + timedelta(days=10)
    job = HistoryJob(reg, HistoryPolicy(raw_retention_seconds=3600.0), clock=lambda: later)
    report = job.run_once()
    assert report.keys_pruned == 2  # 1 and 2; 4 and 5 stay
    res = reg.ingest("cam-1", entries(3, 4, 5))
    assert (res.inserted, res.duplicates, res.acked_upto) == (1, 2, 5)


def test_keys_of_an_older_epoch_are_pruned_and_the_new_epoch_starts_clean(
    reg: Registry, clock: FakeClock
) -> None:
    reg.ingest("cam-1", entries(1, 2, 4))  # 4 stays above the mark of epoch 1
    reg.revoke("cam-1")
    reg.enroll("cam-1")  # re-enrolled: epoch 2, its outbox starts at 1 again
    assert reg.ingest("cam-1", entries(1)).inserted == 1
    later = clock.utc + timedelta(days=10)
    job = HistoryJob(reg, HistoryPolicy(raw_retention_seconds=3600.0), clock=lambda: later)
    assert job.run_once().keys_pruned == 4  # all of epoch 1, and epoch 2's acked seq 1
    with reg.engine.connect() as c:
        pruned = c.scalar(select(DeviceSeq.pruned_upto).where(DeviceSeq.device_id == "cam-1"))
    assert pruned == 1
    res = reg.ingest("cam-1", entries(1, 2, 4))
    assert (res.inserted, res.duplicates, res.acked_upto) == (2, 1, 2)


# --------------------------------------------------------------------------- concurrency
def test_two_workers_and_the_pruner_store_every_entry_once(
    registry_url: str, reg: Registry, clock: FakeClock
) -> None:
    """Two workers ingest the same keys (one per-device, one set-wise) across midnight while
    a third prunes keys: every entry is stored once, every redelivery counted."""
    n, devices = 300, ("cam-1", "cam-2", "cam-3")
    for d in devices[1:]:
        reg.enroll(d)
    retention.ensure_partitions(reg, clock.wall(), 2)
    start = threading.Barrier(3)
    failures: list[BaseException] = []
    inserted = dict.fromkeys(devices, 0)
    lock = threading.Lock()
    wall = threading.Lock()  # the shared fake clock moves across midnight

    def tick() -> datetime:
        with wall:
            clock.advance(0.2)
            return clock.wall()

    def ingest(idx: int) -> None:
        r = Registry.open(registry_url, clock=tick)
        start.wait()
        try:
            for lo in range(1, n + 1, 10):
                seqs = list(range(lo, lo + 10)) if idx == 0 else list(range(lo + 9, lo - 1, -1))
                if idx == 0:
                    got = [r.ingest(d, entries(*seqs)) for d in devices]
                else:
                    out = r.ingest_many([(d, entries(*seqs), None) for d in devices])
                    got = [g for g in out if not isinstance(g, Exception)]
                    assert len(got) == len(devices)
                with lock:
                    for g in got:
                        inserted[g.device_id] += g.inserted
        except BaseException as exc:
            failures.append(exc)
        finally:
            r.close()

    done = threading.Event()
    pruned: list[int] = []

    def prune() -> None:
        r = Registry.open(registry_url)
        start.wait()
        try:
            while True:  # the cut is far ahead: every acked key is prunable at once
                last = done.is_set()
                pruned.append(retention.prune_keys_batch(r, clock.utc + timedelta(days=1), 50))
                if last and pruned[-1] < 50:
                    break
        except BaseException as exc:
            failures.append(exc)
        finally:
            r.close()

    threads = [threading.Thread(target=ingest, args=(i,)) for i in range(2)]
    threads.append(threading.Thread(target=prune))
    for t in threads:
        t.start()
    for t in threads[:2]:
        t.join(timeout=120)
    done.set()
    threads[2].join(timeout=120)
    assert failures == []
    with reg.engine.connect() as c:  # every key went, some while ingest ran
        assert c.scalar(select(func.count()).select_from(TelemetryKey)) == 0
    assert sum(pruned) > 0
    for d in devices:
        assert inserted[d] == n
        assert stored(reg, d) == list(range(1, n + 1))
        s = reg.seq_state(d)
        assert (s.acked_upto, s.gaps, s.lost, s.duplicates) == (n, 0, 0, n)
    if is_pg(reg):
        parts = by_partition(reg)
        assert set(parts) == {"telemetry_p20260601", "telemetry_p20260602"}  # both days
        assert sum(parts.values()) == n * len(devices)
    # With every key pruned, a redelivery of everything is still refused.
    again = reg.ingest_many([(d, entries(*range(1, n + 1)), None) for d in devices])
    assert [(g.inserted, g.duplicates) for g in again if not isinstance(g, Exception)] == [
        (0, n)
    ] * len(devices)
    assert stored(reg, "cam-2") == list(range(1, n + 1))


def test_a_partition_drop_that_would_wait_for_a_lock_is_left_for_the_next_run_postgres(
    pg: PgCluster, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long read holds ``telemetry``: the drop gives up after the lock timeout instead of
    queueing (with ingest queued behind it), and succeeds on the next run."""
    reg = Registry.open(pg.new_database(), clock=clock.wall)
    reg.upgrade()
    reg.enroll("cam-1")
    retention.ensure_partitions(reg, clock.wall(), 0)
    reg.ingest("cam-1", entries(1))
    monkeypatch.setattr(retention, "LOCK_TIMEOUT", "200ms")
    cut = clock.utc + timedelta(days=2)
    with reg.engine.connect() as reader:
        reader.execute(text("SELECT count(*) FROM telemetry")).all()  # holds ACCESS SHARE
        assert retention.drop_partitions(reg, cut) == 0
        assert reg.ingest("cam-1", entries(2)).inserted == 1  # ingest was not held up
    assert retention.drop_partitions(reg, cut) == 1
    assert stored(reg) == []
    reg.close()


def test_two_workers_making_the_same_partitions_make_each_once_postgres(
    pg: PgCluster, clock: FakeClock
) -> None:
    url = pg.new_database()
    Registry.open(url).upgrade()
    start = threading.Barrier(2)
    made: list[int] = []
    failures: list[BaseException] = []

    def worker() -> None:
        r = Registry.open(url)
        start.wait()
        try:
            made.append(retention.ensure_partitions(r, clock.wall(), 3))
        except BaseException as exc:
            failures.append(exc)
        finally:
            r.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert failures == []
    assert sum(made) == 4  # 2026-06-01 .. 06-04, each made by one of them
    reg = Registry.open(url)
    days = [p.name for p in retention.partitions(reg)]
    reg.close()
    assert days[:4] == [f"telemetry_p2026060{d}" for d in range(1, 5)]
