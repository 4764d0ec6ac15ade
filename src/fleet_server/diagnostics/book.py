"""The server's record of remote commands: a small SQLite file in the server's state directory.

Owns: each device's command sequence (allocated here, strictly increasing, the device's
anti-replay counter), every command issued with its state and the device's answer, and the
bound on pending commands per device. States::

    pending    signed and published; waiting in the device's MQTT session (or for the device)
    answered   the device ran it (``ok`` answer)
    refused    the device answered with a typed error
    expired    no answer before its expiry
    uploading  a support-bundle answer came; its blocks are being pulled
    uploaded   the archive arrived and matched the SHA-256 the device announced
    upload_failed  the archive did not arrive complete and intact before the transfer expired

Why a file of its own, not the registry: no registry table fits (commands are short-lived
operational records, not fleet state), and the state is per server: the worker that issued a
command holds it and receives its answer (the gateway subscribes to answers without sharing).
Workers that share the state directory share the file (SQLite locks it). Rows older than
``RETENTION_SECONDS`` are deleted.

Does not sign, publish or parse device messages (``fleet_server.diagnostics.service``).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from fleet_server.errors import (
    CommandQueueFullError,
    DiagnosticsError,
    UnknownCommandRecordError,
)

__all__ = ["FINAL_STATES", "RETENTION_SECONDS", "CommandBook", "CommandRecord"]

RETENTION_SECONDS: Final = 30 * 86400
FINAL_STATES: Final = frozenset({"answered", "refused", "expired", "uploaded", "upload_failed"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sequences (device_id TEXT PRIMARY KEY, last INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    name TEXT NOT NULL,
    args TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    issued REAL NOT NULL,
    expires REAL NOT NULL,
    state TEXT NOT NULL,
    answer TEXT,
    answered_at REAL,
    upload TEXT
);
CREATE INDEX IF NOT EXISTS commands_device_state ON commands (device_id, state);
CREATE INDEX IF NOT EXISTS commands_state ON commands (state);
"""

_SELECT_BY_ID = (
    "SELECT id, device_id, name, args, sequence, issued, expires, state, answer, answered_at, "
    "upload FROM commands WHERE id = ?"
)
_SELECT_BY_DEVICE = (
    "SELECT id, device_id, name, args, sequence, issued, expires, state, answer, answered_at, "
    "upload FROM commands WHERE device_id = ? ORDER BY sequence DESC LIMIT ?"
)
_SELECT_BY_STATE = (
    "SELECT id, device_id, name, args, sequence, issued, expires, state, answer, answered_at, "
    "upload FROM commands WHERE state = ?"
)
_INSERT = (
    "INSERT INTO commands (id, device_id, name, args, sequence, issued, expires, state) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, 'pending')"
)
_SETTLE = (
    "UPDATE commands SET state = ?, answer = COALESCE(?, answer), "
    "answered_at = COALESCE(?, answered_at), upload = COALESCE(?, upload) "
    "WHERE id = ? AND state IN (?, ?)"
)


@dataclass(frozen=True)
class CommandRecord:
    """One command as the server keeps it (times are UNIX seconds)."""

    id: str
    device_id: str
    name: str
    args: dict[str, Any]
    sequence: int
    issued: float
    expires: float
    state: str
    answer: dict[str, Any] | None
    answered_at: float | None
    upload: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        """The admin API's view."""
        return {
            "id": self.id,
            "device_id": self.device_id,
            "name": self.name,
            "args": self.args,
            "sequence": self.sequence,
            "issued": self.issued,
            "expires": self.expires,
            "state": self.state,
            "answer": self.answer,
            "answered_at": self.answered_at,
            "upload": self.upload,
        }


def _record(row: tuple[Any, ...]) -> CommandRecord:
    return CommandRecord(
        id=row[0],
        device_id=row[1],
        name=row[2],
        args=json.loads(row[3]),
        sequence=row[4],
        issued=row[5],
        expires=row[6],
        state=row[7],
        answer=None if row[8] is None else json.loads(row[8]),
        answered_at=row[9],
        upload=None if row[10] is None else json.loads(row[10]),
    )


class CommandBook:
    """The command records; thread-safe (one connection behind a lock).

    Args:
        path: the SQLite file (``<state_dir>/diagnostics/commands.db``).
        max_pending: most commands one device may have pending (or uploading).

    Raises:
        DiagnosticsError: the file cannot be opened or created.
    """

    def __init__(self, path: Path, max_pending: int) -> None:
        self._max_pending = max_pending
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, timeout=10.0)
            # WAL, synced at checkpoints: a power loss may forget the last few records, never
            # corrupt the file (commands are short-lived; the device's sequence check holds).
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise DiagnosticsError(f"diagnostics state {path} cannot be opened: {exc}") from exc

    def close(self) -> None:
        """Close the file. Never raises."""
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.close()

    def _run(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            with self._lock, self._db:
                return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise DiagnosticsError(f"diagnostics state failed: {exc}") from exc

    def allocate(
        self,
        device_id: str,
        name: str,
        args: dict[str, Any],
        command_id: str,
        issued: float,
        expires: float,
    ) -> int:
        """Take the device's next sequence and record the command as ``pending``, atomically.

        Returns:
            The sequence the command must be signed with.

        Raises:
            CommandQueueFullError: the device has ``max_pending`` commands pending already.
            DiagnosticsError: the file failed.
        """
        try:
            with self._lock, self._db:
                (pending,) = self._db.execute(
                    "SELECT COUNT(*) FROM commands WHERE device_id = ? "
                    "AND state IN ('pending', 'uploading')",
                    (device_id,),
                ).fetchone()
                if pending >= self._max_pending:
                    raise CommandQueueFullError(
                        f"{device_id} has {pending} pending commands (at most "
                        f"{self._max_pending}); wait for answers or expiry"
                    )
                row = self._db.execute(
                    "SELECT last FROM sequences WHERE device_id = ?", (device_id,)
                ).fetchone()
                sequence = (row[0] if row else 0) + 1
                self._db.execute(
                    "INSERT INTO sequences (device_id, last) VALUES (?, ?) "
                    "ON CONFLICT (device_id) DO UPDATE SET last = excluded.last",
                    (device_id, sequence),
                )
                self._db.execute(
                    _INSERT,
                    (command_id, device_id, name, json.dumps(args), sequence, issued, expires),
                )
                return int(sequence)
        except sqlite3.Error as exc:
            raise DiagnosticsError(f"diagnostics state failed: {exc}") from exc

    def discard(self, command_id: str) -> None:
        """Forget a command that was never published (signing or publishing failed).

        Raises:
            DiagnosticsError: the file failed.
        """
        self._run("DELETE FROM commands WHERE id = ? AND state = 'pending'", (command_id,))

    def get(self, command_id: str, device_id: str | None = None) -> CommandRecord:
        """One command (of ``device_id`` when given).

        Raises:
            UnknownCommandRecordError: no such command (for that device).
            DiagnosticsError: the file failed.
        """
        rows = self._run(_SELECT_BY_ID, (command_id,))
        if not rows or (device_id is not None and rows[0][1] != device_id):
            raise UnknownCommandRecordError(f"no command {command_id[:40]!r}")
        return _record(rows[0])

    def find(self, command_id: str) -> CommandRecord | None:
        """One command, or None.

        Raises:
            DiagnosticsError: the file failed.
        """
        rows = self._run(_SELECT_BY_ID, (command_id,))
        return _record(rows[0]) if rows else None

    def of_device(self, device_id: str, limit: int = 100) -> list[CommandRecord]:
        """A device's newest commands first.

        Raises:
            DiagnosticsError: the file failed.
        """
        rows = self._run(
            _SELECT_BY_DEVICE,
            (device_id, limit),
        )
        return [_record(r) for r in rows]

    def in_state(self, state: str) -> list[CommandRecord]:
        """Every command in ``state``.

        Raises:
            DiagnosticsError: the file failed.
        """
        rows = self._run(_SELECT_BY_STATE, (state,))
        return [_record(r) for r in rows]

    def settle(
        self,
        command_id: str,
        state: str,
        *,
        answer: dict[str, Any] | None = None,
        at: float | None = None,
        upload: dict[str, Any] | None = None,
        from_states: tuple[str] | tuple[str, str] = ("pending",),
    ) -> bool:
        """Move a command from one of ``from_states`` (one or two) to ``state``; False if it
        was in neither (answered twice, already expired).

        Raises:
            DiagnosticsError: the file failed.
        """
        try:
            with self._lock, self._db:
                cur = self._db.execute(
                    _SETTLE,
                    (
                        state,
                        None if answer is None else json.dumps(answer),
                        at,
                        None if upload is None else json.dumps(upload),
                        command_id,
                        from_states[0],
                        from_states[-1],
                    ),
                )
                return cur.rowcount == 1
        except sqlite3.Error as exc:
            raise DiagnosticsError(f"diagnostics state failed: {exc}") from exc

    def expire(self, now: float) -> list[str]:
        """Mark every pending command past its expiry ``expired``; drop rows past retention.

        Returns:
            The ids expired now.

        Raises:
            DiagnosticsError: the file failed.
        """
        rows = self._run(
            "UPDATE commands SET state = 'expired' WHERE state = 'pending' AND expires <= ? "
            "RETURNING id",
            (now,),
        )
        self._run("DELETE FROM commands WHERE issued < ?", (now - RETENTION_SECONDS,))
        return [r[0] for r in rows]
