"""fleet_server.jobs.periodic: the jobs' thread, on a fake clock (the injected wait moves it)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import pytest

from clock import FakeClock
from fleet_server.errors import RegistryUnavailableError
from fleet_server.jobs.periodic import JobStats, PeriodicJob

DEADLINE = 10.0  # seconds a test waits for the job's thread to reach a point; never elapses


@dataclass
class FakeLock:
    """A ``LeaderLock`` the test hands out or takes away."""

    held: bool = True
    asked: int = 0
    released: int = 0

    def try_acquire(self) -> bool:
        self.asked += 1
        return self.held

    def release(self) -> None:
        self.released += 1


@dataclass
class ScriptedWait:
    """A wait after ``close`` returns True at once. Otherwise each wait moves ``clock`` by the
    interval and returns False (a tick), ``ticks`` times in all; the next wait sets ``parked`` and
    blocks on the stop event (until ``close``)."""

    clock: FakeClock
    ticks: int
    ticked: int = 0
    waits: list[float] = field(default_factory=list)
    parked: threading.Event = field(default_factory=threading.Event)

    def __call__(self, stop: threading.Event, seconds: float) -> bool:
        self.waits.append(seconds)
        if stop.is_set():
            return True
        if self.ticked < self.ticks:
            self.ticked += 1
            self.clock.advance(seconds)
            return False
        self.parked.set()
        return stop.wait()


def test_the_thread_ticks_after_each_interval_until_closed() -> None:
    clock = FakeClock(start=100.0)
    seen: list[float] = []
    wait = ScriptedWait(clock, ticks=3)
    job = PeriodicJob("t-ticks", lambda: seen.append(clock.now), interval=30.0, wait=wait)
    job.start()
    assert wait.parked.wait(DEADLINE)
    job.close()
    assert seen == [130.0, 160.0, 190.0]  # the first tick waits a whole interval too
    assert wait.waits == [30.0] * 4
    assert job.stats == JobStats(ticks=3)
    assert "t-ticks" not in {t.name for t in threading.enumerate()}


def test_the_default_wait_ends_at_close_without_a_tick() -> None:
    ran: list[int] = []
    job = PeriodicJob("t-default", lambda: ran.append(1), interval=3600.0)
    job.start()
    job.close()  # the stop event wakes the hour-long wait
    assert ran == []
    assert "t-default" not in {t.name for t in threading.enumerate()}


def test_start_twice_runs_one_thread_and_start_after_close_runs_again() -> None:
    clock = FakeClock()
    wait = ScriptedWait(clock, ticks=1)
    threads: list[str] = []
    job = PeriodicJob(
        "t-once", lambda: threads.append(threading.current_thread().name), interval=1.0, wait=wait
    )
    job.start()
    job.start()
    assert wait.parked.wait(DEADLINE)
    job.close()
    assert threads == ["t-once"]
    assert wait.waits == [1.0, 1.0]  # one thread: one tick, then parked until close
    again = ScriptedWait(clock, ticks=1)
    job2 = PeriodicJob("t-once", lambda: threads.append("second"), interval=1.0, wait=again)
    job2.start()
    assert again.parked.wait(DEADLINE)
    job2.close()
    again.ticks += 1
    again.parked.clear()
    job2.start()  # the stop event is cleared: the thread ticks again
    assert again.parked.wait(DEADLINE)
    job2.close()
    assert threads == ["t-once", "second", "second"]
    assert again.waits == [1.0, 1.0, 1.0, 1.0]


def test_a_tick_runs_only_while_the_lock_is_held() -> None:
    lock = FakeLock(held=False)
    ran: list[int] = []
    job = PeriodicJob("t-lock", lambda: ran.append(1), interval=1.0, lock=lock)
    assert job.run_tick() is False
    assert ran == []
    lock.held = True
    assert job.run_tick() is True
    assert ran == [1]
    assert lock.asked == 2
    assert job.stats == JobStats(ticks=1, skipped=1)


def test_close_releases_the_lock_even_if_never_started() -> None:
    lock = FakeLock()
    job = PeriodicJob("t-release", lambda: None, interval=1.0, lock=lock)
    job.close()
    assert lock.released == 1


def test_the_thread_skips_ticks_while_another_worker_leads() -> None:
    clock = FakeClock()
    lock = FakeLock(held=False)
    wait = ScriptedWait(clock, ticks=2)
    ran: list[int] = []
    job = PeriodicJob("t-follower", lambda: ran.append(1), interval=5.0, lock=lock, wait=wait)
    job.start()
    assert wait.parked.wait(DEADLINE)
    job.close()
    assert ran == []
    assert (lock.asked, lock.released) == (2, 1)
    assert job.stats == JobStats(skipped=2)


def test_our_errors_are_logged_with_their_code_counted_and_the_next_tick_retries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outcomes: list[Exception | None] = [RegistryUnavailableError("database down"), None]

    def tick() -> None:
        exc = outcomes.pop(0)
        if exc is not None:
            raise exc

    logger = logging.getLogger("test.periodic.ours")
    job = PeriodicJob("t-err", tick, interval=1.0, what="test run", logger=logger)
    with caplog.at_level(logging.WARNING, logger="test.periodic.ours"):
        assert job.run_tick() is False
        assert job.run_tick() is True
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"test run failed [{RegistryUnavailableError.code}]: database down"
    )
    assert record.exc_info is None
    assert job.stats == JobStats(ticks=1, failures=1)


def test_a_crash_is_logged_with_its_traceback_and_does_not_end_the_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    wait = ScriptedWait(clock, ticks=2)
    calls: list[int] = []

    def tick() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bug")

    logger = logging.getLogger("test.periodic.crash")
    job = PeriodicJob("t-crash", tick, interval=1.0, logger=logger, wait=wait)
    with caplog.at_level(logging.WARNING, logger="test.periodic.crash"):
        job.start()
        assert wait.parked.wait(DEADLINE)
        job.close()
    assert calls == [1, 1]
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage() == "t-crash crashed; the next tick retries"
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)
    assert job.stats == JobStats(ticks=1, failures=1)
