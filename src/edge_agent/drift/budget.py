"""``WindowBudget``: how many drift windows one tensor may close, as a token bucket.

Owns the adaptation rule that keeps drift telemetry bounded under traffic. A closed window
costs the same bytes on the link whatever its row count (its view is counts over fixed bins),
so what a device sends grows with the number of windows, not with its traffic. With fixed
windows (``max_values`` rows or ``max_seconds``), a busy device closes one every
``max_values / rate`` seconds: without bound. The budget allows ``per_hour`` windows an hour on
average and ``burst`` in a row: while it has credit a window closes exactly when the fixed
policy says (so a quiet device, whose windows are already rarer than the budget, keeps today's
alarm latency), and once it has none the due window stays open and keeps counting rows until
the next credit accrues (at ``3600 / per_hour`` seconds a window, the window grows with the
traffic). Windows per day are then at most ``burst + 24 * per_hour`` per tensor.

Statistics: thresholds are calibrated to each window's row count (``thresholds``), so a larger
window keeps its per-window false-alarm rate at ``alpha`` and detects smaller shifts; fewer
windows per day means fewer false alarms per day.

Does not own the window policy itself (``monitor``) or any clock: ``now`` is passed in
(seconds, monotonic). A clock that steps back refills nothing.
"""

from __future__ import annotations

import math

__all__ = ["WindowBudget"]

_EPS = 1e-9


class WindowBudget:
    """A token bucket of window closes: ``per_hour`` on average, at most ``burst`` in a row.

    Starts full (a fresh monitor reacts as fast as the fixed policy). Not thread-safe (one per
    tensor of a ``DriftMonitor``).

    Args:
        per_hour: windows an hour on average (> 0).
        burst: windows that may close in a row after a quiet spell (>= 1).

    Raises:
        ValueError: (from the constructor) ``per_hour`` not positive and finite, ``burst`` < 1.
    """

    def __init__(self, per_hour: float, burst: int) -> None:
        if not (math.isfinite(per_hour) and per_hour > 0):
            raise ValueError(f"per_hour must be positive, got {per_hour}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self._rate = per_hour / 3600.0
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at: float | None = None

    def available(self, now: float) -> float:
        """Credit at ``now``, in windows (at most ``burst``)."""
        self._refill(now)
        return self._tokens

    def take(self, now: float) -> bool:
        """Spend one window's credit if there is a whole one at ``now``; True if spent."""
        self._refill(now)
        if self._tokens < 1.0 - _EPS:  # 180 s at 20 an hour is one window, not 0.999...
            return False
        self._tokens = max(0.0, self._tokens - 1.0)
        return True

    def _refill(self, now: float) -> None:
        if self._at is None:
            self._at = now
            return
        if now > self._at:
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
            self._at = now
