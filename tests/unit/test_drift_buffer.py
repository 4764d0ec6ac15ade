"""The closed-drift-window buffer (issue 13): bounded in bytes, oldest dropped first, every drop
counted once in the telemetry report, order kept when a failed report puts windows back, nothing
lost between two threads; and its ``[drift] buffer_bytes`` config key."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bundles import DigitsBundles
from edge_agent.common.drift_buffer import DriftWindowBuffer, WindowItem, window_nbytes
from edge_agent.config import AgentConfig, DriftConfig, StoreConfig, load_config
from edge_agent.drift import DriftMonitor, MonitorPolicy, build_baseline
from edge_agent.drift.monitor import DriftWindow
from edge_agent.errors import ConfigError, OutboxError
from edge_agent.serving.agent import Agent
from edge_agent.serving.service import InferenceRequest
from edge_agent.store import ModelStore
from edge_agent.sync.telemetry_feed import TelemetryFeed
from edge_agent.sync.uplink import UplinkStats
from edge_agent.wire.telemetry import TelemetryReport
from edge_agent.wire.telemetry_drift import MAX_WINDOWS
from support import DEVICE

_WINDOWS: dict[int, DriftWindow] = {}


def window(n_features: int) -> DriftWindow:
    """A real closed window of ``n_features`` features (10 bins), made once per width."""
    if n_features not in _WINDOWS:
        rng = np.random.default_rng(n_features)
        ref = rng.normal(size=(400, n_features)).astype(np.float32)
        baseline = build_baseline({"x": ref}, {"y": ref[:, :1]}, n_bins=10)
        mon = DriftMonitor(baseline, MonitorPolicy(max_values=100, min_values=10))
        (_WINDOWS[n_features],) = mon.observe("x", ref[:100], now=1.0)
    return _WINDOWS[n_features]


def items(n: int, n_features: int = 8, key: str = "digits", first: int = 0) -> list[WindowItem]:
    """``n`` items whose version numbers them ``first, first + 1, ...`` (their age order)."""
    w = window(n_features)
    return [(key, first + i, w) for i in range(n)]


def ids(buffer: DriftWindowBuffer) -> list[int]:
    return [version for _, version, _ in buffer]


def test_window_size_grows_with_its_features() -> None:
    sizes = [window_nbytes(items(1, f)[0]) for f in (1, 8, 64, 256)]
    assert sizes == sorted(sizes)
    assert len(set(sizes)) == 4
    # A 64-feature window holds at least its view's five arrays and the scores' per feature.
    assert sizes[2] > 64 * (12 + 4) * 8


@pytest.mark.parametrize("n_features", [1, 8, 64, 256])
@pytest.mark.parametrize("fits", [1, 3, 10])
def test_byte_bound_holds_and_the_oldest_go_first(n_features: int, fits: int) -> None:
    appended = items(3 * fits + 2, n_features)
    # Items of one window differ by a few bytes (a version number may be a shared small int).
    sizes = [window_nbytes(item) for item in appended]
    buffer = DriftWindowBuffer(max(sizes) * fits + min(sizes) // 2)  # room for ``fits``
    for i, item in enumerate(appended):
        buffer.append(item)
        held = min(i + 1, fits)
        assert buffer.nbytes <= buffer.max_bytes
        assert buffer.nbytes == sum(sizes[i + 1 - held : i + 1])
        assert ids(buffer) == list(range(i + 1 - held, i + 1))  # the newest, oldest first
        assert buffer.dropped == i + 1 - held


def test_budget_is_shared_by_windows_of_different_sizes() -> None:
    small, big = window_nbytes(items(1, 1)[0]), window_nbytes(items(1, 256)[0])
    buffer = DriftWindowBuffer(big + small + small // 2)
    for i in range(3):
        buffer.append(("m", i, window(1)))
    buffer.append(("m", 3, window(256)))  # the two oldest small ones make room
    assert ids(buffer) == [2, 3]
    assert buffer.dropped == 2
    assert buffer.nbytes == sum(map(window_nbytes, buffer)) <= buffer.max_bytes


def test_a_window_bigger_than_the_budget_is_dropped_on_arrival_and_counted() -> None:
    buffer = DriftWindowBuffer(window_nbytes(items(1, 8)[0]))
    buffer.append(items(1, 8)[0])
    buffer.append(("digits", 7, window(256)))
    assert ids(buffer) == [0]
    assert buffer.dropped == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2MiB"])
def test_buffer_refuses_a_budget_that_is_not_a_positive_integer(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        DriftWindowBuffer(bad)


def test_put_back_keeps_order_in_front_of_newer_windows_and_the_bound() -> None:
    size = window_nbytes(items(1)[0])
    buffer = DriftWindowBuffer(size * 4 + size // 2)
    for item in items(4):
        buffer.append(item)
    taken = buffer.drain()
    assert not buffer
    assert buffer.nbytes == 0
    for item in items(2, first=4):  # closed while the report was failing
        buffer.append(item)
    buffer.put_back(taken)
    # Six windows for room for four: the two oldest (of those put back) go, counted.
    assert ids(buffer) == [2, 3, 4, 5]
    assert buffer.dropped == 2
    assert buffer.nbytes == sum(map(window_nbytes, buffer)) <= buffer.max_bytes


# --------------------------------------------------------------------- the telemetry report


@dataclass
class FakeRegistry:
    def memory_used(self) -> int:
        return 0


@dataclass
class FakeAgent:
    """What ``TelemetryFeed`` reads of ``Agent``."""

    drift_windows: DriftWindowBuffer
    registry: FakeRegistry = field(default_factory=FakeRegistry)

    def status(self) -> dict[str, Any]:
        return {"version": "test", "uptime_s": 1.0, "models": {"digits": {"version": 1}}}


class FakeOutbox:
    def dropped(self) -> dict[Any, Any]:
        return {}


@dataclass
class FakeUplink:
    """Records reports; refuses them while ``failing``."""

    failing: bool = False
    reports: list[TelemetryReport] = field(default_factory=list)

    def stats(self) -> UplinkStats:
        return UplinkStats()

    def add_report(self, report: TelemetryReport) -> None:
        if self.failing:
            raise OutboxError("outbox full")
        self.reports.append(report)


def feed(agent: FakeAgent, uplink: FakeUplink) -> TelemetryFeed:
    return TelemetryFeed(
        agent,  # type: ignore[arg-type]
        FakeOutbox(),  # type: ignore[arg-type]
        uplink,  # type: ignore[arg-type]
        queue.SimpleQueue(),
        device_id="dev-1",
        clock=lambda: 100.0,
    )


def reported(report: TelemetryReport) -> int:
    return len(report.models["digits"].drift)


def test_buffer_drops_are_reported_once_in_the_next_report() -> None:
    size = window_nbytes(items(1)[0])
    agent, uplink = FakeAgent(DriftWindowBuffer(size * 3 + size // 2)), FakeUplink()
    f = feed(agent, uplink)
    for item in items(10):
        agent.drift_windows.append(item)
    f.add_report()
    (first,) = uplink.reports
    assert reported(first) == 3
    assert first.telemetry_dropped["drift_windows"] == 7
    f.add_report()  # nothing new dropped: the cumulative count stays, it is not added again
    assert reported(uplink.reports[1]) == 0
    assert uplink.reports[1].telemetry_dropped["drift_windows"] == 7
    for item in items(4, first=10):
        agent.drift_windows.append(item)
    f.add_report()
    assert reported(uplink.reports[2]) == 3
    assert uplink.reports[2].telemetry_dropped["drift_windows"] == 8


def test_report_keeps_each_models_newest_windows_and_counts_the_rest_with_the_buffers() -> None:
    size = window_nbytes(items(1)[0])
    n = MAX_WINDOWS + 10
    agent, uplink = FakeAgent(DriftWindowBuffer(size * n + size // 2)), FakeUplink()
    for item in items(n + 2):  # two over the buffer's budget
        agent.drift_windows.append(item)
    feed(agent, uplink).add_report()
    (report,) = uplink.reports
    windows = report.models["digits"].drift
    assert len(windows) == MAX_WINDOWS
    assert report.telemetry_dropped["drift_windows"] == 2 + 10
    assert [w.start for w in windows] == [window(8).start] * MAX_WINDOWS


def test_a_failed_report_puts_windows_back_in_order_within_the_bound() -> None:
    size = window_nbytes(items(1)[0])
    agent, uplink = FakeAgent(DriftWindowBuffer(size * 5 + size // 2)), FakeUplink(failing=True)
    f = feed(agent, uplink)
    for item in items(4):
        agent.drift_windows.append(item)
    f.add_report()
    assert ids(agent.drift_windows) == [0, 1, 2, 3]
    assert agent.drift_windows.dropped == 0
    for item in items(3, first=4):
        agent.drift_windows.append(item)
    f.add_report()  # still failing: seven windows for five places, the oldest two go
    assert ids(agent.drift_windows) == [2, 3, 4, 5, 6]
    assert agent.drift_windows.dropped == 2
    uplink.failing = False
    f.add_report()
    (report,) = uplink.reports
    assert reported(report) == 5
    assert report.telemetry_dropped["drift_windows"] == 2
    assert not agent.drift_windows


# ------------------------------------------------------------------------- two threads


def test_concurrent_append_and_drain_lose_nothing_uncounted() -> None:
    size = window_nbytes(items(1)[0])
    buffer = DriftWindowBuffer(size * 8 + size // 2)
    n = 3000
    produced = threading.Event()
    start = threading.Barrier(2)
    taken: list[int] = []

    def produce() -> None:
        start.wait()
        for item in items(n):
            buffer.append(item)
        produced.set()

    def consume() -> None:
        start.wait()
        rounds = 0
        while True:
            done = produced.is_set()
            batch = buffer.drain()
            rounds += 1
            if rounds % 3 == 0 and batch:  # a failed report: all of it goes back
                buffer.put_back(batch)
                continue
            taken.extend(version for _, version, _ in batch)
            if done and not buffer:
                return

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert len(taken) == len(set(taken)), "a window was reported twice"
    assert taken == sorted(taken), "windows were reported out of order"
    assert len(taken) + buffer.dropped == n
    assert len(buffer) == 0
    assert buffer.nbytes == 0


# ----------------------------------------------------------------------------- the agent


def test_agent_buffer_uses_the_config_budget_and_its_drops_are_a_metric(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from edge_agent.serving.metrics import AgentCollector

    config = AgentConfig(
        store=StoreConfig(state_dir=str(tmp_path / "state")),
        drift=DriftConfig(window_values=100, buffer_bytes=64 * 1024),
    )
    store = ModelStore(tmp_path / "state", digits_bundles.keys.trusted_root(), DEVICE)
    agent = Agent(config, store, transport=None, background_drift=False)
    agent.install(digits_bundles.path(1))
    agent.start()
    assert agent.drift_windows.max_bytes == 64 * 1024
    rows = digits_bundles.x_eval[:50]
    for _ in range(10):  # 500 rows: five 100-row input windows, five output ones, per round
        for _ in range(10):
            agent.infer(InferenceRequest("digits", {"input": rows}))
        agent.tick()
    assert agent.drift_windows.dropped > 0, "the budget must overflow for this test to mean it"
    assert agent.drift_windows.nbytes <= 64 * 1024
    registry = CollectorRegistry()
    registry.register(AgentCollector(agent))
    text = generate_latest(registry).decode()
    assert f"edgefleet_agent_drift_windows_dropped_total {agent.drift_windows.dropped:.1f}" in text


# ---------------------------------------------------------------------------- the config


def test_config_buffer_bytes_defaults_to_2_mib_and_loads(tmp_path: Path) -> None:
    assert load_config(None, {}).drift.buffer_bytes == 2 * 1024 * 1024
    f = tmp_path / "a.toml"
    f.write_text("[drift]\nbuffer_bytes = 1048576\n")
    assert load_config(f, {}).drift.buffer_bytes == 1048576
    env = {"EDGEFLEET_AGENT__DRIFT__BUFFER_BYTES": "65536"}
    assert load_config(None, env).drift.buffer_bytes == 65536


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "drift.buffer_bytes must be in"),
        ("-1", "drift.buffer_bytes must be in"),
        ("65535", "drift.buffer_bytes must be in"),
        ("1099511627776", "drift.buffer_bytes must be in"),
        ("9223372036854775807", "drift.buffer_bytes must be in"),
        ("true", "drift.buffer_bytes must be int"),
        ("2097152.0", "drift.buffer_bytes must be int"),
        ("nan", "drift.buffer_bytes must be a finite number"),
        ('"2MiB"', "drift.buffer_bytes must be int"),
        ("[1]", "drift.buffer_bytes must be int"),
    ],
)
def test_config_refuses_hostile_buffer_bytes(tmp_path: Path, value: str, message: str) -> None:
    f = tmp_path / "a.toml"
    f.write_text(f"[drift]\nbuffer_bytes = {value}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(f, {})
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"EDGEFLEET_AGENT__DRIFT__BUFFER_BYTES": value})
