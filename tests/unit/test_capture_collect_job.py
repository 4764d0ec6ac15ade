"""The server's periodic capture collection: ``[capture] collect_interval_seconds``, the job
``fleet_server.server.capture_collector`` builds (on the leader lock), and
``CaptureService.collect_enabled`` (every enabled model's cohort, disabled and empty ones
skipped), against a real registry and real signed commands."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from test_diagnostics_server import Clock, Recorder

from bundles import DigitsBundles
from edge_agent.trust.command import verify_command
from edge_agent.wire.topics import Topics
from fleet_server.capture.service import CaptureService
from fleet_server.capture.store import DatasetStore
from fleet_server.config import load_config
from fleet_server.diagnostics.service import Diagnostics
from fleet_server.errors import ServerConfigError
from fleet_server.registry.store import Registry
from fleet_server.server import capture_collector

T = Topics()
EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "fleet-server.example.toml"


class World:
    def __init__(self, tmp: Path, bundles: DigitsBundles) -> None:
        self.registry = Registry.open(f"sqlite:///{tmp / 'registry.db'}")
        self.registry.upgrade()
        for device, group in (("cam-1", "line"), ("cam-2", "line"), ("cam-3", "yard")):
            self.registry.enroll(device, group=group)
        self.keys = bundles.keys
        self.sent = Recorder()
        self.diag = Diagnostics(
            self.registry,
            self.sent,  # type: ignore[arg-type]  # the publish half of Transport
            T,
            [self.keys.signer("online-1")],
            tmp / "diag",
            clock=Clock(),
        )
        self.capture = CaptureService(
            self.registry, self.diag, DatasetStore(tmp / "datasets", self.registry), clock=Clock()
        )

    def uploads_asked(self, device: str) -> list[dict[str, object]]:
        root = self.keys.trusted_root()
        asked = []
        for payload, _ in self.sent.on(T.device("commands", device)):
            cmd = verify_command(
                root,
                payload,
                now=datetime(2026, 6, 1, tzinfo=UTC),
                device_id=device,
                last_sequence=0,
            )
            if cmd.name == "capture-upload":
                asked.append(dict(cmd.args))
        return asked

    def close(self) -> None:
        self.diag.close()
        self.registry.close()


@pytest.fixture
def world(tmp_path: Path, digits_bundles: DigitsBundles) -> Iterator[World]:
    w = World(tmp_path, digits_bundles)
    yield w
    w.close()


def test_collect_enabled_asks_every_enabled_cohort_and_skips_the_rest(world: World) -> None:
    world.capture.enable("digits", {"group": "line"})
    world.capture.enable("other", {"devices": ["cam-3"]})
    world.capture.disable("other")
    done = world.capture.collect_enabled(timedelta(minutes=30))
    assert set(done) == {"digits"}
    assert {c.device_id for c in done["digits"].issued.commands} == {"cam-1", "cam-2"}
    for device in ("cam-1", "cam-2"):
        (args,) = world.uploads_asked(device)
        assert args["model"] == "digits"
    assert world.uploads_asked("cam-3") == []  # its model's upload is off


def test_a_cohort_that_emptied_is_skipped_and_counted_not_fatal(world: World) -> None:
    world.capture.enable("digits", {"group": "line"})
    world.capture.enable("yard", {"group": "yard"})
    world.registry.revoke("cam-3")
    done = world.capture.collect_enabled()
    assert set(done) == {"digits"}
    assert world.capture.stats()["collects_skipped"] == 1


def test_the_server_job_collects_on_the_leader_at_the_configured_interval(
    world: World, tmp_path: Path
) -> None:
    path = tmp_path / "server.toml"
    path.write_text("[capture]\ncollect_interval_seconds = 600\n")
    config = load_config(path, env={})
    job = capture_collector(config, world.registry, world.capture)
    assert job is not None
    world.capture.enable("digits", {"group": "line"})
    try:
        assert job.run_tick()  # the leader lock is free: this job leads and collects
        assert job.run_tick()
    finally:
        job.close()
    assert len(world.uploads_asked("cam-1")) == 2
    off = tmp_path / "off.toml"
    off.write_text("[capture]\ncollect_interval_seconds = 0\n")
    assert capture_collector(load_config(off, env={}), world.registry, world.capture) is None


def test_defaults_and_the_example_config() -> None:
    assert load_config(None, env={}).capture.collect_interval_seconds == 3600.0
    assert load_config(EXAMPLE, env={}).capture == load_config(None, env={}).capture


@pytest.mark.parametrize("value", ["-1", "1", "59", "604801", '"hourly"', "nan"])
def test_bad_intervals_are_refused(tmp_path: Path, value: str) -> None:
    path = tmp_path / "server.toml"
    path.write_text(f"[capture]\ncollect_interval_seconds = {value}\n")
    with pytest.raises(ServerConfigError, match="collect_interval_seconds"):
        load_config(path, env={})
