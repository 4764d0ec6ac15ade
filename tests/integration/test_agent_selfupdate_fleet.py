"""The agent updates itself through the fleet, every part a real process.

A TLS Mosquitto with per-device ACLs, ``fleet-server serve``, and two devices, each an
``edge-agent run`` daemon started by the launcher from a real base virtualenv, enrolled by
certificate and syncing over MQTT. The operator publishes the digits model and two agent
packages built from this source tree: a good release and one that raises at start. The good
release is assigned to the group: each device downloads the package by the block transfer,
builds the release beside the running one, the launcher tries it and confirms it, and the
server sees the new release in each reported state. The broken release assigned next fails its
trial on both devices: each launcher goes back to release 1 by itself and the server sees
``rolled_back`` with the reason, while the model keeps serving.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent_releases import (
    Releases,
    agent_part,
    launcher_argv,
    or_none,
    reported,
)
from bundles import DigitsBundles
from edge_agent.client import AgentClient
from edge_agent.config import ApiConfig
from edge_agent.selfupdate.releases import Layout
from fleet import daemon_config, stop_process, wait_until
from fleet_server.admin.client import AdminClient
from mosquitto import MOSQUITTO, FleetBroker, distinct_ports, fleet_broker
from served import TOKEN, server_config

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

DEVICES = ("cam-a", "cam-b")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[FleetBroker]:
    with fleet_broker(tmp_path / "mqtt", DEVICES) as b:
        yield b


def test_agent_releases_roll_out_through_the_fleet_and_a_broken_one_comes_back(
    broker: FleetBroker,
    digits_bundles: DigitsBundles,
    releases: Releases,
    base_venv: Path,
    tmp_path: Path,
) -> None:
    # Held open together while chosen: free_port() twice can hand out the same port.
    port, *api_ports = distinct_ports(1 + len(DEVICES))
    config, _ = server_config(tmp_path, broker, digits_bundles.keys.path, port, fallback=False)
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "fleet-server"), "serve", "--config", str(config)],
        stdout=(tmp_path / "server.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    launchers: dict[str, subprocess.Popen[bytes]] = {}
    apis: dict[str, AgentClient] = {}
    layouts: dict[str, Layout] = {}
    client = AdminClient(f"http://127.0.0.1:{port}", TOKEN)

    def logs(device: str) -> str:
        return (tmp_path / f"{device}.log").read_text()[-5000:]

    try:
        wait_until(lambda: or_none(client.status), timeout=60, what="fleet-server up")
        for d, api_port in zip(DEVICES, api_ports, strict=True):
            client.register(d, "line", {}, None)
            cfg = daemon_config(broker, digits_bundles.keys, tmp_path / "devices", d, api_port)
            layouts[d] = Layout(tmp_path / "devices" / d / "agent", base_venv)
            launchers[d] = subprocess.Popen(
                launcher_argv(base_venv, layouts[d].root, cfg, trial_seconds=90),
                stdout=(tmp_path / f"{d}.log").open("ab"),
                stderr=subprocess.STDOUT,
            )
            apis[d] = AgentClient(ApiConfig(port=api_port), timeout=10)
        client.publish(digits_bundles.path(1))
        client.assign("line", "digits", 1, group=True)
        for d in DEVICES:
            wait_until(
                lambda d=d: "agent-update" in (reported(client, d).get("capabilities") or []),
                timeout=60,
                what=lambda d=d: f"{d} reporting the agent-update capability: {logs(d)}",
            )
            wait_until(
                lambda d=d: (
                    (reported(client, d).get("models") or {}).get("digits", {}).get("active") == 1
                ),
                timeout=90,
                what=lambda d=d: f"{d} serving digits v1: {logs(d)}",
            )

        # A device that no launcher runs cannot update: the server does not send it a release.
        published = client.publish_agent(releases.good)
        assert (published["release"], published["version"]) == (1, "0.1.1")
        assert [r["release"] for r in client.agent_releases()] == [1]
        results = client.assign_agent("line", 1, group=True)
        assert [(r["device_id"], r["published"]) for r in results] == [(d, True) for d in DEVICES]
        for d in DEVICES:
            wait_until(
                lambda d=d: (
                    agent_part(client, d).get("release") == 1
                    and agent_part(client, d).get("outcome") == "installed"
                ),
                timeout=180,
                what=lambda d=d: (
                    f"{d} confirming agent release 1: {agent_part(client, d)} {logs(d)}"
                ),
            )
            assert reported(client, d)["agent_version"] == "0.1.1"
            assert layouts[d].load_state().state == "confirmed"
            out = apis[d].infer("digits", {"input": digits_bundles.x_eval[:2].astype(np.float32)})
            assert out["outputs"]

        x = digits_bundles.x_eval[:2].astype(np.float32)
        client.publish_agent(releases.crash)
        client.assign_agent("line", 2, group=True)
        for d in DEVICES:
            wait_until(
                lambda d=d: agent_part(client, d).get("outcome") == "rolled_back",
                timeout=180,
                what=lambda d=d: f"{d} rolling back release 2: {agent_part(client, d)} {logs(d)}",
            )
            agent = agent_part(client, d)
            assert agent["release"] == 1
            assert agent["assigned"] == 2
            assert agent["failed"] == [2]
            assert "exited" in agent["reason"]
            assert layouts[d].current() == "1"
            assert launchers[d].poll() is None  # the launcher handled it, no restart needed
            out = wait_until(
                lambda d=d: or_none(lambda: apis[d].infer("digits", {"input": x})),
                timeout=60,
                what=lambda d=d: f"{d} serving again on release 1: {logs(d)}",
            )
            assert out["outputs"]
    finally:
        for proc in launchers.values():
            stop_process(proc)
        stop_process(server)
        client.close()
