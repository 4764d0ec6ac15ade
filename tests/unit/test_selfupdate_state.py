"""The self-update state file, the trial confirmation and ``model-builder agent-package``."""

from __future__ import annotations

import json
import threading
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_agent.bundle.agent_archive import read_agent_package
from edge_agent.daemon import trial_check
from edge_agent.errors import EXIT_BAD_INPUT
from edge_agent.selfupdate.releases import BASE, MAX_FAILED, Layout, UpdateState
from edge_agent.selfupdate.trial import TrialWatch
from edge_agent.trust import TrustedRoot
from model_builder.cli import cli as builder_cli
from model_builder.errors import ERRORS, InputDataError
from model_builder.keystore import KeyStore
from support import NOW, wait_until


def test_state_round_trips_and_fail_remembers_the_candidate() -> None:
    st = UpdateState(state="trying", candidate=7, previous="6", failed=(3,), changed_at=1.0)
    assert UpdateState.from_bytes(st.to_bytes()) == st
    failed = st.fail("exit\x1b[31m 3\n")
    assert failed.state == "rolled_back"
    assert failed.failed == (3, 7)
    assert failed.reason == "exit?[31m 3?"  # printable only: it is shown and logged
    many = UpdateState(state="trying", candidate=999, failed=tuple(range(MAX_FAILED)))
    assert len(many.fail("x").failed) == MAX_FAILED
    assert many.fail("x").failed[-1] == 999


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"[]",
        b'{"state": "confirmed"}',
        b'{"state": "bogus", "schema_version": 1}',
        json.dumps(
            {
                "state": "confirmed",
                "schema_version": 1,
                "candidate": 1,
                "previous": "../../etc",
                "reason": "",
                "failed": [],
                "changed_at": 0,
            }
        ).encode(),
    ],
)
def test_a_damaged_state_file_reads_as_an_interrupted_trial(data: bytes) -> None:
    st = UpdateState.from_bytes(data)
    assert st.state == "trying"  # the launcher then rolls back to what runs safely
    assert st.previous == BASE


def test_current_names_only_complete_releases(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "agent", tmp_path / "base")
    assert layout.current() == BASE
    (layout.release_dir("4") / "bin").mkdir(parents=True)
    layout.switch("4")
    assert layout.current() == BASE  # no release.json: an interrupted build
    (layout.release_dir("4") / "release.json").write_text("{}")
    assert layout.current() == "4"
    layout.switch(BASE)
    assert layout.current() == BASE
    assert not layout.current_link.exists()


class FakeAgent:
    def __init__(self, down: dict[str, str]) -> None:
        self.down = down

    def not_ready(self) -> dict[str, str]:
        return self.down


class FakeSync:
    def __init__(self, reported: bool) -> None:
        self.reported = reported

    def has_reported(self) -> bool:
        return self.reported


def test_trial_check_needs_serving_models_ready_and_a_report() -> None:
    serving = threading.Event()
    ok, down = FakeAgent({}), FakeAgent({"digits": "golden samples failed"})
    assert trial_check(ok, None, serving) == "front ends not started"  # type: ignore[arg-type]
    serving.set()
    assert "digits" in str(trial_check(down, None, serving))  # type: ignore[arg-type]
    assert "reported" in str(trial_check(ok, FakeSync(False), serving))  # type: ignore[arg-type]
    assert trial_check(ok, FakeSync(True), serving) is None  # type: ignore[arg-type]
    assert trial_check(ok, None, serving) is None  # type: ignore[arg-type]


def test_trial_watch_writes_the_file_once_healthy(tmp_path: Path) -> None:
    healthy = threading.Event()
    path = tmp_path / "trial.json"
    watch = TrialWatch(path, 9, lambda: None if healthy.is_set() else "not yet")
    watch.start()
    try:
        assert not path.exists()
        healthy.set()
        wait_until(watch.confirmed.is_set, 10, "the trial to confirm")
    finally:
        watch.stop()
    doc = json.loads(path.read_text())
    assert doc["release"] == 9
    assert doc["healthy"] is True
    assert isinstance(doc["pid"], int)


def test_trial_watch_only_under_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEFLEET_TRIAL_FILE", raising=False)
    assert TrialWatch.from_env(lambda: None) is None
    monkeypatch.setenv("EDGEFLEET_TRIAL_FILE", "/x/trial.json")
    monkeypatch.setenv("EDGEFLEET_TRIAL_RELEASE", "not-a-number")
    assert TrialWatch.from_env(lambda: None) is None
    monkeypatch.setenv("EDGEFLEET_TRIAL_RELEASE", "12")
    watch = TrialWatch.from_env(lambda: None)
    assert watch is not None
    assert watch.release == 12


def test_agent_package_command_signs_a_verifiable_package(tmp_path: Path) -> None:
    keys = KeyStore.init(tmp_path / "ks", now=NOW)
    wheel = tmp_path / "edgefleet-0.5.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("edgefleet-0.5.0.dist-info/METADATA", "Name: edgefleet\nVersion: 0.5.0\n")
    result = CliRunner().invoke(
        builder_cli,
        ["agent-package", "--keystore", str(tmp_path / "ks"), "--release", "3",
         "--wheel", str(wheel), "--python", "3.11", "--arch", "x86_64", "--arch", "aarch64",
         "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    loaded = read_agent_package(
        tmp_path / "out" / "edgefleet-agent-3.efa",
        TrustedRoot.from_bytes(keys.root_bytes()),
        now=NOW,
        installed_release=None,
        host=None,
    )
    rel = loaded.verified.release
    assert (rel.release, rel.version, rel.compatibility.arch) == (3, "0.5.0", ("x86_64", "aarch64"))
    bad = CliRunner().invoke(
        builder_cli,
        ["agent-package", "--keystore", str(tmp_path / "ks"), "--release", "0",
         "--wheel", str(wheel), "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert isinstance(bad.exception, InputDataError)  # release 0 is not a release number
    assert ERRORS.exit_code(bad.exception) == EXIT_BAD_INPUT


def test_the_systemd_unit_runs_the_launcher_over_the_state_directory() -> None:
    unit = (Path(__file__).parents[2] / "deploy" / "edge-agent.service").read_text()
    lines = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and line[0] != "#")
    start = lines["ExecStart"].split()
    assert start[:3] == ["/opt/edgefleet/bin/python", "-m", "edge_agent.selfupdate.launcher"]
    root = start[start.index("--root") + 1]
    assert root.startswith("/var/lib/" + lines["StateDirectory"] + "/")
    assert start[start.index("--") + 1 :][:1] == ["run"]
    assert lines["NotifyAccess"] == "all"  # the agent's pings come from the launcher's child
    assert f"EDGEFLEET_AGENT_ROOT={root}" in unit
