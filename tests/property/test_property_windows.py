"""Maintenance windows, as properties over random windows, instants and time zones (with
daylight-saving changes of one hour, half an hour and at midnight): ``next_open`` is ``now``
exactly when the window is open; otherwise it is later, the window is open at it and closed
just before it; and every opening lasts its duration."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

from hypothesis import given
from hypothesis import strategies as st

from fleet_server.rollouts.label_selector import LabelSelector
from fleet_server.rollouts.windows import MAX_WINDOW_MINUTES, MaintenanceWindow

ZONES = (
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",  # a 30-minute DST shift
    "America/Santiago",  # changes at midnight
    "Asia/Kolkata",  # +05:30, no DST
    "Pacific/Chatham",  # +12:45 / +13:45
)
SEL = LabelSelector.parse("site=a")

windows = st.builds(
    MaintenanceWindow,
    name=st.just("w"),
    selector=st.just(SEL),
    weekdays=st.frozensets(st.integers(0, 6), min_size=1),
    start=st.builds(time, st.integers(0, 23), st.sampled_from([0, 15, 30, 45, 59])),
    duration_minutes=st.one_of(st.integers(1, 240), st.integers(1, MAX_WINDOW_MINUTES)),
    timezone=st.sampled_from(ZONES),
)
instants = st.datetimes(
    min_value=datetime(2026, 1, 1), max_value=datetime(2029, 1, 1), timezones=st.just(UTC)
)


@given(windows, instants)
def test_next_open_is_now_exactly_while_open(w: MaintenanceWindow, now: datetime) -> None:
    nxt = w.next_open(now)
    if w.is_open(now):
        assert nxt == now
    else:
        assert nxt > now
        assert nxt - now <= timedelta(days=8)
        assert w.is_open(nxt)
        assert not w.is_open(nxt - timedelta(seconds=1))


@given(windows, instants)
def test_an_opening_lasts_its_duration(w: MaintenanceWindow, now: datetime) -> None:
    opened = w.next_open(now)
    if opened == now:
        return  # mid-opening: its start is not known here
    length = timedelta(minutes=w.duration_minutes)
    assert w.is_open(opened + length - timedelta(seconds=1))
    if len(w.weekdays) == 1 and w.duration_minutes <= 240:
        # Openings a week apart: closed the moment it ends (long windows on adjacent days may
        # run into the next opening).
        assert not w.is_open(opened + length)
