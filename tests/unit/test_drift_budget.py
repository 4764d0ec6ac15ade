"""The drift window budget: windows grow with traffic, their number per day stays bounded.

The rule (``edge_agent.drift.budget``): a tensor closes at most ``window_burst`` windows in a
row and ``windows_per_hour`` an hour on average; while it has credit a window closes exactly
when the fixed policy (``max_values`` rows or ``max_seconds``) says. Time is a ``FakeClock``
reading passed as ``now``, traffic is simulated batch by batch.
"""

from __future__ import annotations

import numpy as np
import pytest

from clock import FakeClock
from edge_agent.drift import DriftBaseline, DriftMonitor, DriftWindow, MonitorPolicy, build_baseline
from edge_agent.drift.budget import WindowBudget

FIXED = MonitorPolicy(max_values=1000, max_seconds=60.0, min_values=100)
BUDGET = MonitorPolicy(
    max_values=1000, max_seconds=60.0, min_values=100, windows_per_hour=20.0, window_burst=4
)


@pytest.fixture(scope="module")
def baseline() -> DriftBaseline:
    rng = np.random.default_rng(7)
    return build_baseline({"x": rng.normal(size=(2000, 4))}, {"y": rng.normal(size=(2000, 2))})


def run(
    baseline: DriftBaseline,
    policy: MonitorPolicy,
    clock: FakeClock,
    rates: list[tuple[float, float]],
    *,
    batch: int = 1,
    tick_every: float = 30.0,
    seed: int = 1,
) -> list[DriftWindow]:
    """Serve ``(seconds, rows per second)`` phases in batches of ``batch`` rows, ticking the
    monitor every ``tick_every`` seconds; the input tensor's closed windows."""
    mon = DriftMonitor(baseline, policy)
    rng = np.random.default_rng(seed)
    out: list[DriftWindow] = []
    next_tick = clock.now + tick_every
    for seconds, rate in rates:
        end = clock.now + seconds
        step = batch / rate if rate else tick_every
        while clock.now < end:
            clock.advance(min(step, end - clock.now))
            if rate:
                out += mon.observe("x", rng.normal(size=(batch, 4)), clock.now)
            if clock.now >= next_tick:
                out += [w for w in mon.tick(clock.now) if w.tensor == "x"]
                next_tick += tick_every
    return out


def test_the_bucket_starts_full_spends_and_refills_at_its_rate() -> None:
    clock = FakeClock()
    b = WindowBudget(per_hour=20.0, burst=3)
    assert [b.take(clock.now) for _ in range(4)] == [True, True, True, False]
    clock.advance(179.0)
    assert not b.take(clock.now)  # 179 s at 20 an hour: 0.994 of a window
    clock.advance(1.0)
    assert b.take(clock.now)  # exactly one window's credit (no float shortfall)
    clock.advance(10 * 3600)
    assert b.available(clock.now) == 3.0  # never more than the burst
    clock.advance(-500)  # a clock stepping back refills nothing and takes nothing back
    assert b.available(clock.now) == 3.0


@pytest.mark.parametrize(("per_hour", "burst"), [(0.0, 1), (-1.0, 1), (float("inf"), 1), (1, 0)])
def test_the_bucket_refuses_out_of_range_settings(per_hour: float, burst: int) -> None:
    with pytest.raises(ValueError, match=r"per_hour|burst"):
        WindowBudget(per_hour, burst)
    if burst < 1 or per_hour < 0 or per_hour == float("inf"):
        with pytest.raises(ValueError, match=r"windows_per_hour|window_burst"):
            MonitorPolicy(windows_per_hour=per_hour, window_burst=burst)


def test_low_traffic_closes_exactly_as_without_a_budget(baseline: DriftBaseline) -> None:
    # 0.5 rows/s: a window closes at 100 rows (every 200 s), rarer than 20 an hour: no change.
    fixed = run(baseline, FIXED, FakeClock(), [(4 * 3600, 0.5)])
    budget = run(baseline, BUDGET, FakeClock(), [(4 * 3600, 0.5)])
    assert len(fixed) >= 70
    assert [(w.start, w.end, w.rows, w.reason) for w in budget] == [
        (w.start, w.end, w.rows, w.reason) for w in fixed
    ]
    assert {w.reason for w in budget} == {"time"}
    assert max(w.end - w.start for w in budget) <= 200.0 + 1e-6  # alarm latency as today


@pytest.mark.parametrize("rate", [10.0, 50.0, 200.0])
def test_windows_per_hour_are_bounded_at_any_rate_and_windows_grow(
    baseline: DriftBaseline, rate: float
) -> None:
    hours = 2.0
    batch = int(max(10, rate // 5))
    fixed = run(baseline, FIXED, FakeClock(), [(hours * 3600, rate)], batch=batch)
    budget = run(baseline, BUDGET, FakeClock(), [(hours * 3600, rate)], batch=batch)
    # Fixed windows close every min(60 s, 1000 rows): 60 an hour and up.
    assert len(fixed) >= hours * 60 - 1
    assert len(budget) <= 4 + hours * 20
    assert len(budget) >= hours * 20 - 1  # the budget is used, not starved
    # Every row is in exactly one window: the windows grew to take the traffic (the rows of
    # the last ~3.5 minutes are in the window still open).
    served = rate * hours * 3600
    assert served - rate * 210 <= sum(w.rows for w in budget) <= served
    steady = budget[5:]
    assert min(w.rows for w in steady) >= min(rate * 170, 1000)
    # Held past max_values rows, a window closes as a count close (the rows, not the clock,
    # made it due).
    assert {w.reason for w in steady} == {"count"}
    assert {w.reason for w in fixed[5:]} == ({"count"} if rate * 60 >= 1000 else {"time"})


def test_a_burst_after_a_quiet_spell_closes_windows_at_once_up_to_the_burst(
    baseline: DriftBaseline,
) -> None:
    clock = FakeClock()
    # Idle for an hour (the bucket is full), then a 100 rows/s burst for 2 minutes: 12,000
    # rows. The fixed policy would close 12 windows of 1,000 rows; the budget closes 4 of
    # them as they fill (latency as today), then keeps one window open until credit accrues.
    windows = run(baseline, BUDGET, clock, [(3600, 0.0), (120, 100.0), (600, 0.0)], batch=50)
    first = windows[:4]
    assert [w.rows for w in first] == [1000] * 4
    assert all(w.reason == "count" for w in first)
    assert first[-1].end - first[0].start <= 41.0
    # The fifth window holds the rest of the burst and closes when one window's credit is
    # back (180 s at 20 an hour), by the next tick after that.
    rest = windows[4]
    assert rest.rows == 12_000 - 4000
    assert rest.reason == "count"
    assert 180.0 <= rest.end - first[0].start <= 180.0 + 30.0 + 1e-6
    assert len(windows) == 5
    assert sum(w.rows for w in windows) == 12_000


def test_idle_closes_nothing_and_refills_the_burst(baseline: DriftBaseline) -> None:
    clock = FakeClock()
    mon = DriftMonitor(baseline, BUDGET)
    rng = np.random.default_rng(3)
    # Spend the whole burst: five full windows in one call, one is held back.
    closed = mon.observe("x", rng.normal(size=(5000, 4)), clock.now)
    assert [w.rows for w in closed] == [1000] * 4
    for _ in range(100):  # idle ticks: nothing new to close but the held window, once
        clock.advance(60.0)
        closed += mon.tick(clock.now)
    assert [w.rows for w in closed] == [1000] * 5
    assert mon.snapshot()["x"].open_rows == 0
    # After the idle hours the burst is whole again: four windows close at once.
    again = mon.observe("x", rng.normal(size=(4000, 4)), clock.now)
    assert [w.rows for w in again] == [1000] * 4


def test_a_grown_window_keeps_the_false_alarm_rate_calibrated(baseline: DriftBaseline) -> None:
    # Thresholds follow each window's row count, so a grown window of undrifted traffic is
    # judged at the same per-window alpha (1%): of 40 windows, 4 or more alert with
    # probability 0.08% (binomial) if the calibration holds.
    mon = DriftMonitor(
        baseline, MonitorPolicy(max_values=1000, windows_per_hour=1.0, window_burst=1)
    )
    rng = np.random.default_rng(11)
    alerts, sizes = 0, []
    t = 0.0
    for _ in range(40):
        t += 3600.0
        for w in mon.observe("x", rng.normal(size=(9000, 4)), t):
            alerts += int(w.verdict.alert)
            sizes.append(w.rows)
    assert sizes[0] == 1000  # the first window is due with full credit
    assert max(sizes) >= 9000
    assert alerts <= 3
