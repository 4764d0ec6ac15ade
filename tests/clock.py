"""The one fake clock of the test suite: monotonic seconds and wall time that move only by hand.

Code under test takes its clock as a ``Callable[[], float]`` (monotonic seconds: rate limiters,
outbox, downloads, uplink, fallback) or a ``Callable[[], datetime]`` (wall time: registry,
history, rollouts). ``FakeClock`` is both: pass the clock itself (or ``clock.monotonic``) where
seconds are wanted, ``clock.wall`` where an aware UTC ``datetime`` is wanted, ``clock.time`` where
epoch seconds are wanted. Both readings come from one counter, so ``advance`` moves them together.

``tick`` makes every reading by the code under test first advance the clock (a clock that is never
read twice at the same instant, or where every run takes ``tick`` seconds); the test's own
``now`` and ``utc`` never tick. Readings are thread-safe.

It does not sleep, schedule or wake anything: a test that needs time to pass advances it.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

#: The wall time a fresh clock reads (an arbitrary, fixed instant).
WALL0 = datetime(2026, 6, 1, tzinfo=UTC)


class FakeClock:
    """A clock the test moves by hand (``advance``, or ``now += seconds``).

    Args:
        start: the monotonic reading at creation (seconds).
        wall: the wall time at creation (an aware ``datetime``).
        tick: seconds every reading through ``__call__``/``monotonic``/``time``/``wall``
            advances the clock by before it returns (0: readings do not move it).
    """

    def __init__(self, start: float = 1000.0, *, wall: datetime = WALL0, tick: float = 0.0) -> None:
        self.now = start
        self.tick = tick
        self._start = start
        self._wall0 = wall
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ test side
    def advance(self, seconds: float) -> None:
        """Move both readings forward by ``seconds``."""
        with self._lock:
            self.now += seconds

    @property
    def utc(self) -> datetime:
        """The current wall time, without ticking."""
        return self._wall0 + timedelta(seconds=self.now - self._start)

    def set_wall(self, when: datetime) -> None:
        """Move the clock so that the wall time reads ``when`` (may go backwards)."""
        with self._lock:
            self.now = self._start + (when - self._wall0).total_seconds()

    # ------------------------------------------------------------------ code side
    def _read(self) -> float:
        with self._lock:
            self.now += self.tick
            return self.now

    def __call__(self) -> float:
        """Monotonic seconds (the clock injected as ``Callable[[], float]``)."""
        return self._read()

    def monotonic(self) -> float:
        """Monotonic seconds, like ``time.monotonic``."""
        return self._read()

    def time(self) -> float:
        """Wall time as epoch seconds, like ``time.time``."""
        return self._wall0.timestamp() + (self._read() - self._start)

    def wall(self) -> datetime:
        """Wall time as an aware UTC ``datetime`` (the clock injected as ``() -> datetime``)."""
        return self._wall0 + timedelta(seconds=self._read() - self._start)
