"""A maintenance window on a real fleet (issue 15, part 2): real Mosquitto with TLS and ACLs,
the gateway and registry in process, two real agents (onnxruntime) with their sync loops
reporting the labels of their ``[labels]`` configuration, and the rollout runner in its own
thread.

The rollout targets a label selector both devices match. ``site=a`` has no window and installs
at once; ``site=b`` has a window that opens a few seconds after the rollout starts, so its
assignment is held (the status says ``waiting_window`` and when it opens) and sent, and
installed, once the window is open — never before. The runner's clock is the real clock
shifted so that the window (whole minutes, like every window) opens seconds ahead.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bundles import DigitsBundles
from fleet import FleetHarness, start_device, wait_until
from fleet_server.jobs.rollout_runner import RolloutRunner
from fleet_server.registry import labels as label_store
from fleet_server.registry.values import BundleRecord
from fleet_server.rollouts.label_selector import LabelSelector
from fleet_server.rollouts.policy import RolloutPolicy, Selector, Thresholds
from fleet_server.rollouts.windows import MaintenanceWindow
from mosquitto import fleet_broker

DEVICES = ("dev-a", "dev-b")
AHEAD = timedelta(seconds=6)  # the window opens this long after the rollout starts


@pytest.fixture
def fleet(digits_bundles: DigitsBundles, tmp_path: Path) -> Iterator[FleetHarness]:
    with fleet_broker(tmp_path / "mqtt", DEVICES) as broker:
        harness = FleetHarness(broker, digits_bundles.keys, tmp_path / "fleet")
        try:
            yield harness
        finally:
            harness.close()


class Service:
    """The runner's ``AssignPort`` over the harness; records when (runner clock) it sent what."""

    def __init__(self, fleet: FleetHarness, records: dict[int, BundleRecord], clock: object):
        self.fleet, self.records, self.clock = fleet, records, clock
        self.sent: list[tuple[str, int, datetime]] = []
        self.lock = threading.Lock()

    def assign(self, target: str, name: str, version: int, *, group: bool = False) -> list[object]:
        with self.lock:
            self.sent.append((target, version, self.clock()))  # type: ignore[operator]
        self.fleet.assign(target, {name: self.records[version]})
        return []

    def assign_shadow(self, *args: object) -> None:
        return None


def _active(fleet: FleetHarness, device: str) -> int | None:
    rep = fleet.registry.get_device(device).reported or {}
    return ((rep.get("models") or {}).get("digits") or {}).get("active")


def test_a_device_outside_its_window_waits_and_installs_when_it_opens(
    fleet: FleetHarness, digits_bundles: DigitsBundles
) -> None:
    records = {v: fleet.publish(digits_bundles.path(v)) for v in (1, 2)}
    for d, site in (("dev-a", "a"), ("dev-b", "b")):
        config = dataclasses.replace(fleet.agent_config(d), labels={"site": site, "line": "7"})
        fleet.devices[d] = start_device(config)
        fleet.assign(d, {"digits": records[1]})
    # The labels travel from each agent's configuration in its reported state.
    wait_until(
        lambda: all(
            _active(fleet, d) == 1
            and label_store.device_labels(fleet.registry, d).device.get("line") == "7"
            for d in DEVICES
        ),
        timeout=60,
        what="both devices on v1, reporting their labels",
    )
    assert label_store.device_labels(fleet.registry, "dev-b").device["site"] == "b"
    assert label_store.device_labels(fleet.registry, "dev-b").device["os"] == "linux"

    # A 30-minute daily window for site b whose start is a whole minute; the runner's clock
    # is shifted so that it reads AHEAD before that start now.
    opens = (datetime.now(UTC) + timedelta(minutes=2)).replace(second=0, microsecond=0)
    shift = opens - AHEAD - datetime.now(UTC)

    def clock() -> datetime:
        return datetime.now(UTC) + shift

    window = MaintenanceWindow.from_dict(
        {
            "name": "site-b-nightly",
            "selector": "site=b",
            "start": opens.strftime("%H:%M"),
            "duration_minutes": 30,
            "timezone": "UTC",
        }
    )
    label_store.put_window(fleet.registry, window, clock())
    service = Service(fleet, records, clock)
    runner = RolloutRunner(fleet.registry, service, clock, interval=0.2)
    policy = RolloutPolicy(
        canary_fraction=1.0,
        dwell_seconds=0,
        min_devices=1,
        shadow_fraction=None,
        thresholds=Thresholds(max_reject_rate_increase=None, max_fallback_rate_increase=None),
    )
    selector = Selector(labels=LabelSelector.parse("line=7,site in (a,b)"))
    r = runner.create("digits", 2, selector=selector, policy=policy, from_version=1)
    [first] = runner.step()
    assert set(first.rollout.members) == set(DEVICES)
    assert first.assign == ("dev-a",)
    assert first.rollout.held == {"dev-b": "window"}
    assert runner.device_states(first.rollout)["dev-b"] == "waiting_window"
    assert runner.holds(first.rollout)["dev-b"]["opens_at"] == opens.isoformat()
    assert any("wait for a maintenance window" in x for x in first.reasons)

    runner.start()
    try:
        wait_until(lambda: _active(fleet, "dev-a") == 2, timeout=60, what="dev-a on v2")
        wait_until(
            lambda: _active(fleet, "dev-b") == 2,
            timeout=60,
            what=lambda: f"dev-b on v2; rollout: {runner.get(r.id).reasons}",
        )
    finally:
        runner.close()
    sent = {(d, v): t for d, v, t in service.sent}
    assert sent[("dev-a", 2)] < opens  # no window: at once
    assert sent[("dev-b", 2)] >= opens  # held until its window opened, never before
    assert sent[("dev-b", 2)] < opens + timedelta(minutes=30)
    assert [d for d, v, _ in service.sent].count("dev-b") == 1
    assert fleet.devices["dev-b"].agent.store.state("digits").active == 2
    assert runner.get(r.id).held == {}
