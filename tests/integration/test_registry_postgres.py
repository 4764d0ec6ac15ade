"""The fleet registry on a real, throwaway PostgreSQL cluster (the scale-out path).

The fixture runs ``initdb`` + ``pg_ctl`` from ``/usr/lib/postgresql/*/bin`` into a temporary
directory on a free loopback port (trust auth, unix socket in the same directory) and stops it
afterwards; it never touches the system's PostgreSQL service. When run as root, the cluster
runs as the ``postgres`` user (PostgreSQL refuses root), in a directory under /tmp it can reach.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, select

from fleet_server.registry.models import TelemetryRow
from fleet_server.registry.schema import METADATA
from fleet_server.registry.store import Registry
from fleet_server.registry.values import TelemetryEntry
from pg import PgCluster

psycopg = pytest.importorskip("psycopg", reason="psycopg (PostgreSQL driver) is not installed")


@pytest.fixture
def url(pg: PgCluster) -> str:
    return pg.new_database()


@pytest.fixture
def reg(url: str) -> Iterator[Registry]:
    registry = Registry.open(url)
    registry.upgrade()
    registry.enroll("cam-1")
    yield registry
    registry.close()


def entries(*seqs: int) -> list[TelemetryEntry]:
    return [TelemetryEntry(seq=s, kind="report", payload={"n": s}) for s in seqs]


def test_upgrade_on_empty_database_matches_models(url: str) -> None:
    reg = Registry.open(url)
    assert reg.engine.dialect.name == "postgresql"
    assert reg.current_revision() is None
    reg.upgrade()
    assert reg.current_revision() == Registry.head_revision() == "0004"
    with reg.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), METADATA) == []
    reg.downgrade("base")
    assert reg.current_revision() is None
    reg.close()


def test_concurrent_upgrades_from_two_workers(url: str) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def worker() -> None:
        r = Registry.open(url)
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
        t.join(timeout=30)
    assert errors == []
    assert Registry.open(url).current_revision() == Registry.head_revision()


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


def test_concurrent_overlapping_ingest_two_engines(url: str, reg: Registry) -> None:
    n = 400
    reg.enroll("cam-2")
    totals = {"inserted": 0, "duplicates": 0}
    lock = threading.Lock()
    start = threading.Barrier(2)
    failures: list[BaseException] = []

    def worker(idx: int) -> None:
        r = Registry.open(url)  # its own engine and connection pool
        rng = random.Random(idx)
        size, shift = (10, 0) if idx == 0 else (7, 3)
        bounds = [(1, shift)] if shift else []
        bounds += [(a, min(a + size - 1, n)) for a in range(shift + 1, n + 1, size)]
        if idx == 1:
            rng.shuffle(bounds)
        start.wait()
        try:
            for lo, hi in bounds:
                for device in ("cam-1", "cam-2"):
                    res = r.ingest(device, entries(*range(lo, hi + 1)))
                    with lock:
                        totals["inserted"] += res.inserted
                        totals["duplicates"] += res.duplicates
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
    assert totals == {"inserted": 2 * n, "duplicates": 2 * n}
    with reg.engine.connect() as conn:
        rows = conn.scalar(select(func.count()).select_from(TelemetryRow))
    assert rows == 2 * n
    for device in ("cam-1", "cam-2"):
        s = reg.seq_state(device)
        assert (s.acked_upto, s.gaps, s.lost, s.duplicates) == (n, 0, 0, n)


def test_concurrent_desired_assignments(url: str, reg: Registry) -> None:
    versions: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(2)

    def worker() -> None:
        r = Registry.open(url)
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
