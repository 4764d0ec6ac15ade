"""Maintenance windows and disruption budgets in the engine, on a fake clock across simulated
days: every assignment is sent inside the device's window (checked against local wall time,
across a DST change), the budget is never exceeded, held devices are sent when allowed, late
joiners enter at the next wave and never a wave already judged; abort and pause with held
devices."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from clock import FakeClock
from fleet_server.rollouts.engine import abort, decide, pause, resume
from fleet_server.rollouts.holds import HoldInputs
from fleet_server.rollouts.label_selector import LabelSelector
from fleet_server.rollouts.metrics import DeviceObservation, WindowMetrics
from fleet_server.rollouts.policy import DisruptionBudget, RolloutPolicy, Selector, Thresholds
from fleet_server.rollouts.state import Rollout
from fleet_server.rollouts.windows import MaintenanceWindow, window_opens_at

BERLIN = ZoneInfo("Europe/Berlin")
STEP = 300  # the runner's step on the fake clock, seconds
INSTALL = 600  # a device serves the new version this long after its assignment
QUIET = Thresholds(
    max_reject_rate_increase=None,
    max_fallback_rate_increase=None,
    max_drift_alert_share=None,
    max_p99_latency_ratio=None,
    max_error_rate_increase=None,
    max_output_shift=None,
    max_ground_truth_drop=None,
    max_shadow_disagreement_excess=None,
    max_shadow_disagreement=None,
)


def policy(**kw: object) -> RolloutPolicy:
    base: dict[str, object] = {
        "canary_fraction": 0.1,
        "steps": (0.5, 1.0),
        "dwell_seconds": 1800,
        "min_devices": 1,
        "thresholds": QUIET,
        "shadow_fraction": None,
        "offline": RolloutPolicy().offline,
    }
    base.update(kw)
    return RolloutPolicy(**base)  # type: ignore[arg-type]


def night_window(start: str = "02:00", minutes: int = 60) -> MaintenanceWindow:
    return MaintenanceWindow.from_dict(
        {
            "name": "night",
            "selector": "site=b",
            "start": start,
            "duration_minutes": minutes,
            "timezone": "Europe/Berlin",
        }
    )


@dataclass
class Fleet:
    """Simulated devices: v1 until assigned, v2 ``INSTALL`` seconds after, healthy."""

    labels: dict[str, dict[str, str]]
    windows: list[MaintenanceWindow] = field(default_factory=list)
    sent_at: dict[str, datetime] = field(default_factory=dict)
    reverted: set[str] = field(default_factory=set)

    def observations(self, now: datetime) -> list[DeviceObservation]:
        out = []
        for d in self.labels:
            sent = self.sent_at.get(d)
            if sent is not None and d not in self.reverted:
                done = (now - sent).total_seconds() >= INSTALL
                out.append(
                    DeviceObservation(
                        d,
                        active_version=2 if done else 1,
                        assigned_version=2,
                        outcome="installed" if done else "downloading",
                        metrics=WindowMetrics(reports=3, requests=500) if done else WindowMetrics(),
                    )
                )
            else:
                out.append(DeviceObservation(d, 1, 1, "installed", metrics=WindowMetrics(3, 500)))
        return out

    def holds(self, now: datetime) -> HoldInputs:
        opens = {
            d: t for d, lab in self.labels.items() if (t := window_opens_at(self.windows, lab, now))
        }
        return HoldInputs(labels=self.labels, opens_at=opens)

    def disrupted(self, now: datetime, settle: float) -> dict[str, int]:
        """The truth: devices per site mid-install or on probation now."""
        out: dict[str, int] = {}
        for d, sent in self.sent_at.items():
            if d not in self.reverted and (now - sent).total_seconds() < INSTALL + settle:
                site = self.labels[d].get("site", "")
                out[site] = out.get(site, 0) + 1
        return out


def run(
    r: Rollout,
    fleet: Fleet,
    clock: FakeClock,
    days: float,
    check: Callable[[datetime, Rollout, tuple[str, ...]], None] = lambda *a: None,
) -> Rollout:
    for _ in range(int(days * 86400 / STEP)):
        now = clock.wall()
        dec = decide(r, fleet.observations(now), now, holds=fleet.holds(now))
        for d in dec.assign:
            assert d not in fleet.sent_at, f"{d} assigned twice"
            fleet.sent_at[d] = now
        fleet.reverted |= set(dec.revert)
        check(now, dec.rollout, dec.assign)
        r = dec.rollout
        if r.state == "completed":
            break
        clock.advance(STEP)
    return r


def new(p: RolloutPolicy, selector: Selector | None = None) -> Rollout:
    return Rollout(
        id="ro-1",
        model="digits",
        from_version=1,
        to_version=2,
        selector=selector or Selector(group="g"),
        policy=p,
        created_at=datetime(2027, 1, 1, tzinfo=UTC),
    )


def sites(n: int, names: str = "ab") -> dict[str, dict[str, str]]:
    return {f"dev-{i:02d}": {"site": names[i % len(names)]} for i in range(n)}


def minutes_local(t: datetime) -> int:
    loc = t.astimezone(BERLIN)
    return loc.hour * 60 + loc.minute


# --------------------------------------------------------------------------- windows
def test_devices_with_a_window_install_only_inside_it_and_the_rollout_completes() -> None:
    fleet = Fleet(sites(20), [night_window()])
    clock = FakeClock(wall=datetime(2027, 1, 4, 11, 0, tzinfo=UTC))  # Monday noon in Berlin
    seen_held: list[str] = []

    def check(now: datetime, r: Rollout, sent: tuple[str, ...]) -> None:
        for d in sent:
            if fleet.labels[d]["site"] == "b":
                assert 120 <= minutes_local(now) < 180, f"{d} sent at {now.astimezone(BERLIN)}"
        if r.held:
            seen_held.extend(r.reasons)

    r = run(new(policy()), fleet, clock, days=5, check=check)
    assert r.state == "completed"
    assert set(fleet.sent_at) == set(fleet.labels)
    assert any("wait for a maintenance window, next opens 2027-01-05T01:00" in x for x in seen_held)
    # Site a was never held by site b's window: its first members went out at once.
    first = min(fleet.sent_at.values())
    assert first == datetime(2027, 1, 4, 11, 0, tzinfo=UTC)
    assert any(fleet.labels[d]["site"] == "a" for d, t in fleet.sent_at.items() if t == first)


def test_a_wave_with_held_members_keeps_dwelling_until_the_last_is_sent() -> None:
    fleet = Fleet(sites(20), [night_window()])
    clock = FakeClock(wall=datetime(2027, 1, 4, 11, 0, tzinfo=UTC))
    judged_while_held: list[int] = []

    def check(now: datetime, r: Rollout, sent: tuple[str, ...]) -> None:
        if r.held and r.state != "dwelling":
            judged_while_held.append(r.wave)

    r = run(new(policy()), fleet, clock, days=5, check=check)
    assert r.state == "completed"
    assert not judged_while_held
    # Each wave's dwell ran after its last member was sent: the rollout needed several nights.
    last = max(fleet.sent_at.values())
    assert last - min(fleet.sent_at.values()) > timedelta(days=1)


def test_windows_follow_local_time_across_the_spring_dst_change() -> None:
    # Europe/Berlin springs forward on Sunday 2027-03-28: 02:30 does not exist that day.
    fleet = Fleet({f"dev-{i:02d}": {"site": "b"} for i in range(12)}, [night_window("02:30")])
    clock = FakeClock(wall=datetime(2027, 3, 26, 12, 0, tzinfo=UTC))
    sends: list[datetime] = []

    def check(now: datetime, r: Rollout, sent: tuple[str, ...]) -> None:
        if sent:
            sends.append(now)
            loc = minutes_local(now)
            if now.astimezone(BERLIN).date().isoformat() == "2027-03-28":
                assert 210 <= loc < 270  # 03:30-04:30 CEST: the gap shifts the start
            else:
                assert 150 <= loc < 210  # 02:30-03:30 local

    r = run(new(policy(dwell_seconds=3600)), fleet, clock, days=6, check=check)
    assert r.state == "completed"
    assert any(s.astimezone(BERLIN).date().isoformat() == "2027-03-28" for s in sends)


# --------------------------------------------------------------------------- budgets
@pytest.mark.parametrize(
    "budget",
    [
        DisruptionBudget("site", max_devices=2, settle_seconds=300),
        DisruptionBudget("site", max_fraction=0.25, settle_seconds=900),
        DisruptionBudget("site", max_devices=1, settle_seconds=0),
    ],
)
def test_the_budget_is_never_exceeded_and_the_rollout_completes(budget: DisruptionBudget) -> None:
    fleet = Fleet(sites(30, "abc"))
    clock = FakeClock(wall=datetime(2027, 1, 4, 11, 0, tzinfo=UTC))
    peak: dict[str, int] = {}
    held_for_budget = []

    def check(now: datetime, r: Rollout, sent: tuple[str, ...]) -> None:
        for site, n in fleet.disrupted(now, budget.settle_seconds).items():
            assert n <= budget.limit(10), f"site {site}: {n} disrupted at {now}"
            peak[site] = max(peak.get(site, 0), n)
        held_for_budget.extend(d for d, why in r.held.items() if why == "budget")

    r = run(new(policy(disruption_budget=budget, steps=(1.0,))), fleet, clock, 3, check)
    assert r.state == "completed"
    assert set(fleet.sent_at) == set(fleet.labels)
    assert held_for_budget  # the last wave (10 per site) had to wait
    assert max(peak.values()) == budget.limit(10)  # and the budget was used, not starved
    assert r.released == {}  # the settled are forgotten: no second copy of the members
    assert r.settling == {}


def test_devices_without_the_label_share_one_budget() -> None:
    labels = {f"dev-{i:02d}": {} for i in range(6)}
    fleet = Fleet(labels)  # type: ignore[arg-type]
    clock = FakeClock(wall=datetime(2027, 1, 4, 11, 0, tzinfo=UTC))
    budget = DisruptionBudget("site", max_devices=1, settle_seconds=0)

    def check(now: datetime, r: Rollout, sent: tuple[str, ...]) -> None:
        assert sum(fleet.disrupted(now, 0).values()) <= 1

    r = run(new(policy(disruption_budget=budget, steps=(1.0,))), fleet, clock, 2, check)
    assert r.state == "completed"


def test_windows_and_budget_together() -> None:
    fleet = Fleet(sites(24, "bc"), [night_window(minutes=120)])
    clock = FakeClock(wall=datetime(2027, 1, 4, 11, 0, tzinfo=UTC))
    budget = DisruptionBudget("site", max_devices=3, settle_seconds=300)

    def check(now: datetime, r: Rollout, sent: tuple[str, ...]) -> None:
        for d in sent:
            if fleet.labels[d]["site"] == "b":
                assert 120 <= minutes_local(now) < 240
        assert all(n <= 3 for n in fleet.disrupted(now, 300).values())

    r = run(new(policy(disruption_budget=budget)), fleet, clock, days=6, check=check)
    assert r.state == "completed"


# --------------------------------------------------------------------------- late joiners
def test_a_device_that_starts_matching_joins_the_next_wave_never_a_judged_one() -> None:
    fleet = Fleet(sites(20))
    clock = FakeClock(wall=datetime(2027, 1, 4, 11, 0, tzinfo=UTC))
    sel = Selector(labels=LabelSelector.parse("site in (a,b)"))
    r = new(policy(), sel)
    waves: dict[int, set[str]] = {}
    late = "dev-zz-late"
    joined_wave = None
    for _i in range(200):
        now = clock.wall()
        if r.wave == 1 and late not in fleet.labels:  # wave 2 dwells: a new device matches
            fleet.labels[late] = {"site": "a"}
        dec = decide(r, fleet.observations(now), now, holds=fleet.holds(now))
        for d in dec.assign:
            fleet.sent_at[d] = now
        before = set(r.members)
        r = dec.rollout
        if r.wave not in waves:
            waves[r.wave] = set(r.members)
        else:
            # Within a wave (dwelling, judged) the members never change.
            assert set(r.members) == waves[r.wave] or r.wave != dec.rollout.wave
        if late in r.members and late not in before:
            joined_wave = r.wave
        if r.state == "completed":
            break
        clock.advance(STEP)
    assert r.state == "completed"
    assert late in r.members
    assert late in fleet.sent_at
    assert joined_wave == 2  # the next wave entered, not the one dwelling when it matched
    for w, members in waves.items():
        if w < joined_wave:
            assert late not in members


def test_a_late_joiner_during_the_last_wave_is_added_before_completion() -> None:
    fleet = Fleet(sites(10))
    clock = FakeClock(wall=datetime(2027, 1, 4, 11, 0, tzinfo=UTC))
    r = new(policy(steps=(1.0,)))
    for _ in range(40):  # through the canary into the last wave (dwelling)
        now = clock.wall()
        dec = decide(r, fleet.observations(now), now)
        for d in dec.assign:
            fleet.sent_at[d] = now
        r = dec.rollout
        clock.advance(STEP)
        if r.wave == 1:
            break
    assert r.wave == 1
    assert r.state == "dwelling"
    fleet.labels["dev-late"] = {"site": "a"}
    r = run(r, fleet, clock, days=1)
    assert r.state == "completed"
    assert "dev-late" in r.members
    assert "dev-late" in fleet.sent_at


# --------------------------------------------------------------------------- commands
def _held_rollout() -> tuple[Rollout, Fleet, FakeClock]:
    fleet = Fleet(sites(20), [night_window()])
    clock = FakeClock(wall=datetime(2027, 1, 4, 11, 0, tzinfo=UTC))
    r = new(policy(canary_fraction=0.5))
    now = clock.wall()
    dec = decide(r, fleet.observations(now), now, holds=fleet.holds(now))
    for d in dec.assign:
        fleet.sent_at[d] = now
    assert dec.rollout.held
    assert all(fleet.labels[d]["site"] == "b" for d in dec.rollout.held)
    assert all(fleet.labels[d]["site"] == "a" for d in dec.assign)
    return dec.rollout, fleet, clock


def test_abort_sends_back_only_what_was_sent() -> None:
    r, fleet, clock = _held_rollout()
    held = set(r.held)
    dec = abort(r, clock.wall())
    assert set(dec.revert) == set(fleet.sent_at)
    assert not set(dec.revert) & held
    assert dec.rollout.held == {}
    assert dec.rollout.state == "aborted"


def test_paused_rollouts_send_nothing_and_resume_sends_when_the_window_opens() -> None:
    r, fleet, clock = _held_rollout()
    r = pause(r, clock.wall())
    sent = dict(fleet.sent_at)
    clock.advance(14.5 * 3600)  # inside the window (02:00-03:00 Berlin = 01:00-02:00 UTC)
    now = clock.wall()
    dec = decide(r, fleet.observations(now), now, holds=fleet.holds(now))
    assert dec.assign == ()
    assert dec.rollout.held == r.held
    assert fleet.sent_at == sent
    r = resume(r, now)
    dec = decide(r, fleet.observations(now), now, holds=fleet.holds(now))
    assert set(dec.assign) == set(r.held)
    assert dec.rollout.held == {}


def test_without_windows_or_budget_nothing_is_held_and_nothing_extra_is_stored() -> None:
    fleet = Fleet(sites(10))
    now = datetime(2027, 1, 4, 11, 0, tzinfo=UTC)
    r = new(policy())
    dec = decide(r, fleet.observations(now), now, holds=None)
    assert dec.assign
    assert not dec.rollout.held
    assert not dec.rollout.released
