"""The README's main job as ``scripts/demo.sh`` runs it, with its relative default ``demo-out``.

Builds and signs the digits bundle with ``model-builder demo``, runs it on a local
``edge-agent`` daemon (``scripts/demo_agent.py``), then runs the fleet demo
(``scripts/demo_fleet.py``): Mosquitto with TLS and ACLs, ``fleet-server serve``, two enrolled
``edge-agent run`` daemons, delivery over MQTT, inference, cloud fallback, drift and telemetry,
and a clean stop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mosquitto import MOSQUITTO

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")
def test_the_readme_demo_runs_end_to_end_and_leaves_nothing_running(tmp_path: Path) -> None:
    """``scripts/demo.sh`` after setup, step for step, with its default relative ``demo-out``."""
    out = "demo-out"
    steps = [
        [str(BIN / "model-builder"), "demo", "--out", out],
        [sys.executable, str(ROOT / "scripts" / "demo_agent.py"), out],
        [sys.executable, str(ROOT / "scripts" / "demo_fleet.py"), out],
    ]
    demo_sh = (ROOT / "scripts" / "demo.sh").read_text()
    for script in ("model-builder demo", "demo_agent.py", "demo_fleet.py"):
        assert script in demo_sh, f"scripts/demo.sh no longer runs {script}"
    runs = []
    for step in steps:
        run = subprocess.run(
            step, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        runs.append(run)
    assert "daemon stopped cleanly (exit 0)" in runs[1].stdout
    assert "stopped cleanly" in runs[2].stdout
    agent = json.loads((tmp_path / out / "summary.json").read_text())
    assert agent["accuracy"] > 0.9
    summary = json.loads((tmp_path / out / "fleet-summary.json").read_text())
    assert set(summary) == {"demo-dev-1", "demo-dev-2"}
    for device in summary.values():
        assert device["version"] == 1
        assert device["lost"] == 0
    assert summary["demo-dev-2"]["drift_alerts"] > 0  # its inputs were at half scale
    assert summary["demo-dev-2"]["cloud_answers"] > 0
    assert processes_mentioning(str(tmp_path)) == [], "processes of the demo still running"


def processes_mentioning(text: str) -> list[str]:
    """``pid: cmdline`` of every live process whose command line contains ``text``.

    Reads /proc directly: ``pgrep`` (procps) is not on a minimal Debian.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        cmdline = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        if text in cmdline and state != "Z":
            found.append(f"{entry.name}: {cmdline}")
    return found


def test_processes_mentioning_finds_a_live_process_and_not_a_finished_one(tmp_path: Path) -> None:
    marker = str(tmp_path / "marker-arg")
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; print('up', flush=True); sys.stdin.read()", marker],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"  # exec'd: /proc shows its own command line
        assert [line.split(":")[0] for line in processes_mentioning(marker)] == [str(proc.pid)]
    finally:
        proc.communicate(b"")
    assert processes_mentioning(marker) == []
