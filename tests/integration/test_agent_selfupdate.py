"""The agent updates itself, with real processes: the launcher, real ``edge-agent run`` daemons
serving a real model, real release virtualenvs built by the agent's installer from signed
agent packages of this very source tree.

Three releases are built once per module from a copy of the source (``pip wheel --no-deps``):
a good one (only the version string bumped), one that raises at start, and one that starts
but fails its health check (every golden sample fails, so its model never becomes ready).
The good one confirms and serves; the two bad ones roll back by themselves on every device;
a kill -9 at every step of the installer leaves the running agent serving.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent_releases import Releases, launcher_argv
from bundles import DigitsBundles
from edge_agent.client import AgentClient
from edge_agent.config import ApiConfig
from edge_agent.errors import EXIT_STORE
from edge_agent.selfupdate.releases import BASE, ENV_FAILPOINT, Layout
from mosquitto import free_port
from support import wait_until


class Device:
    """One device: config, a store with the digits model, an agent root, its launcher."""

    def __init__(self, tmp: Path, base: Path, bundles: DigitsBundles) -> None:
        self.tmp = tmp
        self.base = base
        self.port = free_port()
        self.layout = Layout(tmp / "agent", base)
        (tmp / "root.json").write_bytes(bundles.keys.root_bytes())
        self.config = tmp / "agent.toml"
        self.config.write_text(
            f"[api]\nport = {self.port}\n"
            f'[store]\nstate_dir = "{tmp / "state"}"\nroot_path = "{tmp / "root.json"}"\n'
        )
        for version in (1, 2):  # two kept versions: a model could fall back to v1
            done = self.cli("install", str(bundles.path(version)), "--config", str(self.config))
            assert done.returncode == 0, done.stderr
        self.client = AgentClient(ApiConfig(port=self.port), timeout=5)
        self.launcher: subprocess.Popen[bytes] | None = None
        self.x = bundles.x_eval[:2].astype(np.float32)

    def cli(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.base / "bin" / "edge-agent"), *args],
            capture_output=True, text=True, timeout=300, check=False, env=env,
        )  # fmt: skip

    def install_agent(self, package: Path, failpoint: str = "") -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != ENV_FAILPOINT}
        if failpoint:
            env[ENV_FAILPOINT] = failpoint
        return self.cli(
            "agent", "install", str(package), "--agent-root", str(self.layout.root),
            "--config", str(self.config), env=env,
        )  # fmt: skip

    def launch(self, trial_seconds: float = 90) -> None:
        self.launcher = subprocess.Popen(
            launcher_argv(self.base, self.layout.root, self.config, trial_seconds),
            stdout=(self.tmp / "launcher.log").open("ab"),
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return (self.tmp / "launcher.log").read_text()[-6000:]

    def serving(self) -> str | None:
        """The agent version that answers, when it is ready and its model infers."""
        assert self.launcher is not None
        if self.launcher.poll() is not None:
            pytest.fail(f"launcher exited {self.launcher.returncode}: {self.log()}")
        try:
            status, meta = self.client.request("GET", "/v2")
            if status != 200 or not self.client.ready():
                return None
            out = self.client.infer("digits", {"input": self.x})
        except Exception:
            return None
        assert out["outputs"], out
        return str(meta["version"])

    def active_model_version(self) -> int:
        done = self.cli("models", "--json", "--config", str(self.config))
        return int(json.loads(done.stdout)[0]["active"])

    def state(self) -> str:
        return self.layout.load_state().state

    def stop(self) -> None:
        if self.launcher is not None and self.launcher.poll() is None:
            self.launcher.send_signal(signal.SIGTERM)
            try:
                self.launcher.wait(30)
            except subprocess.TimeoutExpired:
                self.launcher.kill()
                self.launcher.wait()


@pytest.fixture
def make_device(
    tmp_path: Path, base_venv: Path, digits_bundles: DigitsBundles
) -> Iterator[type[Device]]:
    devices: list[Device] = []

    def make(name: str = "dev") -> Device:
        (tmp_path / name).mkdir()
        dev = Device(tmp_path / name, base_venv, digits_bundles)
        devices.append(dev)
        return dev

    yield make  # type: ignore[misc]
    for dev in devices:
        dev.stop()


def test_a_good_release_installs_side_by_side_and_confirms(make_device, releases: Releases) -> None:  # type: ignore[no-untyped-def]
    dev = make_device()
    dev.launch()
    assert wait_until(dev.serving, 60, dev.log) == "0.1.0"
    done = dev.install_agent(releases.good)
    assert done.returncode == 0, done.stderr
    assert "agent release 1" in done.stdout
    wait_until(lambda: dev.state() == "confirmed", 90, dev.log)
    assert wait_until(dev.serving, 30, dev.log) == "0.1.1"
    assert dev.layout.current() == "1"
    rel_python = dev.layout.release_dir("1") / "bin" / "python"
    where = subprocess.run(
        [str(rel_python), "-c", "import edge_agent; print(edge_agent.__file__)"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert where.startswith(str(dev.layout.release_dir("1")))
    status = dev.cli("agent", "status", "--agent-root", str(dev.layout.root), "--json")
    assert '"current": "1"' in status.stdout
    # The same release again is refused (rollback protection: not newer than the running one).
    again = dev.install_agent(releases.good)
    assert again.returncode == 4
    assert "not newer" in again.stderr


@pytest.mark.parametrize("kind", ["crash", "unhealthy"])
def test_a_broken_release_rolls_back_by_itself_on_every_device(
    make_device, releases: Releases, kind: str
) -> None:  # type: ignore[no-untyped-def]
    canary = [make_device(f"dev{i}") for i in range(2)]
    for dev in canary:
        dev.launch(trial_seconds=20 if kind == "unhealthy" else 90)
    for dev in canary:
        assert wait_until(dev.serving, 60, dev.log) == "0.1.0"
    package = getattr(releases, kind)
    for dev in canary:
        done = dev.install_agent(package)
        assert done.returncode == 0, done.stderr
    for dev in canary:
        wait_until(lambda d=dev: d.state() == "rolled_back", 90, dev.log)
        st = dev.layout.load_state()
        assert st.failed == ((2,) if kind == "crash" else (3,))
        assert ("exited" if kind == "crash" else "did not confirm") in st.reason
        assert dev.layout.current() == BASE
        assert wait_until(dev.serving, 60, dev.log) == "0.1.0"
        # The broken release made no lasting decision about the model: v2 is still active.
        assert dev.active_model_version() == 2
    # A release that failed here is refused from then on, before anything is built.
    again = canary[0].install_agent(package)
    assert again.returncode == EXIT_STORE
    assert "failed its trial" in again.stderr
    if kind == "crash":  # the operator may insist: tried again, and rolled back again
        dev = canary[0]
        retry = dev.cli(
            "agent", "install", str(package), "--retry-failed", "--agent-root",
            str(dev.layout.root), "--config", str(dev.config),
        )  # fmt: skip
        assert retry.returncode == 0, retry.stderr
        wait_until(lambda: dev.state() == "rolled_back", 90, dev.log)
        assert dev.layout.load_state().failed == (2,)
        assert wait_until(dev.serving, 60, dev.log) == "0.1.0"


@pytest.mark.parametrize(
    "failpoint", ["install-after-venv", "install-after-pip", "install-before-staged"]
)
def test_kill_9_during_the_install_leaves_the_agent_serving(
    make_device, releases: Releases, failpoint: str
) -> None:  # type: ignore[no-untyped-def]
    dev = make_device()
    dev.launch()
    assert wait_until(dev.serving, 60, dev.log) == "0.1.0"
    killed = dev.install_agent(releases.good, failpoint=failpoint)
    assert killed.returncode == -signal.SIGKILL
    assert dev.state() == ""  # never staged
    assert dev.serving() == "0.1.0"
    done = dev.install_agent(releases.good)  # the interrupted build is redone from scratch
    assert done.returncode == 0, done.stderr
    wait_until(lambda: dev.state() == "confirmed", 90, dev.log)
    assert wait_until(dev.serving, 30, dev.log) == "0.1.1"
