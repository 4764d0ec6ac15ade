"""The drift window budget end to end: what reaches the server from a device that has one.

Two devices on a real Mosquitto (TLS, ACLs) with the real gateway and registry serve the same
1,024 rows through real onnxruntime with drift windows of 100 rows: ``dev-b`` with fixed
windows closes 10 windows per tensor and the server stores all 10; ``dev-a`` with a budget of
2 windows in a row (and almost no refill) closes 2 and keeps the other 824 rows in its open
window; the server stores exactly those 2 per tensor, complete and acknowledged, and nothing
is counted as dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bundles import DigitsBundles
from edge_agent.config import DriftConfig
from edge_agent.serving.service import InferenceRequest
from fleet import FleetHarness, start_device, wait_until
from mosquitto import MOSQUITTO, FleetBroker, fleet_broker

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

DEVICES = ("dev-a", "dev-b")
ROWS = 1024  # four of the pipeline's 256-row drift blocks


@pytest.fixture
def fleet(digits_bundles: DigitsBundles, tmp_path: Path) -> Iterator[FleetHarness]:
    broker: FleetBroker
    with fleet_broker(tmp_path / "mqtt", DEVICES) as broker:
        harness = FleetHarness(broker, digits_bundles.keys, tmp_path / "fleet")
        try:
            yield harness
        finally:
            harness.close()


def _stored_windows(fleet: FleetHarness, device_id: str) -> list[dict[str, Any]]:
    return [
        w
        for t in fleet.registry.telemetry(device_id=device_id, limit=1000)
        if t.kind == "report"
        for w in t.payload["models"].get("digits", {}).get("drift", [])
    ]


def test_a_device_with_a_window_budget_sends_bounded_windows_and_the_server_stores_them(
    fleet: FleetHarness, digits_bundles: DigitsBundles
) -> None:
    drift = {
        "dev-a": DriftConfig(
            window_values=100, window_seconds=3600.0, windows_per_hour=0.01, window_burst=2
        ),
        "dev-b": DriftConfig(window_values=100, window_seconds=3600.0),
    }
    v1 = fleet.publish(digits_bundles.path(1))
    for d in DEVICES:
        config = dataclasses.replace(fleet.agent_config(d), drift=drift[d])
        fleet.devices[d] = start_device(config)
        fleet.assign(d, {"digits": v1})
    x = np.resize(digits_bundles.x_eval, (ROWS, *digits_bundles.x_eval.shape[1:]))
    for d in DEVICES:
        agent = fleet.devices[d].agent

        def runs_v1(agent: Any = agent) -> bool:
            return agent.registry.get("digits") is not None

        wait_until(runs_v1, what=f"{d} serves digits")
        for i in range(0, ROWS, 64):
            agent.infer(InferenceRequest(model="digits", inputs={"input": x[i : i + 64]}))

    expected = {"dev-a": (2, ROWS - 200), "dev-b": (10, ROWS - 1000)}  # closed, still open
    for d, (closed, open_rows) in expected.items():
        monitor = fleet.devices[d].agent.registry.get("digits").pipeline.monitor

        def sketched(monitor: Any = monitor) -> dict[str, tuple[int, int]]:
            return {t: (s.windows_closed, s.open_rows) for t, s in monitor.snapshot().items()}

        wait_until(
            lambda s=sketched, c=closed, o=open_rows: set(s().values()) == {(c, o)},
            what=f"{d} sketched every row",
        )
        wait_until(
            lambda d=d, c=closed: (
                len(_stored_windows(fleet, d)) == 2 * c  # input and output
                and fleet.devices[d].sync.outbox.stats().entries == 0
            ),
            what=f"{d}'s windows stored and acknowledged",
        )
        windows = _stored_windows(fleet, d)
        for tensor in ("input", "probabilities"):
            mine = [w for w in windows if w["tensor"] == tensor]
            assert [(w["rows"], w["reason"]) for w in mine] == [(100, "count")] * closed
        state = fleet.registry.seq_state(d)
        assert (state.lost, state.gaps) == (0, 0)
        for t in fleet.registry.telemetry(device_id=d, limit=1000):
            if t.kind == "report":
                assert not t.payload.get("telemetry_dropped", {}).get("drift_windows")
