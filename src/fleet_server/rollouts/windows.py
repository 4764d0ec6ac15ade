"""Maintenance windows: when a device may install, in its own time zone (pure).

Owns ``MaintenanceWindow`` (a name, a label selector, a set of weekdays, a local start time, a
duration and an IANA time zone; ``to_dict``/``from_dict``), its clock arithmetic (``is_open``,
``next_open``) and ``window_opens_at`` (a device's verdict over every window that applies to it).

Rules, all on the clock passed in:
- A window opens on each of its weekdays at ``start`` local time in ``timezone`` and stays open
  ``duration_minutes`` of elapsed time (a window may run past midnight: ``fri 23:00`` for 180
  minutes closes Saturday 02:00).
- Daylight-saving time comes from ``zoneinfo``. A start that does not exist that day (inside the
  spring-forward gap) opens at the same wall-clock offset from before the change, i.e. one hour
  later on the clock (02:30 becomes 03:30); a start that exists twice (the fall-back hour) opens
  at the first one. The duration is elapsed time, so a 2-hour window across the change is still
  2 hours.
- A device to which no window applies may install at any time; to which several apply, inside
  any of them.

Does not own which devices a window applies to (the runner matches the selector against the
device's labels) nor holding an assignment (``fleet_server.rollouts.holds``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fleet_server.errors import WindowInvalidError
from fleet_server.rollouts.label_selector import LabelSelector

__all__ = ["MAX_WINDOW_MINUTES", "WEEKDAYS", "MaintenanceWindow", "window_opens_at"]

WEEKDAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
#: A window lasts at most a week (longer would be "always").
MAX_WINDOW_MINUTES: Final = 7 * 24 * 60
_NAME: Final = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?")
_START: Final = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")


def _zone(name: object) -> ZoneInfo:
    if not isinstance(name, str) or not 0 < len(name) <= 64 or ".." in name or name[0] == "/":
        raise WindowInvalidError(f"time zone {str(name)[:64]!r} is not an IANA zone name")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise WindowInvalidError(f"time zone {name[:64]!r} is not an IANA zone name") from exc


@dataclass(frozen=True)
class MaintenanceWindow:
    """A recurring window (see the module docstring). Build with ``from_dict`` or directly."""

    name: str
    selector: LabelSelector
    weekdays: frozenset[int]  # 0 = Monday
    start: time
    duration_minutes: int
    timezone: str

    def __post_init__(self) -> None:
        """Raises: WindowInvalidError (a bad name, no weekday, a duration out of range, an
        unknown time zone)."""
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise WindowInvalidError(
                f"window name {str(self.name)[:80]!r} is not 1-64 of [a-z0-9._-]"
            )
        if not self.weekdays or not self.weekdays <= frozenset(range(7)):
            raise WindowInvalidError("a window needs at least one weekday")
        d = self.duration_minutes
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_WINDOW_MINUTES:
            raise WindowInvalidError(f"duration_minutes must be in [1, {MAX_WINDOW_MINUTES}]")
        _zone(self.timezone)

    @property
    def zone(self) -> ZoneInfo:
        """The window's time zone."""
        return ZoneInfo(self.timezone)

    def _opening(self, day: date) -> datetime:
        """The UTC instant the window opens on local ``day`` (see the DST rules)."""
        local = datetime.combine(day, self.start, tzinfo=self.zone)  # fold=0: the first
        # A nonexistent local time converts with the offset from before the change: one hour
        # later on the wall clock after the round trip, which is the documented behaviour.
        return local.astimezone(UTC)

    def _openings(self, now: datetime, days: Iterable[int]) -> Iterable[datetime]:
        today = now.astimezone(self.zone).date()
        for k in days:
            day = today + timedelta(days=k)
            if day.weekday() in self.weekdays:
                yield self._opening(day)

    def is_open(self, now: datetime) -> bool:
        """True when ``now`` (aware) is inside an opening of the window."""
        length = timedelta(minutes=self.duration_minutes)
        back = -(self.duration_minutes // 1440) - 2
        return any(o <= now < o + length for o in self._openings(now, range(back, 1)))

    def next_open(self, now: datetime) -> datetime:
        """The window's next opening after ``now`` (``now`` itself while it is open)."""
        if self.is_open(now):
            return now
        return min(o for o in self._openings(now, range(-1, 9)) if o > now)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (the admin API's and the registry's form)."""
        return {
            "name": self.name,
            "selector": str(self.selector),
            "weekdays": [WEEKDAYS[d] for d in sorted(self.weekdays)],
            "start": self.start.strftime("%H:%M"),
            "duration_minutes": self.duration_minutes,
            "timezone": self.timezone,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MaintenanceWindow:
        """Parse an operator's or a stored definition.

        Raises:
            WindowInvalidError: a missing, unknown or bad field.
            SelectorSyntaxError: the selector does not parse.
        """
        keys = {"name", "selector", "weekdays", "start", "duration_minutes", "timezone"}
        if not isinstance(d, Mapping) or set(d) - keys or keys - set(d) - {"weekdays"}:
            raise WindowInvalidError(f"a window has exactly the fields {sorted(keys)}")
        days = d.get("weekdays", list(WEEKDAYS))
        if isinstance(days, str):
            days = [p.strip() for p in days.split(",")]
        if not isinstance(days, list) or not all(isinstance(x, str) for x in days):
            raise WindowInvalidError("weekdays is a list of mon..sun")
        unknown = [x for x in days if x.lower() not in WEEKDAYS]
        if unknown:
            raise WindowInvalidError(f"unknown weekday {unknown[0][:16]!r} (mon..sun)")
        start = d["start"]
        m = _START.fullmatch(start) if isinstance(start, str) else None
        if m is None:
            raise WindowInvalidError(f"start {str(start)[:16]!r} is not HH:MM (00:00-23:59)")
        selector = LabelSelector.parse(d["selector"])
        return cls(
            name=d["name"],
            selector=selector,
            weekdays=frozenset(WEEKDAYS.index(x.lower()) for x in days),
            start=time(int(m.group(1)), int(m.group(2))),
            duration_minutes=d["duration_minutes"],
            timezone=d["timezone"],
        )


def window_opens_at(
    windows: Iterable[MaintenanceWindow], labels: Mapping[str, str], now: datetime
) -> datetime | None:
    """When a device with ``labels`` may next install: None if now (no window applies, or one
    that applies is open), else the earliest opening of the windows that apply."""
    applying = [w for w in windows if w.selector.matches(labels)]
    if not applying or any(w.is_open(now) for w in applying):
        return None
    return min(w.next_open(now) for w in applying)
