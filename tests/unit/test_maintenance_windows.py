"""Maintenance windows: opening and closing in their own time zone, across DST and midnight,
on a fake clock stepped through simulated weeks; the definition's hostile table."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from clock import FakeClock
from fleet_server.errors import LabelError, SelectorSyntaxError, WindowInvalidError
from fleet_server.rollouts.label_selector import LabelSelector
from fleet_server.rollouts.windows import MaintenanceWindow, window_opens_at

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def window(
    start: str = "02:00",
    minutes: int = 60,
    days: list[str] | None = None,
    tz: str = "Europe/Berlin",
    selector: str = "site=b",
    name: str = "night",
) -> MaintenanceWindow:
    d: dict[str, object] = {
        "name": name,
        "selector": selector,
        "start": start,
        "duration_minutes": minutes,
        "timezone": tz,
    }
    if days is not None:
        d["weekdays"] = days
    return MaintenanceWindow.from_dict(d)


def local(zone: ZoneInfo, *args: int) -> datetime:
    return datetime(*args, tzinfo=zone).astimezone(UTC)  # type: ignore[misc]


def open_spans(w: MaintenanceWindow, start: datetime, days: int, step_minutes: int = 5) -> list:
    """(opened, closed) pairs seen by stepping a fake clock every ``step_minutes``."""
    clock = FakeClock(wall=start)
    spans: list[list[datetime]] = []
    was = False
    for _ in range(days * 24 * 60 // step_minutes):
        now = clock.wall()
        is_open = w.is_open(now)
        if is_open and not was:
            spans.append([now, now])
        if was and not is_open:
            spans[-1][1] = now
        was = is_open
        clock.advance(step_minutes * 60)
    return [tuple(s) for s in spans]


def test_a_weekday_window_opens_and_closes_at_local_time() -> None:
    w = window(days=["mon", "tue", "wed", "thu", "fri"])
    monday = local(BERLIN, 2027, 1, 4, 2, 0)  # winter: UTC+1
    assert monday == datetime(2027, 1, 4, 1, 0, tzinfo=UTC)
    assert not w.is_open(monday - timedelta(seconds=1))
    assert w.is_open(monday)
    assert w.is_open(monday + timedelta(minutes=59, seconds=59))
    assert not w.is_open(monday + timedelta(minutes=60))
    friday_after = local(BERLIN, 2027, 1, 8, 3, 0)
    assert w.next_open(friday_after) == local(BERLIN, 2027, 1, 11, 2, 0)  # not Sat/Sun
    assert w.next_open(monday + timedelta(minutes=10)) == monday + timedelta(minutes=10)


def test_a_window_runs_past_midnight_into_the_next_day() -> None:
    w = window(start="23:00", minutes=180, days=["fri"])
    assert w.is_open(local(BERLIN, 2027, 1, 9, 1, 30))  # Saturday 01:30
    assert not w.is_open(local(BERLIN, 2027, 1, 9, 2, 0))
    assert not w.is_open(local(BERLIN, 2027, 1, 8, 1, 30))  # Friday 01:30: Thursday is not a day


def test_every_opening_lasts_its_duration_through_two_weeks_with_both_dst_changes() -> None:
    # Europe/Berlin: spring forward 2027-03-28, fall back 2027-10-31.
    for start in (datetime(2027, 3, 21, tzinfo=UTC), datetime(2027, 10, 24, tzinfo=UTC)):
        w = window(start="02:30", minutes=60)
        spans = open_spans(w, start, 14)
        assert len(spans) == 14  # one opening a day, the change day included
        assert all(b - a == timedelta(minutes=60) for a, b in spans)


def test_a_start_inside_the_spring_forward_gap_opens_an_hour_later_on_the_clock() -> None:
    w = window(start="02:30", minutes=60)
    opening = w.next_open(datetime(2027, 3, 28, 0, 0, tzinfo=UTC))
    assert opening == datetime(2027, 3, 28, 1, 30, tzinfo=UTC)
    assert opening.astimezone(BERLIN).strftime("%H:%M %Z") == "03:30 CEST"
    # The days around it open at 02:30 local, in their own offsets.
    assert w.next_open(datetime(2027, 3, 27, tzinfo=UTC)) == datetime(
        2027, 3, 27, 1, 30, tzinfo=UTC
    )
    assert w.next_open(datetime(2027, 3, 29, tzinfo=UTC)) == datetime(
        2027, 3, 29, 0, 30, tzinfo=UTC
    )


def test_a_start_in_the_repeated_fall_back_hour_opens_at_the_first_one() -> None:
    w = window(start="02:30", minutes=60)
    opening = w.next_open(datetime(2027, 10, 31, 0, 0, tzinfo=UTC))
    assert opening == datetime(2027, 10, 31, 0, 30, tzinfo=UTC)  # 02:30 CEST
    assert opening.astimezone(BERLIN).strftime("%H:%M %Z") == "02:30 CEST"
    assert not w.is_open(datetime(2027, 10, 31, 1, 30, tzinfo=UTC))  # the second 02:30 CET


def test_new_york_follows_its_own_dst_dates() -> None:
    w = window(start="01:00", minutes=30, tz="America/New_York", days=["sun"])
    before = w.next_open(datetime(2027, 3, 7, tzinfo=UTC))  # EST
    after = w.next_open(datetime(2027, 3, 14, 7, 0, tzinfo=UTC))  # the change day, 03:00 EDT
    assert before == datetime(2027, 3, 7, 6, 0, tzinfo=UTC)
    assert after == datetime(2027, 3, 21, 5, 0, tzinfo=UTC)  # EDT
    assert w.next_open(datetime(2027, 3, 14, tzinfo=UTC)) == datetime(2027, 3, 14, 6, 0, tzinfo=UTC)


def test_window_opens_at_over_the_windows_that_apply() -> None:
    now = local(BERLIN, 2027, 1, 4, 12, 0)
    night = window(start="02:00", selector="site=b")
    noon = window(name="noon", start="11:30", minutes=60, selector="site=b,line=1")
    other = window(name="other", start="05:00", selector="site=c")
    ws = [night, noon, other]
    assert window_opens_at(ws, {"site": "a"}, now) is None  # no window applies: any time
    assert window_opens_at(ws, {"site": "b", "line": "1"}, now) is None  # noon is open
    assert window_opens_at(ws, {"site": "b"}, now) == local(BERLIN, 2027, 1, 5, 2, 0)
    assert window_opens_at(ws, {"site": "c"}, now) == local(BERLIN, 2027, 1, 5, 5, 0)


def test_round_trip_through_the_dict_form() -> None:
    w = window(days=["sun", "mon"])
    assert MaintenanceWindow.from_dict(w.to_dict()) == w
    assert w.to_dict()["weekdays"] == ["mon", "sun"]
    assert w.start == time(2, 0)


BASE = {
    "name": "w",
    "selector": "site=b",
    "start": "02:00",
    "duration_minutes": 60,
    "timezone": "Europe/Berlin",
}
HOSTILE = [
    ({"timezone": "Mars/Olympus_Mons"}, WindowInvalidError, "IANA"),
    ({"timezone": "../../etc/passwd"}, WindowInvalidError, "IANA"),
    ({"timezone": "/etc/localtime"}, WindowInvalidError, "IANA"),
    ({"timezone": ""}, WindowInvalidError, "IANA"),
    ({"timezone": "x" * 500}, WindowInvalidError, "IANA"),
    ({"timezone": 3}, WindowInvalidError, "IANA"),
    ({"start": "24:00"}, WindowInvalidError, "HH:MM"),
    ({"start": "7:00"}, WindowInvalidError, "HH:MM"),
    ({"start": "07:60"}, WindowInvalidError, "HH:MM"),
    ({"start": 700}, WindowInvalidError, "HH:MM"),
    ({"duration_minutes": 0}, WindowInvalidError, "duration"),
    ({"duration_minutes": 7 * 24 * 60 + 1}, WindowInvalidError, "duration"),
    ({"duration_minutes": True}, WindowInvalidError, "duration"),
    ({"duration_minutes": 60.5}, WindowInvalidError, "duration"),
    ({"weekdays": []}, WindowInvalidError, "weekday"),
    ({"weekdays": ["funday"]}, WindowInvalidError, "weekday"),
    ({"weekdays": "mon;tue"}, WindowInvalidError, "weekday"),
    ({"weekdays": [1, 2]}, WindowInvalidError, "weekdays"),
    ({"name": "Bad Name"}, WindowInvalidError, "name"),
    ({"name": "x" * 65}, WindowInvalidError, "name"),
    ({"extra": 1}, WindowInvalidError, "fields"),
    ({"selector": ""}, SelectorSyntaxError, "requirement"),
    ({"selector": "site="}, SelectorSyntaxError, "value"),
]


@pytest.mark.parametrize(("change", "error", "says"), HOSTILE)
def test_hostile_window_definitions_are_refused(
    change: dict[str, object], error: type[LabelError], says: str
) -> None:
    with pytest.raises(error) as err:
        MaintenanceWindow.from_dict({**BASE, **change})
    assert says in str(err.value)


def test_a_missing_field_is_refused() -> None:
    for key in ("name", "selector", "start", "duration_minutes", "timezone"):
        with pytest.raises(WindowInvalidError):
            MaintenanceWindow.from_dict({k: v for k, v in BASE.items() if k != key})


def test_the_selector_is_kept_parsed() -> None:
    assert window(selector="site in (a,b)").selector == LabelSelector.parse("site in (b,a)")
