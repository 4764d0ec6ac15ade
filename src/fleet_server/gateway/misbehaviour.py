"""Per-device misbehaviour counters and presence: which device does what the gateway refuses.

Owns ``MisbehaviourBook``: refusals counted by device and reason (rate limited, malformed,
oversized, a foreign bundle asked for, an entry the database refused, ...), bounded in memory
(at most ``max_devices`` devices; when full, the device with the fewest refusals is forgotten
and counted in ``evicted``), with a ``top(n)`` view for metrics (a bounded label set) and the
CLI. And ``PresenceBook``: a device is online when its latest status says ``online`` *and*
the gateway received a live (not retained) message from it within ``timeout`` seconds; a
device cannot keep itself "online" with a retained status while no agent runs, and a retained
status replayed to a restarted server proves nothing until the device speaks.

Counters live in one gateway worker's memory (each worker counts what it received; they reset
with the process). Does not decide what to refuse (the gateway does) and does no I/O.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Final

from edge_agent.wire.telemetry import StatusMessage

__all__ = ["DeviceMisbehaviour", "MisbehaviourBook", "PresenceBook"]

DEFAULT_MAX_DEVICES: Final = 10_000


@dataclass(frozen=True)
class DeviceMisbehaviour:
    """One device's refusals since this worker started.

    Attributes:
        device_id: the device (from its topic, i.e. its certificate).
        total: refusals of every reason.
        reasons: refusals by reason.
        last_at: wall-clock time of the latest refusal (seconds).
        last_reason: the latest refusal's reason.
    """

    device_id: str
    total: int
    reasons: Mapping[str, int] = field(default_factory=dict)
    last_at: float = 0.0
    last_reason: str = ""

    def to_dict(self) -> dict[str, object]:
        """JSON-safe dict (the admin API's form)."""
        return {
            "device_id": self.device_id,
            "total": self.total,
            "reasons": dict(sorted(self.reasons.items())),
            "last_at": self.last_at,
            "last_reason": self.last_reason,
        }


class MisbehaviourBook:
    """Bounded per-device refusal counters (see the module docstring). Thread-safe.

    Args:
        max_devices: most devices remembered at once.
        clock: wall clock (seconds).
    """

    def __init__(
        self, max_devices: int = DEFAULT_MAX_DEVICES, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._max = max(1, max_devices)
        self._clock = clock
        self._lock = threading.Lock()
        self._reasons: dict[str, Counter[str]] = {}
        self._last: dict[str, tuple[float, str]] = {}
        self._evicted = 0

    def add(self, device_id: str, reason: str, n: int = 1) -> None:
        """Count ``n`` refusals of ``reason`` for ``device_id``."""
        if n <= 0:
            return
        now = self._clock()
        with self._lock:
            counts = self._reasons.get(device_id)
            if counts is None:
                if len(self._reasons) >= self._max:
                    self._evict()
                counts = self._reasons[device_id] = Counter()
            counts[reason] += n
            self._last[device_id] = (now, reason)

    def of(self, device_id: str) -> DeviceMisbehaviour:
        """One device's counters (all zero if it never misbehaved here)."""
        with self._lock:
            return self._view(device_id)

    def top(self, n: int) -> list[DeviceMisbehaviour]:
        """The ``n`` devices with the most refusals, most first (ties by id)."""
        with self._lock:
            ranked = sorted(self._reasons, key=lambda d: (-self._reasons[d].total(), d))
            return [self._view(d) for d in ranked[: max(0, n)]]

    @property
    def evicted(self) -> int:
        """Devices forgotten to stay within ``max_devices``."""
        with self._lock:
            return self._evicted

    def _view(self, device_id: str) -> DeviceMisbehaviour:
        counts = self._reasons.get(device_id, Counter())
        at, reason = self._last.get(device_id, (0.0, ""))
        return DeviceMisbehaviour(device_id, counts.total(), dict(counts), at, reason)

    def _evict(self) -> None:
        victim = min(self._reasons, key=lambda d: (self._reasons[d].total(), self._last[d][0]))
        del self._reasons[victim]
        del self._last[victim]
        self._evicted += 1


class PresenceBook:
    """Online/offline per device from its status and live traffic. Thread-safe.

    Args:
        timeout: seconds of silence after which an ``online`` status no longer counts.
        monotonic: clock for the silence.
    """

    def __init__(self, timeout: float, *, monotonic: Callable[[], float] = time.monotonic):
        self._timeout = timeout
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._status: dict[str, StatusMessage] = {}
        self._heard: dict[str, float] = {}

    def heard(self, device_id: str) -> None:
        """A live (not retained) message from the device arrived now."""
        now = self._monotonic()
        with self._lock:
            self._heard[device_id] = now

    def status(self, device_id: str, status: StatusMessage | None) -> None:
        """The device's latest status (None: its retained status was cleared)."""
        with self._lock:
            if status is None:
                self._status.pop(device_id, None)
                self._heard.pop(device_id, None)
            else:
                self._status[device_id] = status

    def view(self) -> dict[str, StatusMessage]:
        """Every device's effective status: ``online`` only if it also spoke recently."""
        now = self._monotonic()
        with self._lock:
            out: dict[str, StatusMessage] = {}
            for device_id, status in self._status.items():
                heard = self._heard.get(device_id)
                stale = heard is None or now - heard > self._timeout
                out[device_id] = (
                    replace(status, state="offline", reason="connection_lost")
                    if status.state == "online" and stale
                    else status
                )
            return out
