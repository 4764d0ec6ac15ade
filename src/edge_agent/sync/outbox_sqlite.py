"""The outbox's SQLite boundary: sqlite3 errors become the outbox's error families.

Owns ``SqliteGuard`` (a context that re-raises any ``sqlite3.Error`` as ``OutboxError``, or
``OutboxCorruptError`` for a damaged file), ``Transaction`` (``BEGIN IMMEDIATE`` ... ``COMMIT``,
rolled back on any exception) and ``wrap_sqlite_error``. Does not own the schema, the queries or
the outbox's invariants (``outbox`` does).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import TracebackType

from edge_agent.errors import OutboxCorruptError, OutboxError

__all__ = ["SqliteGuard", "Transaction", "wrap_sqlite_error"]

_CORRUPT_ERRORS = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})


class SqliteGuard:
    """Translate sqlite3 errors into the outbox's error families."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, sqlite3.Error):
            raise wrap_sqlite_error(exc, self._path) from exc


class Transaction(SqliteGuard):
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any exception."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        super().__init__(path)
        self._db = db

    def __enter__(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise wrap_sqlite_error(exc, self._path) from exc

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is None:
                self._db.execute("COMMIT")
                return
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error as err:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise wrap_sqlite_error(err, self._path) from err
        super().__exit__(exc_type, exc, tb)


def wrap_sqlite_error(exc: sqlite3.Error, path: Path) -> OutboxError:
    """The outbox error for ``exc``: ``OutboxCorruptError`` for a damaged file, else
    ``OutboxError``."""
    name = getattr(exc, "sqlite_errorname", "")
    if name in _CORRUPT_ERRORS:
        return OutboxCorruptError(f"{path}: damaged outbox database ({name}): {exc}")
    return OutboxError(f"{path}: outbox database error ({name or type(exc).__name__}): {exc}")
