"""One periodic background thread, shared by the fleet server's jobs.

Owns ``PeriodicJob``: a daemon thread that waits ``interval`` seconds, runs one tick, and
repeats until ``close``; an optional leader lock asked before each tick (a tick is skipped
while another worker holds it) and released on ``close``; and the error boundary around a
tick: an ``EdgefleetError`` is logged as a warning with its code, anything else with its
traceback, both are counted, and the next tick retries. The wait is injected (default: the
stop event's own ``wait``), so tests drive ticks without sleeping.

Does not own what a tick does (the rollout runner's ``step``, the history job's ``run_once``)
or how leadership is decided (``fleet_server.jobs.leader``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.errors import EdgefleetError
from fleet_server.jobs.leader import LeaderLock

__all__ = ["JobStats", "PeriodicJob", "Wait"]

#: Waits up to ``seconds`` or until ``stop`` is set; True when stopped (``Event.wait``'s answer).
Wait = Callable[[threading.Event, float], bool]


def _event_wait(stop: threading.Event, seconds: float) -> bool:
    return stop.wait(seconds)


@dataclass(frozen=True)
class JobStats:
    """What a ``PeriodicJob`` has done since it was created.

    Attributes:
        ticks: ticks run to the end without an error.
        skipped: ticks skipped because another worker held the lock.
        failures: ticks that raised (logged; the next tick retries).
    """

    ticks: int = 0
    skipped: int = 0
    failures: int = 0


class PeriodicJob:
    """Runs ``tick`` every ``interval`` seconds in a daemon thread (see the module docstring)."""

    def __init__(
        self,
        name: str,
        tick: Callable[[], object],
        *,
        interval: float,
        lock: LeaderLock | None = None,
        what: str = "",
        wait: Wait = _event_wait,
        logger: logging.Logger | None = None,
    ) -> None:
        """Prepare the job; nothing runs until ``start`` (or ``run_tick``).

        Args:
            name: The thread's name.
            tick: One unit of work; its result is ignored.
            interval: Seconds waited before each tick (also before the first).
            lock: If given, asked before each tick and released on ``close``.
            what: What a tick is called in log lines (default: ``name``).
            wait: How the thread waits between ticks (tests inject a fake).
            logger: Where failures are logged (default: this module's logger), so they keep
                the owning job's logger name.
        """
        self._name = name
        self._what = what or name
        self._tick = tick
        self._interval = interval
        self._lock = lock
        self._wait = wait
        self._log = logger or logging.getLogger(__name__)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counts = threading.Lock()
        self._stats = JobStats()

    @property
    def stats(self) -> JobStats:
        """A snapshot of the counters."""
        with self._counts:
            return self._stats

    def start(self) -> None:
        """Start the thread (no-op while it runs)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread after its current tick, wait up to ``timeout``, release the lock."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._lock is not None:
            self._lock.release()

    def run_tick(self) -> bool:
        """One tick as the thread runs it: lock, tick, error boundary. Never raises.

        Returns:
            True when the tick ran without an error; False when it was skipped or failed.
        """
        if self._lock is not None and not self._lock.try_acquire():
            self._count(skipped=1)
            return False
        try:
            self._tick()
        except EdgefleetError as exc:
            self._log.warning("%s failed [%s]: %s", self._what, exc.code, exc)
        except Exception:
            self._log.exception("%s crashed; the next tick retries", self._what)
        else:
            self._count(ticks=1)
            return True
        self._count(failures=1)
        return False

    def _loop(self) -> None:
        while not self._wait(self._stop, self._interval):
            self.run_tick()

    def _count(self, *, ticks: int = 0, skipped: int = 0, failures: int = 0) -> None:
        with self._counts:
            s = self._stats
            self._stats = JobStats(s.ticks + ticks, s.skipped + skipped, s.failures + failures)
