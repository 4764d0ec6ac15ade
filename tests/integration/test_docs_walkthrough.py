"""The documented walk-throughs run as written.

``docs/fleet-sync.md`` "Try it on one machine": its first ``sh`` block is run by bash, in a
temporary directory, with one substitution (``REPO=`` points at this checkout) and the
virtualenv's commands on ``PATH``; a private Mosquitto on a free port, ``fleet-server serve``
and an ``edge-agent run`` daemon started from ``deploy/agent.example.toml``. The block's own
waits poll a condition with a bound. The second block stops what the first started.

Also: the shipped example configs load, and the agent example starts outside systemd (no
``/run/edgefleet``, no ``/var/lib``) as an ordinary process in any directory.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bundles import DigitsBundles
from edge_agent.config import load_config
from fleet_server.config import load_config as load_server_config
from support import wait_until

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOC = REPO / "docs" / "fleet-sync.md"


def _blocks(doc: Path, heading: str) -> list[str]:
    text = doc.read_text()
    section = text[text.index(heading) :]
    section = section[: section.index("\n### ", len(heading))]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.S)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _kill_pids(directory: Path) -> None:
    for pid_file in directory.glob("*.pid"):
        with contextlib.suppress(ValueError, ProcessLookupError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)


@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto is not installed")
def test_fleet_sync_walkthrough_runs_as_written(tmp_path: Path) -> None:
    setup, stop = _blocks(DOC, "### Try it on one machine")
    assert setup.startswith("REPO=")
    script = re.sub(r"^REPO=.*$", f"REPO={REPO}", setup, count=1, flags=re.M)
    demo = tmp_path / "fleet-demo"
    try:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        logs = "".join(
            f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(demo.glob("*.log"))
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + logs
        assert re.search(r"model digits\s+active v1 assigned v1 installed", done.stdout), logs
        assert '"model_version": "1"' in done.stdout
        assert '"kind": "installed"' in done.stdout  # the device's event, in telemetry tail
        sock = demo / "device" / "state" / "agent.sock"
        assert sock.is_socket()  # the example's socket, outside systemd
        stopped = subprocess.run(
            ["bash", "-eu", "-c", stop], cwd=demo, env=_env(), timeout=60, check=False
        )
        assert stopped.returncode == 0
    finally:
        _kill_pids(demo)


def test_example_configs_load() -> None:
    agent = load_config(REPO / "deploy" / "agent.example.toml", {})
    assert agent.store.state_dir == str(REPO / "deploy" / "state")
    server = load_server_config(REPO / "deploy" / "fleet-server.example.toml", {})
    assert server.api.port > 0


def test_agent_example_starts_outside_systemd(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    """A copy of the example config, as is, runs the daemon in an ordinary directory."""
    config = tmp_path / "agent.toml"
    shutil.copy(REPO / "deploy" / "agent.example.toml", config)
    (tmp_path / "root.json").write_bytes(digits_bundles.keys.root_bytes())
    env = _env()
    with_port = {**env, "EDGEFLEET_AGENT__API__PORT": "0"}
    install = subprocess.run(
        [str(BIN / "edge-agent"), "install", str(digits_bundles.path(1)), "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert install.returncode == 0, install.stderr
    log = tmp_path / "agent.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "edge-agent"), "run", "--config", str(config)],
            env=with_port,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    sock = tmp_path / "state" / "agent.sock"

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        return _ready(sock)

    try:
        wait_until(ready, 60, lambda: "the agent's socket: " + log.read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0, log.read_text()
    assert (tmp_path / "state" / "models" / "digits").is_dir()


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=2)
        self._path = path

    def connect(self) -> None:
        import socket

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(2)
        self.sock.connect(str(self._path))


def _ready(sock: Path) -> bool:
    if not sock.is_socket():
        return False
    conn = _UnixConnection(sock)
    try:
        conn.request("GET", "/v2/health/ready")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()
