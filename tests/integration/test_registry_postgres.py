"""The fleet registry on a real, throwaway PostgreSQL cluster (the scale-out path).

The fixture runs ``initdb`` + ``pg_ctl`` from ``/usr/lib/postgresql/*/bin`` into a temporary
directory on a free loopback port (trust auth, unix socket in the same directory) and stops it
afterwards; it never touches the system's PostgreSQL service. When run as root, the cluster
runs as the ``postgres`` user (PostgreSQL refuses root), in a directory under /tmp it can reach.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, func, select, text

from fleet_server.registry import Registry, TelemetryEntry
from fleet_server.registry.models import Base, TelemetryRow

psycopg = pytest.importorskip("psycopg", reason="psycopg (PostgreSQL driver) is not installed")


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    return found[0].parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PgCluster:
    def __init__(self, bindir: Path, base: Path, run_as: dict[str, Any]) -> None:
        self.bindir, self.base, self.run_as = bindir, base, run_as
        self.data, self.sock = base / "data", base / "sock"
        self.port = _free_port()
        self._n = 0

    def _run(self, *args: str) -> None:
        subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            check=True,
            capture_output=True,
            timeout=60,
            **self.run_as,
        )

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8")
        opts = (
            f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=50"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.base / "log"), "-o", opts, "-w",
                  "-t", "30", "start")  # fmt: skip

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def url(self, db: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"

    def new_database(self) -> str:
        self._n += 1
        name = f"registry_{self._n}"
        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url(name)


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    bindir = _pg_bin()
    if bindir is None or not (bindir / "pg_ctl").exists():
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql")
    run_as: dict[str, Any] = {}
    base = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base)
            pytest.skip("running as root and there is no 'postgres' user to run the cluster as")
        os.chown(base, user.pw_uid, user.pw_gid)
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    for sub in ("sock",):
        (base / sub).mkdir()
        if run_as:
            os.chown(base / sub, run_as["user"], run_as["group"])
    cluster = PgCluster(bindir, base, run_as)
    try:
        cluster.start()
    except subprocess.CalledProcessError as exc:
        log = base / "log"
        detail = log.read_text() if log.exists() else exc.stderr.decode(errors="replace")
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"could not start a throwaway PostgreSQL: {detail[-2000:]}")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


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
    assert reg.current_revision() == "0001"
    with reg.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
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
    assert Registry.open(url).current_revision() == "0001"


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
