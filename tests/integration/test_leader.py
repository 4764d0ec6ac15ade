"""Exactly one leader: PostgreSQL advisory lock and SQLite file lock, with takeover on death."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.exc import DBAPIError

from fleet import wait_until
from fleet_server.jobs.leader import leader_lock
from pg import PgCluster

HOLD = """
import sys, time
from sqlalchemy import create_engine, text
from fleet_server.jobs.leader import leader_lock
lock = leader_lock(create_engine(sys.argv[1]), "rollout-engine")
assert lock.try_acquire()
print("held", flush=True)
time.sleep(600)
"""


def _holder(url: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, url], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    return proc


def _takeover(url: str) -> None:
    proc = _holder(url)
    try:
        mine = leader_lock(create_engine(url), "rollout-engine")
        assert not mine.try_acquire()
        assert leader_lock(create_engine(url), "another-role").try_acquire()
        proc.send_signal(signal.SIGKILL)  # the leader dies without releasing anything
        proc.wait(10)
        started = time.monotonic()
        wait_until(mine.try_acquire, timeout=20, what="takeover")
        assert time.monotonic() - started < 20
        assert mine.try_acquire()  # still held on the next tick
        mine.release()
        other = leader_lock(create_engine(url), "rollout-engine")
        assert other.try_acquire()
        other.release()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_postgres_advisory_lock_has_one_holder_and_is_taken_over(pg: PgCluster) -> None:
    _takeover(pg.new_database())


def test_sqlite_file_lock_has_one_holder_and_is_taken_over(tmp_path: Path) -> None:
    _takeover(f"sqlite:///{tmp_path / 'registry.db'}")


def test_postgres_leader_notices_a_lost_connection(pg: PgCluster) -> None:
    url = pg.new_database()
    lock = leader_lock(create_engine(url), "rollout-engine")
    assert lock.try_acquire()
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:  # the database drops the leader's session (failover, admin)
        killed = (
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks "
                    "WHERE locktype = 'advisory' AND granted AND database = "
                    "(SELECT oid FROM pg_database WHERE datname = current_database())"
                )
            )
            .scalars()
            .all()
        )
    assert killed == [True]
    assert not lock.try_acquire()  # it notices, and stops acting as the leader
    assert lock.try_acquire()  # the lock was freed with the session: regained on a new one
    lock.release()


def _lock_backend(conn: Connection) -> tuple[int, str | None]:
    """The (pid, state) of the session holding this database's advisory lock."""
    row = conn.execute(
        text(
            "SELECT a.pid, a.state FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    ).one()
    return int(row.pid), row.state


def test_postgres_leader_session_is_never_left_idle_in_transaction(pg: PgCluster) -> None:
    url = pg.new_database()
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:  # sessions idle in a transaction this long are killed
        name = conn.execute(text("SELECT current_database()")).scalar_one()
        conn.execute(
            text(f"ALTER DATABASE \"{name}\" SET idle_in_transaction_session_timeout = '300ms'")
        )
    lock = leader_lock(create_engine(url), "rollout-engine")
    assert lock.try_acquire()  # takes the lock
    assert lock.try_acquire()  # the heartbeat of every later tick
    # The timeout is armed: a session left in a transaction by autobegin is killed.
    careless = create_engine(url).connect()
    careless.execute(text("SELECT 1"))
    with admin.connect() as conn:
        pid, state = _lock_backend(conn)
        assert state == "idle"
        time.sleep(1.0)  # more than three timeouts
        assert _lock_backend(conn) == (pid, "idle")  # the same session, still alive
    with pytest.raises(DBAPIError, match="idle-in-transaction"):
        careless.execute(text("SELECT 1"))
    careless.invalidate()
    assert lock.try_acquire()
    with admin.connect() as conn:
        assert _lock_backend(conn)[0] == pid  # leadership held throughout, never regained
    lock.release()
