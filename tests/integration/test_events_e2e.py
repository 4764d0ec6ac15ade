"""Device events reach the server once, over real Mosquitto (TLS, ACLs), gateway and agents.

An event leaves a device in exactly one acknowledged batch on ``.../telemetry``; nothing is
published on ``.../events``, so the server stores each event once and counts no duplicate. A
real drift alert (the digits model served shifted pixels) arrives as a ``drift_alert`` event.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bundles import DigitsBundles
from edge_agent.config import DriftConfig
from edge_agent.serving.service import InferenceRequest
from fleet import FleetHarness, start_device, wait_until
from mosquitto import MOSQUITTO, fleet_broker

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")


@pytest.fixture
def fleet(digits_bundles: DigitsBundles, tmp_path: Path) -> Iterator[FleetHarness]:
    with fleet_broker(tmp_path / "mqtt", ("dev-a",)) as broker:
        harness = FleetHarness(broker, digits_bundles.keys, tmp_path / "fleet")
        try:
            yield harness
        finally:
            harness.close()


def _events(fleet: FleetHarness, kind: str) -> list[dict[str, object]]:
    rows = fleet.registry.telemetry(device_id="dev-a", limit=1000)
    return [t.payload for t in rows if t.kind == "event" and t.payload.get("kind") == kind]


def test_events_arrive_once_and_drift_alerts_are_sent(
    fleet: FleetHarness, digits_bundles: DigitsBundles
) -> None:
    v1 = fleet.publish(digits_bundles.path(1))
    config = fleet.agent_config("dev-a")
    config = dataclasses.replace(config, drift=DriftConfig(window_values=100))
    device = start_device(config)
    fleet.devices["dev-a"] = device
    fleet.assign("dev-a", {"digits": v1})
    wait_until(lambda: _events(fleet, "installed"), what="the installed event")

    shifted = np.clip(digits_bundles.x_eval[:300] * 0.2 + 10.0, 0, 16).astype(np.float32)
    for start in range(0, len(shifted), 50):
        request = InferenceRequest("digits", {"input": shifted[start : start + 50]})
        device.agent.infer(request)
    alert = wait_until(lambda: _events(fleet, "drift_alert"), 30, what="a drift_alert")
    assert alert[0]["model"] == "digits"
    assert alert[0]["version"] == 1

    wait_until(lambda: device.sync.outbox.stats().entries == 0, what="the outbox drained by acks")
    state = fleet.registry.seq_state("dev-a")
    assert state.duplicates == 0
    assert state.gaps == 0
    assert state.lost == 0
    assert len(_events(fleet, "installed")) == 1
    stats = fleet.gateway.stats()
    assert stats.duplicates == 0
    assert stats.messages.get("events", 0) == 0  # the one path is the batch
