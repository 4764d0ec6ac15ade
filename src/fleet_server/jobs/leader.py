"""Leader election among fleet-server workers: exactly one runs the rollout engine.

Owns one lock per role name. On PostgreSQL it is a session-level advisory lock
(``pg_try_advisory_lock``) held on a dedicated connection: when the holder dies, its
connection closes and the server releases the lock, so another worker's next ``try_acquire``
takes over. On SQLite (one host) it is an ``flock`` on a file beside the database, released
by the kernel when the holder dies. Workers call ``try_acquire`` every tick and act only
while it returns True; a lost connection turns leadership off until it is regained. Every
``try_acquire`` ends its transaction before returning, so the lock's session is never left
"idle in transaction" (which ``idle_in_transaction_session_timeout`` would kill).

Does not decide anything the leader does (the rollout runner does).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Protocol

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

__all__ = ["LeaderLock", "leader_lock", "lock_key"]

log = logging.getLogger(__name__)


class LeaderLock(Protocol):
    """A lock at most one worker holds at a time. Thread-safe."""

    def try_acquire(self) -> bool:
        """True while this worker holds the lock (acquiring it if free); never raises."""
        ...

    def release(self) -> None:
        """Give the lock up (idempotent); never raises."""
        ...


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``name``."""
    digest = hashlib.sha256(f"edgefleet:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class _PostgresLock:
    def __init__(self, engine: Engine, name: str) -> None:
        self._engine = engine
        self._key = lock_key(name)
        self._name = name
        self._conn: Connection | None = None
        self._held = False
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = self._engine.connect()
                if self._held:
                    self._conn.execute(text("SELECT 1"))  # still connected: still ours
                    # SQLAlchemy autobegins: without the commit the session stays "idle in
                    # transaction" between ticks, and a server with
                    # idle_in_transaction_session_timeout kills it (and the lock with it).
                    self._conn.commit()
                    return True
                got = self._conn.execute(
                    text("SELECT pg_try_advisory_lock(:k)"), {"k": self._key}
                ).scalar()
                self._conn.commit()
                self._held = bool(got)
                if self._held:
                    log.info("leader for %s", self._name)
                return self._held
            except SQLAlchemyError as exc:
                if self._held:
                    log.warning("lost leadership for %s: %s", self._name, exc)
                self._drop()
                return False

    def release(self) -> None:
        with self._lock:
            if self._conn is not None and self._held:
                try:
                    self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
                    self._conn.commit()
                except SQLAlchemyError:
                    pass
            self._drop()

    def _drop(self) -> None:
        self._held = False
        if self._conn is not None:
            try:
                self._conn.invalidate()
                self._conn.close()
            except SQLAlchemyError:
                pass
            self._conn = None


class _FileLock:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            if self._fd is not None:
                return True
            try:
                fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                log.error("cannot open leader lock %s: %s", self._path, exc)
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            self._fd = fd
            return True

    def release(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)  # closing releases the flock
                self._fd = None


class _LocalLock:
    """For an in-memory database, which only this process can see."""

    _taken: set[str] = set()
    _guard = threading.Lock()

    def __init__(self, name: str) -> None:
        self._name = name
        self._held = False

    def try_acquire(self) -> bool:
        with self._guard:
            if not self._held and self._name not in self._taken:
                self._taken.add(self._name)
                self._held = True
            return self._held

    def release(self) -> None:
        with self._guard:
            if self._held:
                self._taken.discard(self._name)
                self._held = False


def leader_lock(engine: Engine, name: str) -> LeaderLock:
    """The leader lock for role ``name`` on the registry database behind ``engine``.

    PostgreSQL: an advisory lock. SQLite: an ``flock`` on ``<database>.<name>.leader``
    (in-memory databases: a lock private to this process).
    """
    if engine.dialect.name == "postgresql":
        return _PostgresLock(engine, name)
    database = engine.url.database
    if not database or database == ":memory:":
        return _LocalLock(name)
    return _FileLock(Path(f"{database}.{name}.leader"))
