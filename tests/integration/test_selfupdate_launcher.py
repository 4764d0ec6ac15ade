"""The launcher as a real process over a real base virtualenv, with small shell agents.

The agents here are shell scripts (fast, and each behaves exactly as asked: confirms its trial,
crashes at start, or never confirms), so the launcher's state machine is tested on its own,
including a real kill -9 at every step of the switch, the trial and the rollback
(``EDGEFLEET_FAILPOINT`` makes the named step SIGKILL its own process). The real agent in real
release virtualenvs: tests/integration/test_agent_selfupdate.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

import edge_agent
from edge_agent.selfupdate.releases import BASE, ENV_FAILPOINT, Layout, UpdateState
from support import wait_until

SRC = Path(edge_agent.__file__).resolve().parents[1]

OK = """#!/bin/sh
echo "{name} $$" >> "$EDGEFLEET_AGENT_ROOT/../runs.log"
if [ -n "$EDGEFLEET_TRIAL_FILE" ]; then
  printf '{{"release": %s, "pid": %s, "healthy": true}}' "$EDGEFLEET_TRIAL_RELEASE" $$ \\
    > "$EDGEFLEET_TRIAL_FILE.tmp" && mv "$EDGEFLEET_TRIAL_FILE.tmp" "$EDGEFLEET_TRIAL_FILE"
fi
exec sleep 600
"""
CRASH = """#!/bin/sh
echo "{name} $$" >> "$EDGEFLEET_AGENT_ROOT/../runs.log"
exit 3
"""
HANG = """#!/bin/sh
echo "{name} $$" >> "$EDGEFLEET_AGENT_ROOT/../runs.log"
exec sleep 600
"""
EXIT7 = """#!/bin/sh
echo "{name} $$" >> "$EDGEFLEET_AGENT_ROOT/../runs.log"
exit 7
"""


def _script(path: Path, body: str, name: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body.format(name=name))
    path.chmod(0o755)


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real base install: a venv whose .pth reaches edgefleet's source and dependencies."""
    base = tmp_path_factory.mktemp("base") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(base)], check=True)
    site = sysconfig.get_paths()["purelib"]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    pth = base / "lib" / f"python{version}" / "site-packages" / "edgefleet-test.pth"
    pth.write_text(f"{SRC}\n{site}\n")
    return base


class Device:
    """One launcher root with a base agent and releases made of shell scripts."""

    def __init__(self, tmp: Path, base: Path) -> None:
        self.tmp = tmp
        self.base = base
        self.layout = Layout(tmp / "agent", base)
        self.procs: list[subprocess.Popen[bytes]] = []
        _script(base / "bin" / "edge-agent", OK, BASE)

    def release(self, n: int, body: str) -> None:
        d = self.layout.release_dir(str(n))
        _script(d / "bin" / "edge-agent", body, str(n))
        (d / "release.json").write_text("{}")

    def stage(self, n: int) -> None:
        st = self.layout.load_state()
        self.layout.save_state(
            UpdateState(
                state="staged", candidate=n, previous=self.layout.current(), failed=st.failed
            )
        )

    def launch(self, trial_seconds: float = 30, failpoint: str = "") -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k != ENV_FAILPOINT}
        if failpoint:
            env[ENV_FAILPOINT] = failpoint
        proc = subprocess.Popen(
            [str(self.base / "bin" / "python"), "-m", "edge_agent.selfupdate.launcher",
             "--root", str(self.layout.root), "--trial-seconds", str(trial_seconds),
             "--", "run"],
            env=env, stderr=(self.tmp / "launcher.log").open("ab"),
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def runs(self) -> list[tuple[str, int]]:
        try:
            lines = (self.tmp / "runs.log").read_text().split("\n")
        except FileNotFoundError:
            return []
        return [(a, int(b)) for a, b in (line.split() for line in lines if line)]

    def running(self) -> str | None:
        """The name of the agent that runs now (the last one started, if it lives)."""
        runs = self.runs()
        return runs[-1][0] if runs and alive(runs[-1][1]) else None

    def log(self) -> str:
        return (self.tmp / "launcher.log").read_text()


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def device(tmp_path: Path, base_venv: Path) -> Iterator[Device]:
    dev = Device(tmp_path, base_venv)
    yield dev
    for p in dev.procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    for _, pid in dev.runs():
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_launcher_imports_only_the_standard_library_and_its_own_modules(
    base_venv: Path,
) -> None:
    code = (
        "import sys; before = set(sys.modules); import edge_agent.selfupdate.launcher; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run(
        [str(base_venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    ours = {m for m in out if m.startswith("edge_agent")}
    assert ours == {
        "edge_agent", "edge_agent.common", "edge_agent.common.durable", "edge_agent.selfupdate",
        "edge_agent.selfupdate.launcher", "edge_agent.selfupdate.releases",
    }  # fmt: skip
    third_party = {m.split(".")[0] for m in out} - set(sys.stdlib_module_names) - {"edge_agent"}
    assert not third_party


def test_good_release_is_tried_and_confirmed(device: Device) -> None:
    proc = device.launch()
    wait_until(lambda: device.running() == BASE, 20, device.log)
    device.release(1, OK)
    device.stage(1)
    wait_until(lambda: device.layout.load_state().state == "confirmed", 20, device.log)
    assert device.running() == "1"
    assert device.layout.current() == "1"
    assert [name for name, _ in device.runs()] == [BASE, "1"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    wait_until(lambda: device.running() is None, 10, "the agent to stop with the launcher")


@pytest.mark.parametrize(
    ("body", "why"),
    [(CRASH, "exited with code 3"), (HANG, "did not confirm")],
    ids=["crash", "hang"],
)
def test_bad_release_rolls_back_by_itself(device: Device, body: str, why: str) -> None:
    device.launch(trial_seconds=3)
    wait_until(lambda: device.running() == BASE, 20, device.log)
    device.release(2, body)
    device.stage(2)
    wait_until(lambda: device.layout.load_state().state == "rolled_back", 30, device.log)
    st = device.layout.load_state()
    assert why in st.reason
    assert st.failed == (2,)
    assert device.layout.current() == BASE
    wait_until(lambda: device.running() == BASE, 20, device.log)
    assert [name for name, _ in device.runs()] == [BASE, "2", BASE]


def test_outside_a_trial_the_agent_exit_code_is_the_launcher_exit_code(device: Device) -> None:
    _script(device.base / "bin" / "edge-agent", EXIT7, BASE)
    assert device.launch().wait(30) == 7


def test_a_damaged_state_file_is_read_as_an_interrupted_trial(device: Device) -> None:
    device.release(1, OK)
    device.layout.switch("1")
    device.layout.state_file.write_bytes(b"{not json")
    device.launch()
    wait_until(lambda: device.running() == BASE, 20, device.log)
    assert device.layout.load_state().state == "rolled_back"
    assert device.layout.current() == BASE


# Each step of the switch, the trial and the rollback: kill -9 there, start again, and a working
# agent runs (the previous one: an unconfirmed release never survives its launcher).
@pytest.mark.parametrize(
    ("failpoint", "body"),
    [
        ("launcher-after-trying", OK),
        ("launcher-after-switch", OK),
        ("launcher-after-spawn", OK),
        ("launcher-before-confirm", OK),
        ("launcher-before-rollback", CRASH),
        ("launcher-after-switch-back", CRASH),
    ],
    ids=lambda v: v if v.startswith("launcher") else "",
)
def test_kill_9_at_every_step_leaves_a_working_agent(
    device: Device, failpoint: str, body: str
) -> None:
    device.release(1, body)
    device.stage(1)
    killed = device.launch(trial_seconds=5, failpoint=failpoint)
    assert killed.wait(30) == -signal.SIGKILL
    wait_until(lambda: device.running() is None, 10, "the orphaned agent to die")
    device.launch(trial_seconds=5)
    wait_until(lambda: device.running() == BASE, 20, device.log)
    st = device.layout.load_state()
    assert st.state == "rolled_back"
    assert st.failed == (1,)
    assert device.layout.current() == BASE
    assert "1" not in [name for name, _ in device.runs()][-1:]


def test_kill_9_after_confirmation_keeps_the_new_release(device: Device) -> None:
    device.release(1, OK)
    device.stage(1)
    first = device.launch()
    wait_until(lambda: device.layout.load_state().state == "confirmed", 20, device.log)
    first.kill()
    first.wait()
    wait_until(lambda: device.running() is None, 10, "the orphaned agent to die")
    device.launch()
    wait_until(lambda: device.running() == "1", 20, device.log)
    assert device.layout.load_state().state == "confirmed"


def test_a_failed_release_staged_again_is_not_retried_by_a_restart(device: Device) -> None:
    device.release(1, CRASH)
    device.stage(1)
    device.launch(trial_seconds=5)
    wait_until(lambda: device.layout.load_state().state == "rolled_back", 20, device.log)
    wait_until(lambda: device.running() == BASE, 20, device.log)
    device.release(2, OK)  # the next release still goes through
    device.stage(2)
    wait_until(lambda: device.layout.load_state().state == "confirmed", 20, device.log)
    assert device.layout.load_state().failed == (1,)
    assert device.running() == "2"
