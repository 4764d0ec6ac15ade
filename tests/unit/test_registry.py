"""The fleet registry: migrations, repository methods, idempotent ingest and acks.

Every test that takes ``registry_url`` (tests/conftest.py) runs twice: on a SQLite file and on a
fresh database of a real, throwaway PostgreSQL cluster (``tests/pg.py``: ``initdb`` + ``pg_ctl``
on a free loopback port, never the system's service). Tests that only make sense on one backend
say so in their name and check the dialect: SQLite's WAL and foreign-key pragmas.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, inspect, select

from clock import FakeClock
from edge_agent.wire.telemetry import Batch, Event, TelemetryReport
from fleet_server.errors import (
    BundleExistsError,
    DeviceExistsError,
    DeviceRevokedError,
    RegistryError,
    RegistryUnavailableError,
    TelemetryRejectedError,
    UnknownDeviceError,
)
from fleet_server.registry.schema import METADATA, include_name
from fleet_server.registry.store import Registry
from fleet_server.registry.tables.core import TelemetryRow
from fleet_server.registry.values import TelemetryEntry

SHA_A = "a" * 64
SHA_B = "b" * 64

# A trigger that fails every telemetry INSERT of cam-2, in each backend's dialect.
BOOM_TRIGGER = {
    "sqlite": (
        "CREATE TRIGGER boom BEFORE INSERT ON telemetry WHEN NEW.device_id = 'cam-2' "
        "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END",
    ),
    "postgresql": (
        "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.device_id = 'cam-2' THEN RAISE EXCEPTION 'disk on fire'; END IF; "
        "RETURN NEW; END $$",
        "CREATE TRIGGER boom BEFORE INSERT ON telemetry FOR EACH ROW EXECUTE FUNCTION boom()",
    ),
}


@pytest.fixture
def reg(registry_url: str) -> Iterator[Registry]:
    registry = Registry.open(
        registry_url, clock=FakeClock(wall=datetime(2026, 1, 1, tzinfo=UTC), tick=1.0).wall
    )
    registry.upgrade()
    registry.enroll("cam-1")
    yield registry
    registry.close()


def entries(*seqs: int) -> list[TelemetryEntry]:
    return [TelemetryEntry(seq=s, kind="report", payload={"n": s}) for s in seqs]


def backend(url: str) -> str:
    """``sqlite`` or ``postgresql`` (the SQLAlchemy dialect of ``url``)."""
    return url.split(":", 1)[0].split("+", 1)[0]


def row_count(reg: Registry, device: str = "cam-1") -> int:
    with reg.engine.connect() as conn:
        n = conn.scalar(
            select(func.count()).select_from(TelemetryRow).where(TelemetryRow.device_id == device)
        )
    return int(n or 0)


# --------------------------------------------------------------------------- migrations
def test_upgrade_creates_schema_on_empty_db_and_is_idempotent(registry_url: str) -> None:
    reg = Registry.open(registry_url)
    assert reg.engine.dialect.name == backend(registry_url)
    assert reg.current_revision() is None
    reg.upgrade()
    reg.upgrade()
    assert reg.current_revision() == Registry.head_revision()
    tables = set(inspect(reg.engine).get_table_names())
    assert {
        "devices",
        "bundles",
        "desired_states",
        "telemetry",
        "device_seq",
        "eval_sets",
        "audit_log",
    } <= tables
    reg.close()


def test_sqlite_runs_in_wal_with_foreign_keys(tmp_path: Path) -> None:
    """SQLite only: the pragmas the registry sets on every connection."""
    reg = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    reg.upgrade()
    with reg.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    reg.close()


def test_migrations_match_the_models(registry_url: str) -> None:
    reg = Registry.open(registry_url)
    reg.upgrade()
    with reg.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_name": include_name})
        diff = compare_metadata(context, METADATA)
    reg.close()
    assert diff == []


def test_downgrade_to_base_drops_everything(registry_url: str) -> None:
    reg = Registry.open(registry_url)
    reg.upgrade()
    reg.downgrade("base")
    assert reg.current_revision() is None
    assert set(inspect(reg.engine).get_table_names()) <= {"alembic_version"}
    reg.close()


def test_concurrent_upgrades_from_two_workers(registry_url: str) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def worker() -> None:
        r = Registry.open(registry_url)
        start.wait()
        try:
            r.upgrade()
        except BaseException as exc:
            errors.append(exc)
        r.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)  # eleven migrations, one waiting on the other's lock, on a busy machine
        assert not t.is_alive(), "an upgrade did not finish"
    assert errors == []
    reg = Registry.open(registry_url)
    assert reg.current_revision() == Registry.head_revision()
    reg.close()


def test_open_refuses_other_databases() -> None:
    with pytest.raises(RegistryError, match="unsupported"):
        Registry.open("mysql://u@h/db")
    with pytest.raises(RegistryError):
        Registry.open("not a url")


# --------------------------------------------------------------------------- devices
def test_enroll_list_revoke_reenroll(reg: Registry) -> None:
    reg.enroll("cam-2", group="lab", tags={"site": "b"}, cert_serial="0a1b")
    d = reg.get_device("cam-2")
    assert (d.group, dict(d.tags), d.cert_serial, d.revoked) == (
        "lab",
        {"site": "b"},
        "0a1b",
        False,
    )
    assert d.enrolled_at.tzinfo is not None
    assert [x.id for x in reg.list_devices()] == ["cam-1", "cam-2"]
    assert [x.id for x in reg.list_devices(group="lab")] == ["cam-2"]

    with pytest.raises(DeviceExistsError):
        reg.enroll("cam-2")
    first = reg.revoke("cam-2").revoked_at
    assert first is not None
    assert reg.revoke("cam-2").revoked_at == first  # idempotent, first time kept
    assert [x.id for x in reg.list_devices(include_revoked=False)] == ["cam-1"]

    again = reg.enroll("cam-2", cert_serial="ffff")
    assert not again.revoked
    assert again.cert_serial == "ffff"


def test_device_errors(reg: Registry) -> None:
    with pytest.raises(RegistryError, match="invalid device id"):
        reg.enroll("Bad_ID")
    with pytest.raises(RegistryError):
        reg.enroll("cam-3", group="")
    for call in (lambda: reg.get_device("nope"), lambda: reg.revoke("nope")):
        with pytest.raises(UnknownDeviceError):
            call()


def test_record_reported_state(reg: Registry) -> None:
    d = reg.record_reported("cam-1", {"models": {"digits": 3}, "ok": True})
    assert d.reported == {"models": {"digits": 3}, "ok": True}
    assert d.reported_at is not None
    assert d.last_seen == d.reported_at
    assert reg.get_device("cam-1").reported == {"models": {"digits": 3}, "ok": True}
    with pytest.raises(UnknownDeviceError):
        reg.record_reported("nope", {})


# --------------------------------------------------------------------------- bundles
def test_publish_and_list_bundles(reg: Registry) -> None:
    b = reg.publish_bundle(
        "digits", 2, channel="stable", sha256=SHA_A, length=10, targets_sha256=SHA_B,
        manifest={"runtime": "onnx"},
    )  # fmt: skip
    assert (b.name, b.version, dict(b.manifest)) == ("digits", 2, {"runtime": "onnx"})
    reg.publish_bundle("digits", 1, channel="beta", sha256=SHA_B, length=5, targets_sha256=SHA_B)
    reg.publish_bundle("alpha", 1, channel="beta", sha256=SHA_B, length=5, targets_sha256=SHA_B)
    assert [(x.name, x.version) for x in reg.list_bundles()] == [
        ("alpha", 1),
        ("digits", 1),
        ("digits", 2),
    ]
    assert [x.version for x in reg.list_bundles("digits")] == [1, 2]
    # Identical republish is a no-op; a different file under the same (name, version) is refused.
    same = reg.publish_bundle(
        "digits", 2, channel="stable", sha256=SHA_A, length=10, targets_sha256=SHA_B
    )
    assert same == b
    with pytest.raises(BundleExistsError):
        reg.publish_bundle(
            "digits", 2, channel="stable", sha256=SHA_B, length=10, targets_sha256=SHA_B
        )
    with pytest.raises(RegistryError, match="hex"):
        reg.publish_bundle("x", 1, channel="s", sha256="XYZ", length=1, targets_sha256=SHA_B)
    with pytest.raises(RegistryError, match="not published"):
        reg.get_bundle("digits", 9)


# --------------------------------------------------------------------------- desired state
def test_desired_version_is_monotonic(reg: Registry) -> None:
    assert reg.latest_desired("cam-1") is None
    seen: list[int] = []
    for _ in range(3):
        rec = reg.assign_desired("cam-1", lambda v: seen.append(v) or f"doc{v}".encode())
        assert rec.document == f"doc{rec.version}".encode()
    assert seen == [1, 2, 3]
    assert reg.assign_desired("cam-1", lambda v: b"x", at_least=10).version == 10
    assert reg.assign_desired("cam-1", lambda v: b"x", at_least=2).version == 11

    def boom(v: int) -> bytes:
        raise RuntimeError("signing failed")

    with pytest.raises(RuntimeError):
        reg.assign_desired("cam-1", boom)
    latest = reg.latest_desired("cam-1")
    assert latest is not None
    assert latest.version == 11
    with pytest.raises(RegistryError, match="bytes"):
        reg.assign_desired("cam-1", lambda v: b"")

    reg.enroll("cam-9")
    reg.revoke("cam-9")
    with pytest.raises(DeviceRevokedError):
        reg.assign_desired("cam-9", lambda v: b"x")
    with pytest.raises(UnknownDeviceError):
        reg.assign_desired("nope", lambda v: b"x")


@pytest.mark.parametrize("page", [1, 2, 3, 500])
def test_latest_desired_all_is_each_active_devices_newest_in_pages(
    reg: Registry, page: int
) -> None:
    # What the gateway republishes on connect: the same records as ``latest_desired`` per
    # active device, in id order, whatever the page size (pages end on and between devices).
    for device, versions in (("cam-1", 3), ("cam-2", 1), ("cam-4", 2), ("cam-5", 1)):
        if device != "cam-1":
            reg.enroll(device)
        for _ in range(versions):
            reg.assign_desired(device, lambda v, d=device: f"{d}:{v}".encode())
    reg.enroll("cam-3")  # no desired state: nothing to republish
    reg.revoke("cam-5")  # revoked: its document is not republished
    got = list(reg.latest_desired_all(page=page))
    assert [(r.device_id, r.version, r.document) for r in got] == [
        ("cam-1", 3, b"cam-1:3"),
        ("cam-2", 1, b"cam-2:1"),
        ("cam-4", 2, b"cam-4:2"),
    ]
    assert got == [reg.latest_desired(d) for d in ("cam-1", "cam-2", "cam-4")]


def test_concurrent_desired_assignments_get_distinct_versions(
    registry_url: str, reg: Registry
) -> None:
    versions: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(2)

    def worker() -> None:
        r = Registry.open(registry_url)
        start.wait()
        for _ in range(10):
            v = r.assign_desired("cam-1", lambda v: b"%d" % v).version
            with lock:
                versions.append(v)
        r.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(versions) == list(range(1, 21))


# --------------------------------------------------------------------------- ingest
def test_ingest_reports_and_events_then_replay_adds_nothing(reg: Registry) -> None:
    report = TelemetryReport(device_id="cam-1", seq=1, window_start=0.0, window_end=60.0)
    event = Event(device_id="cam-1", seq=2, kind="installed", at=61.0, model="digits", version=3)
    batch = Batch(device_id="cam-1", items=(report, event))
    first = reg.ingest_batch(batch)
    assert (first.inserted, first.duplicates, first.acked_upto, first.gaps) == (2, 0, 2, 0)
    replay = reg.ingest_batch(batch)
    assert (replay.inserted, replay.duplicates, replay.acked_upto) == (0, 2, 2)
    assert row_count(reg) == 2
    rows = reg.telemetry(device_id="cam-1")
    assert [(r.seq, r.kind) for r in rows] == [(1, "report"), (2, "event")]
    assert rows[1].payload["kind"] == "installed"
    assert TelemetryReport.from_dict(rows[0].payload) == report
    assert reg.telemetry(after_id=rows[0].id)[0].seq == 2
    assert reg.get_device("cam-1").last_seen is not None
    assert reg.seq_state("cam-1").duplicates == 2


def test_idempotent_ingest_gaps_and_floor(reg: Registry) -> None:
    r = reg.ingest("cam-1", entries(1, 2, 4, 7))
    assert (r.inserted, r.acked_upto, r.gaps) == (4, 2, 3)
    again = reg.ingest("cam-1", entries(1, 2, 4, 7))
    assert (again.inserted, again.duplicates, again.acked_upto) == (0, 4, 2)
    r = reg.ingest("cam-1", entries(8), floor=7)  # 3, 5, 6 are gone for good
    assert (r.acked_upto, r.lost, r.gaps) == (8, 3, 0)
    r = reg.ingest("cam-1", entries(5))  # late after all
    assert (r.recovered, r.acked_upto) == (1, 8)
    s = reg.seq_state("cam-1")
    assert (s.acked_upto, s.gaps, s.lost, s.duplicates) == (8, 0, 2, 4)
    stored = reg.telemetry(device_id="cam-1")
    assert [x.seq for x in stored] == [1, 2, 4, 7, 8, 5]
    assert stored[0].payload == {"n": 1}
    assert stored[0].received_at.tzinfo is not None


def test_contiguous_ack_with_gaps(reg: Registry) -> None:
    r = reg.ingest("cam-1", entries(1, 2, 4, 7))
    assert (r.acked_upto, r.gaps) == (2, 3)  # 3, 5, 6 missing
    r = reg.ingest("cam-1", entries(5))
    assert (r.acked_upto, r.gaps) == (2, 2)
    r = reg.ingest("cam-1", entries(3))
    assert (r.acked_upto, r.gaps) == (5, 1)
    r = reg.ingest("cam-1", entries(6, 6, 8))  # duplicate inside one call counts once
    assert (r.acked_upto, r.gaps, r.inserted, r.duplicates) == (8, 0, 2, 1)
    s = reg.seq_state("cam-1")
    assert (s.acked_upto, s.gaps, s.lost, s.duplicates) == (8, 0, 0, 1)


def test_out_of_order_first_batch_is_not_acked(reg: Registry) -> None:
    r = reg.ingest("cam-1", entries(3, 4))
    assert (r.acked_upto, r.gaps) == (0, 2)


def test_floor_rule_counts_lost_and_advances(reg: Registry) -> None:
    reg.ingest("cam-1", entries(1, 2, 4))
    # The device holds nothing below 6 any more: 3 and 5 are gone for good.
    r = reg.ingest("cam-1", entries(6, 7), floor=6)
    assert (r.acked_upto, r.gaps, r.lost, r.inserted) == (7, 0, 2, 2)
    assert reg.seq_state("cam-1").lost == 2
    # A floor below the mark changes nothing; an empty batch may carry just a floor.
    assert reg.ingest("cam-1", [], floor=3).acked_upto == 7
    r = reg.ingest("cam-1", [], floor=11)
    assert (r.acked_upto, r.lost) == (10, 3)
    # A "lost" entry that turns up after all (late redelivery) is stored and un-lost.
    r = reg.ingest("cam-1", entries(3))
    assert (r.inserted, r.recovered, r.acked_upto) == (1, 1, 10)
    assert reg.seq_state("cam-1").lost == 4


def test_floor_with_stored_entries_above_the_hole(reg: Registry) -> None:
    reg.ingest("cam-1", entries(1, 5, 6, 9))
    r = reg.ingest("cam-1", entries(5, 6), floor=5)  # 2-4 lost; 5, 6 stored; 7, 8 still missing
    assert (r.acked_upto, r.lost, r.gaps, r.duplicates) == (6, 3, 2, 2)


def test_ingest_rejects_structural_problems(reg: Registry) -> None:
    with pytest.raises(TelemetryRejectedError, match="seq"):
        reg.ingest("cam-1", entries(0))
    with pytest.raises(TelemetryRejectedError, match="floor"):
        reg.ingest("cam-1", entries(4, 5), floor=5)
    with pytest.raises(TelemetryRejectedError, match="floor"):
        reg.ingest("cam-1", [], floor=0)
    other = Event(device_id="cam-2", seq=1, kind="installed", at=1.0)
    with pytest.raises(TelemetryRejectedError, match="device"):
        reg.ingest("cam-1", [other])
    with pytest.raises(UnknownDeviceError):
        reg.ingest("nope", entries(1))
    assert row_count(reg) == 0
    assert reg.seq_state("cam-1").acked_upto == 0


def test_concurrent_overlapping_ingest_never_double_counts(
    registry_url: str, reg: Registry
) -> None:
    n = 400
    devices = ("cam-1", "cam-2")
    reg.enroll("cam-2")
    results: dict[str, list[tuple[int, int]]] = {d: [] for d in devices}
    marks: dict[tuple[int, str], list[int]] = {(i, d): [] for i in (0, 1) for d in devices}
    lock = threading.Lock()
    start = threading.Barrier(2)
    failures: list[BaseException] = []

    def worker(idx: int) -> None:
        r = Registry.open(registry_url)  # its own engine and connection pool
        rng = random.Random(idx)
        # Worker 0 sends 1..n in batches of 10; worker 1 the same seqs in shifted batches of
        # 7, some out of order: every seq of every device is sent by both.
        size, shift = (10, 0) if idx == 0 else (7, 3)
        bounds = [(1, shift)] if shift else []
        bounds += [(a, min(a + size - 1, n)) for a in range(shift + 1, n + 1, size)]
        if idx == 1:
            rng.shuffle(bounds)
        start.wait()
        try:
            for lo, hi in bounds:
                for device in devices:
                    res = r.ingest(device, entries(*range(lo, hi + 1)))
                    with lock:
                        results[device].append((res.inserted, res.duplicates))
                        marks[idx, device].append(res.acked_upto)
        except BaseException as exc:
            failures.append(exc)
        finally:
            r.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert failures == []
    totals = {
        "inserted": sum(i for d in devices for i, _ in results[d]),
        "duplicates": sum(x for d in devices for _, x in results[d]),
    }
    assert totals == {"inserted": 2 * n, "duplicates": 2 * n}
    with reg.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(TelemetryRow)) == 2 * n
    for device in devices:
        assert sum(i for i, _ in results[device]) == n
        assert sum(d for _, d in results[device]) == n
        assert row_count(reg, device) == n
        s = reg.seq_state(device)
        assert (s.acked_upto, s.gaps, s.lost, s.duplicates) == (n, 0, 0, n)
        marks_0 = marks[0, device]
        assert marks_0 == sorted(marks_0)  # one worker's acks never go backwards


def test_revoked_device_telemetry_and_reported_state_are_refused(reg: Registry) -> None:
    from fleet_server.errors import DeviceRevokedError

    reg.enroll("cam-r")
    reg.revoke("cam-r")
    with pytest.raises(DeviceRevokedError):
        reg.ingest("cam-r", [TelemetryEntry(seq=1, kind="event", payload={})])
    with pytest.raises(DeviceRevokedError):
        reg.record_reported("cam-r", {"models": {}})


# --------------------------------------------------------------------------- ingest_many
def test_ingest_many_mixed_devices_in_one_transaction(reg: Registry) -> None:
    reg.enroll("cam-2")
    reg.enroll("cam-3")
    reg.revoke("cam-3")
    results = reg.ingest_many(
        [
            ("cam-1", entries(1, 2), None),
            ("ghost", entries(1), None),  # unknown: refused, the others still stored
            ("cam-2", entries(1), None),
            ("cam-3", entries(1), None),  # revoked
            ("cam-1", entries(4), None),  # same device again: sees the first item's rows
            ("cam-1", entries(0), None),  # structurally wrong
            ("cam-1", entries(3), None),  # fills the hole: mark moves over 4
            ("cam-2", entries(1, 2), None),  # duplicate of the earlier cam-2 item + a new one
        ]
    )
    assert isinstance(results[1], UnknownDeviceError)
    assert isinstance(results[3], DeviceRevokedError)
    assert isinstance(results[5], TelemetryRejectedError)
    ok = [r for r in results if not isinstance(r, RegistryError)]
    assert [(r.device_id, r.acked_upto, r.inserted, r.duplicates, r.gaps) for r in ok] == [
        ("cam-1", 2, 2, 0, 0),
        ("cam-2", 1, 1, 0, 0),
        ("cam-1", 2, 1, 0, 1),
        ("cam-1", 4, 1, 0, 0),
        ("cam-2", 2, 1, 1, 0),
    ]
    assert row_count(reg, "cam-1") == 4
    assert row_count(reg, "cam-2") == 2
    assert row_count(reg, "cam-3") == 0
    assert row_count(reg, "ghost") == 0
    s1, s2 = reg.seq_state("cam-1"), reg.seq_state("cam-2")
    assert (s1.acked_upto, s1.gaps, s2.acked_upto, s2.duplicates) == (4, 0, 2, 1)


def test_ingest_many_floor_matches_ingest(reg: Registry, registry_url: str) -> None:
    reg.enroll("cam-2")
    # The same sequence through ingest (cam-1) and through ingest_many (cam-2) agrees.
    steps = [(entries(1, 2, 4), None), (entries(6, 7), 6), ([], 11), (entries(3), None)]
    singles = [reg.ingest("cam-1", e, floor=f) for e, f in steps]
    renamed = [[TelemetryEntry(x.seq, x.kind, x.payload) for x in e] for e, _ in steps]
    many = reg.ingest_many([("cam-2", e, f) for e, (_, f) in zip(renamed, steps, strict=True)])
    strip = [(r.acked_upto, r.gaps, r.inserted, r.duplicates, r.lost, r.recovered) for r in singles]
    assert [
        (r.acked_upto, r.gaps, r.inserted, r.duplicates, r.lost, r.recovered)
        for r in many
        if not isinstance(r, RegistryError)
    ] == strip
    assert reg.seq_state("cam-2").lost == reg.seq_state("cam-1").lost == 4
    assert isinstance(reg.ingest_many([("cam-1", entries(20), 21)])[0], TelemetryRejectedError)
    assert reg.ingest_many([]) == []


def test_ingest_many_database_failure_stores_nothing(reg: Registry) -> None:
    reg.enroll("cam-2")
    # Make the second item's INSERT fail inside the one transaction: no item is kept.
    with reg.engine.begin() as conn:
        for statement in BOOM_TRIGGER[reg.engine.dialect.name]:
            conn.exec_driver_sql(statement)
    with pytest.raises(RegistryUnavailableError):
        reg.ingest_many([("cam-1", entries(1), None), ("cam-2", entries(1), None)])
    assert row_count(reg, "cam-1") == 0
    assert reg.seq_state("cam-1").acked_upto == 0


def test_re_enrolled_device_starts_a_new_sequence_epoch(registry_url: str) -> None:
    """A replaced device (fresh outbox, seqs from 1 again) is not taken for duplicates."""
    reg = Registry.open(registry_url)
    reg.upgrade()
    reg.enroll("cam-9")
    first = reg.ingest("cam-9", [TelemetryEntry(1, "report"), TelemetryEntry(2, "report")])
    assert first.acked_upto == 2
    reg.revoke("cam-9")
    assert reg.enroll("cam-9").epoch == 2
    assert reg.seq_state("cam-9").acked_upto == 0
    again = reg.ingest("cam-9", [TelemetryEntry(1, "report")])
    assert again.inserted == 1
    assert again.duplicates == 0
    assert again.acked_upto == 1
    rows = reg.telemetry(device_id="cam-9")
    assert [(t.epoch, t.seq) for t in rows] == [(1, 1), (1, 2), (2, 1)]
    reg.close()


def test_telemetry_listing_filters_by_kind(registry_url: str) -> None:
    reg = Registry.open(registry_url)
    reg.upgrade()
    reg.enroll("cam-7")
    reg.ingest(
        "cam-7",
        [TelemetryEntry(1, "report"), TelemetryEntry(2, "event"), TelemetryEntry(3, "report")],
    )
    assert [t.seq for t in reg.telemetry(device_id="cam-7", kind="report")] == [1, 3]
    assert [t.seq for t in reg.telemetry(kind="event")] == [2]
    assert len(reg.telemetry(device_id="cam-7")) == 3
    reg.close()
