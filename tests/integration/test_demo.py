"""The README's main job, second half: a whole fleet as real processes (``scripts/demo_fleet.py``).

Builds and signs the digits bundle with ``model-builder demo``, then runs the fleet demo:
Mosquitto with TLS and ACLs, ``fleet-server serve``, two enrolled ``edge-agent run`` daemons,
delivery over MQTT, inference, cloud fallback, drift and telemetry, and a clean stop.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mosquitto import MOSQUITTO

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")
def test_fleet_demo_runs_end_to_end_and_leaves_nothing_running(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    built = subprocess.run(
        [str(BIN / "model-builder"), "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo_fleet.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "stopped cleanly" in run.stdout
    summary = json.loads((out / "fleet-summary.json").read_text())
    assert set(summary) == {"demo-dev-1", "demo-dev-2"}
    for device in summary.values():
        assert device["version"] == 1
        assert device["lost"] == 0
    assert summary["demo-dev-2"]["drift_alerts"] > 0  # its inputs were at half scale
    assert summary["demo-dev-2"]["cloud_answers"] > 0
    leftovers = subprocess.run(
        ["pgrep", "-f", str(out)], capture_output=True, text=True, check=False
    ).stdout.split()
    assert leftovers == [], "processes of the demo still running"
