"""Agent releases go through the rollout engine's waves and gates, every part a real process.

A TLS Mosquitto with per-device ACLs, ``fleet-server serve`` with its rollout engine, and four
devices, each an ``edge-agent run`` daemon started by the launcher from a real base virtualenv,
serving the digits model and answering inference requests the test keeps sending (the agent
gates judge the error rate and p99 latency of the new agent's requests). The operator starts
both rollouts with ``fleet-server agent rollout`` as a real command.

A good release (1) goes from the base install to the two canaries, passes its gates once each
canary's new agent reports, then reaches the other two: the rollout completes. A broken release
(2, raises at start) goes to the same two canaries only: each launcher tries it and goes back to
release 1 by itself, the rollout sees the device rollbacks and aborts, and the other two devices
never receive release 2 (their desired state still names release 1, they never built it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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

DEVICES = ("cam-a", "cam-b", "cam-c", "cam-d")
BIN = Path(sys.executable).parent


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[FleetBroker]:
    with fleet_broker(tmp_path / "mqtt", DEVICES) as b:
        yield b


def _agent_rollout(port: int, release: int) -> dict[str, Any]:
    """``fleet-server agent rollout`` as the operator runs it."""
    done = subprocess.run(
        [str(BIN / "fleet-server"), "agent", "rollout", str(release), "--group", "line",
         "--canary-count", "2", "--dwell", "1", "--min-devices", "2", "--min-requests", "5",
         "--on-breach", "abort", "--max-p99-ratio", "10",
         "--url", f"http://127.0.0.1:{port}", "--token", TOKEN, "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert isinstance(out, dict)
    return out


def test_agent_releases_go_in_gated_waves_and_a_broken_one_halts_at_the_canary(
    broker: FleetBroker,
    digits_bundles: DigitsBundles,
    releases: Releases,
    base_venv: Path,
    tmp_path: Path,
) -> None:
    # Held open together while chosen: free_port() twice can hand out the same port.
    port, *api_ports = distinct_ports(1 + len(DEVICES))
    config, _ = server_config(
        tmp_path, broker, digits_bundles.keys.path, port, rollout_interval=0.5, fallback=False
    )
    server = subprocess.Popen(
        [str(BIN / "fleet-server"), "serve", "--config", str(config)],
        stdout=(tmp_path / "server.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    launchers: dict[str, subprocess.Popen[bytes]] = {}
    apis: dict[str, AgentClient] = {}
    layouts: dict[str, Layout] = {}
    client = AdminClient(f"http://127.0.0.1:{port}", TOKEN)
    x = digits_bundles.x_eval[:1].astype(np.float32)

    def logs(device: str) -> str:
        return (tmp_path / f"{device}.log").read_text()[-4000:]

    def traffic() -> None:
        """One request to every device (the gates' evidence); a device mid-switch refuses."""
        for d in DEVICES:
            or_none(lambda d=d: apis[d].infer("digits", {"input": x}))

    def rollout_ends(rollout_id: str) -> dict[str, Any] | None:
        traffic()
        r = client.rollout(rollout_id)
        return r if r["state"] in ("completed", "aborted", "paused") else None

    try:
        wait_until(lambda: or_none(client.status), timeout=60, what="fleet-server up")
        for d, api_port in zip(DEVICES, api_ports, strict=True):
            client.register(d, "line", {}, None)
            cfg = daemon_config(broker, digits_bundles.keys, tmp_path / "devices", d, api_port)
            layouts[d] = Layout(tmp_path / "devices" / d / "agent", base_venv)
            launchers[d] = subprocess.Popen(
                launcher_argv(base_venv, layouts[d].root, cfg, trial_seconds=120),
                stdout=(tmp_path / f"{d}.log").open("ab"),
                stderr=subprocess.STDOUT,
            )
            apis[d] = AgentClient(ApiConfig(port=api_port), timeout=10)
        client.publish(digits_bundles.path(1))
        client.assign("line", "digits", 1, group=True)
        for d in DEVICES:
            wait_until(
                lambda d=d: (
                    "agent-update" in (reported(client, d).get("capabilities") or [])
                    and (reported(client, d).get("models") or {}).get("digits", {}).get("active")
                    == 1
                ),
                timeout=120,
                what=lambda d=d: f"{d} serving digits v1 under the launcher: {logs(d)}",
            )
        client.publish_agent(releases.good)
        client.publish_agent(releases.crash)

        # The good release: canary first, then the rest; the rollout completes.
        good = _agent_rollout(port, 1)
        assert (good["model"], good["from_version"], good["to_version"]) == (
            "agent:edgefleet", None, 1
        )  # fmt: skip
        done = wait_until(
            lambda: rollout_ends(good["id"]),
            timeout=240,
            what=lambda: f"release 1 rolling out: {or_none(lambda: client.rollout(good['id']))}",
        )
        assert done["state"] == "completed", done["reasons"]
        assert done["wave_sizes"] == [2, 4]
        assert set(done["devices"].values()) == {"installed"}
        joined = done["members"]  # device -> when the rollout sent it the release
        canary = {d for d, at in joined.items() if at == min(joined.values())}
        assert len(canary) == 2
        sent = [e["detail"]["assign"] for e in done["events"] if e["kind"] == "decision"]
        assert sorted(len(a) for a in sent if a) == [2, 2]  # two waves of two
        for d in DEVICES:
            agent = agent_part(client, d)
            assert (agent["release"], agent["outcome"]) == (1, "installed"), agent
            assert layouts[d].current() == "1"
        gates = {g["name"]: g["status"] for g in done["gates"]}
        assert gates["agent_reporting"] == "ok"
        assert set(gates) == {
            "install_failures", "device_rollbacks", "agent_reporting", "p99_latency", "error_rate"
        }  # fmt: skip

        # The broken release: the canary's launchers go back by themselves; it stops there.
        bad = _agent_rollout(port, 2)
        assert (bad["from_version"], bad["to_version"]) == (1, 2)
        ended = wait_until(
            lambda: rollout_ends(bad["id"]),
            timeout=240,
            what=lambda: f"release 2 halting: {or_none(lambda: client.rollout(bad['id']))}",
        )
        assert ended["state"] == "aborted", ended["reasons"]
        assert set(ended["members"]) == canary
        assert any("device_rollbacks" in r for r in ended["reasons"]), ended["reasons"]
        for d in sorted(canary):
            wait_until(
                lambda d=d: agent_part(client, d).get("outcome") == "rolled_back",
                timeout=300,
                what=lambda d=d: f"{d} rolling back release 2: {agent_part(client, d)} {logs(d)}",
            )
            agent = agent_part(client, d)
            assert (agent["release"], agent["assigned"], agent["failed"]) == (1, 2, [2])
            assert layouts[d].current() == "1"
            assert launchers[d].poll() is None
        for d in sorted(set(DEVICES) - canary):
            agent = agent_part(client, d)
            assert (agent["release"], agent["assigned"], agent["failed"]) == (1, 1, [])
            assert not layouts[d].release_dir("2").exists()
        # Every device serves on release 1 after all of it.
        for d in DEVICES:
            out = wait_until(
                lambda d=d: or_none(lambda: apis[d].infer("digits", {"input": x})),
                timeout=60,
                what=lambda d=d: f"{d} serving on release 1: {logs(d)}",
            )
            assert out["outputs"]
    finally:
        for proc in launchers.values():
            stop_process(proc)
        stop_process(server)
        client.close()
