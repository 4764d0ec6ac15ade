"""The agent's recent log records in memory: a bounded ring a remote ``logs`` command reads.

Owns ``LogRing``, a ``logging.Handler`` that keeps the newest records (at most ``max_records``
and ``max_bytes`` of message text, each message cut to ``MAX_MESSAGE_CHARS``) and ``query``,
which filters them by level and time and bounds the answer. Embedded agents log to
stderr/journald; reading journald needs privileges and a library the agent does not have, and
a log file may be rotated away or not exist, so the ring is the one source that is always
there and costs a fixed amount of memory whatever the log rate. The ring is lost on restart
(journald keeps the full history).

Does not format for the console (``edge_agent.daemon.setup_logging`` installs both) or talk
MQTT.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Final

__all__ = ["LEVELS", "MAX_MESSAGE_CHARS", "LogRecordView", "LogRing"]

MAX_MESSAGE_CHARS: Final = 2048
LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


@dataclass(frozen=True)
class LogRecordView:
    """One kept record: time (UNIX seconds), level name, logger and message text."""

    ts: float
    level: str
    logger: str
    msg: str

    def to_dict(self) -> dict[str, object]:
        """JSON-safe form (the ``logs`` answer and the support bundle's ``logs.jsonl``)."""
        return {
            "ts": round(self.ts, 3),
            "level": self.level,
            "logger": self.logger,
            "msg": self.msg,
        }

    @property
    def size(self) -> int:
        """Bytes this record counts against a budget (UTF-8 of logger and message, plus 32)."""
        return len(self.msg.encode("utf-8", "replace")) + len(self.logger) + 32


class LogRing(logging.Handler):
    """Keeps the newest records; thread-safe (``logging`` calls ``emit`` from any thread)."""

    def __init__(
        self, max_records: int = 5000, max_bytes: int = 1024 * 1024, level: int = logging.DEBUG
    ) -> None:
        super().__init__(level)
        if max_records < 1 or max_bytes < 1024:
            raise ValueError("a log ring keeps at least 1 record and 1 KiB")
        self._max_records = max_records
        self._max_bytes = max_bytes
        self._records: deque[LogRecordView] = deque()
        self._bytes = 0
        self._ring_lock = threading.Lock()
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        """Keep ``record`` (its formatted message, cut), dropping the oldest beyond the bounds."""
        try:
            msg = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                msg = f"{msg} [{type(record.exc_info[1]).__name__}: {record.exc_info[1]}]"
        except Exception:  # a bad format string in someone's log call must not break logging
            msg = str(record.msg)
        view = LogRecordView(
            record.created, record.levelname.lower(), record.name[:128], msg[:MAX_MESSAGE_CHARS]
        )
        with self._ring_lock:
            self._records.append(view)
            self._bytes += view.size
            while len(self._records) > self._max_records or self._bytes > self._max_bytes:
                self._bytes -= self._records.popleft().size
                self.dropped += 1

    def query(
        self, *, level: str = "debug", since: float = 0.0, max_lines: int, max_bytes: int
    ) -> tuple[list[LogRecordView], bool]:
        """The newest records at or above ``level`` and at or after ``since``, oldest first,
        at most ``max_lines`` of them and ``max_bytes`` by ``LogRecordView.size``.

        Returns:
            (records, truncated): ``truncated`` when older matching records were left out.

        Raises:
            KeyError: ``level`` is not one of ``LEVELS``.
        """
        floor = LEVELS[level]
        with self._ring_lock:
            records = list(self._records)
        out: list[LogRecordView] = []
        used = 0
        truncated = False
        for view in reversed(records):
            if view.ts < since:
                break
            if LEVELS.get(view.level, logging.CRITICAL) < floor:
                continue
            if len(out) >= max_lines or used + view.size > max_bytes:
                truncated = True
                break
            out.append(view)
            used += view.size
        out.reverse()
        return out, truncated
