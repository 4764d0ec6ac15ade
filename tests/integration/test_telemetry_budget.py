"""Telemetry that adapts to traffic, end to end: what reaches the server.

Two devices on a real Mosquitto (TLS, ACLs) with the real gateway and registry serve the same
1,024 rows through real onnxruntime with drift windows of 100 rows: ``dev-b`` with fixed
windows closes 10 windows per tensor and the server stores all 10; ``dev-a`` with a budget of
2 windows in a row (and almost no refill) closes 2 and keeps the other 824 rows in its open
window; the server stores exactly those 2 per tensor, complete and acknowledged, and nothing
is counted as dropped. A device whose plain reports may wait to share a message sends one
message per several reports once its model is off probation, and every report is stored once.
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


def test_quiet_reports_share_messages_and_all_reach_the_server(
    fleet: FleetHarness, digits_bundles: DigitsBundles
) -> None:
    # Reports every 0.5 s may wait 2 s to share a message: about 4 a message once the model
    # is off probation (while on probation, and for the 'installed' event, they go at once).
    v1 = fleet.publish(digits_bundles.path(1))
    fleet.start_device("dev-a", report_coalesce_seconds=2.0)
    fleet.assign("dev-a", {"digits": v1})
    agent = fleet.devices["dev-a"].agent
    wait_until(lambda: agent.registry.get("digits") is not None, what="dev-a serves digits")
    for _ in range(6):  # probation_requests = 5
        agent.infer(InferenceRequest(model="digits", inputs={"input": digits_bundles.x_eval[:1]}))

    def stored() -> list[dict[str, Any]]:
        return [
            t.payload
            for t in fleet.registry.telemetry(device_id="dev-a", limit=1000)
            if t.kind == "report"
        ]

    def settled() -> bool:
        return not any(m["on_probation"] for m in stored()[-1]["models"].values())

    wait_until(lambda: bool(stored()) and settled(), what="a report after probation")
    reports0, acks0 = len(stored()), fleet.gateway.stats().acks_sent
    wait_until(lambda: len(stored()) >= reports0 + 12, what="12 more reports", timeout=30)
    reports, acks = len(stored()) - reports0, fleet.gateway.stats().acks_sent - acks0
    assert acks <= reports / 2  # one ack per message: reports shared them
    assert fleet.devices["dev-a"].sync.uplink.stats().batches_held >= 2
    seqs = [r["seq"] for r in stored()]
    assert len(set(seqs)) == len(seqs)  # each stored once
    state = fleet.registry.seq_state("dev-a")
    assert (state.lost, state.gaps) == (0, 0)
