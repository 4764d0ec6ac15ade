"""A confidently wrong candidate is halted at the canary wave by the DEFAULT policy; a good one
completes.

Twenty simulated devices serve real signed digits bundles through the agent's own
``ModelPipeline`` (validation, onnxruntime, drift sketching of the output tensor: the tier-A
windows the agents ship) on a fake clock, and report every 30 s into a real SQLite registry the
way the agent's telemetry does (cumulative counters, latency histograms, closed drift windows).
The rollout runner drives the rollout with ``RolloutPolicy()`` as it is; assignments take effect
at the device's next report. The bad candidate is ``examples.digits_mislabelled_mlp`` (most 3s
trained as 8s: about 9 points less accurate, confidence no lower, same inputs); the good one is
the live model under a new version number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bundles import DigitsBundles, mislabelled_bundle
from clock import FakeClock
from edge_agent.bundle import read_bundle
from edge_agent.config import DriftConfig, ModelPolicy
from edge_agent.runtime.base import RuntimeOptions
from edge_agent.runtime.loader import load_runtime
from edge_agent.serving.pipeline import ModelPipeline
from edge_agent.wire.reported import ModelReport, ReportedState
from edge_agent.wire.telemetry import DriftSummary
from fleet_server.jobs.rollout_runner import RolloutRunner
from fleet_server.registry.store import Registry
from fleet_server.registry.values import TelemetryEntry
from fleet_server.rollouts.policy import RolloutPolicy, Selector
from fleet_server.rollouts.state import Rollout

T0 = datetime(2026, 12, 7, 9, 0, 3, tzinfo=UTC)
DEVICES = tuple(f"dev-{i:02d}" for i in range(20))
INTERVAL = 30.0  # report interval and runner step (s)
PER_INTERVAL = 30  # one-row requests per device per interval (1 request/s)


@dataclass
class Device:
    id: str
    version: int = 1
    seq: int = 0
    ok: int = 0
    pipelines: dict[int, ModelPipeline] = field(default_factory=dict)


@dataclass
class World:
    registry: Registry
    clock: FakeClock
    bundles: dict[int, tuple[Any, bytes]]  # version -> (manifest, artifact)
    x: np.ndarray
    rng: np.random.Generator
    devices: dict[str, Device] = field(default_factory=dict)

    def pipeline(self, d: Device) -> ModelPipeline:
        if d.version not in d.pipelines:
            manifest, artifact = self.bundles[d.version]
            runtime = load_runtime(artifact, "onnx", RuntimeOptions())
            d.pipelines[d.version] = ModelPipeline(
                manifest, runtime, ModelPolicy(), DriftConfig(), clock=self.clock.monotonic
            )
            d.ok = 0  # a new pipeline counts from zero; the agent's counters are per version
        return d.pipelines[d.version]

    def install(self, device: str, version: int) -> None:
        self.devices[device].version = version
        m = ModelReport(active=version, assigned=version, outcome="installed")
        self.registry.record_reported(
            device, ReportedState(device, 0.0, "0.1", 1, {"digits": m}).to_dict()
        )

    def interval(self) -> None:
        """Every device answers its traffic, then reports; the clock moves on."""
        for d in self.devices.values():
            pipe = self.pipeline(d)
            for i in self.rng.integers(0, len(self.x), PER_INTERVAL):
                pipe.run({"input": self.x[i : i + 1]})
                d.ok += 1
        self.clock.advance(INTERVAL)
        for d in self.devices.values():
            pipe = self.pipeline(d)
            windows = pipe.collect_windows()
            stats: dict[str, Any] = {
                "version": d.version,
                "outcomes": {"ok": d.ok, "error": 0, "rejected": 0},
                "sources": {"device": d.ok, "cloud": 0},
                "latency_buckets": pipe.latency_histogram(),
                "latency_fine": pipe.latency_histogram_fine(),
                "drift": [DriftSummary.from_window(w).to_dict() for w in windows],
            }
            d.seq += 1
            payload = {"window_end": 1.0, "started_at": 1.0, "models": {"digits": stats}}
            self.registry.ingest(d.id, [TelemetryEntry(d.seq, "report", payload)])


@dataclass
class Service:
    world: World

    def assign(self, target: str, name: str, version: int, *, group: bool = False) -> list[Any]:
        self.world.install(target, version)
        return []


@pytest.fixture
def world(digits_bundles: DigitsBundles, tmp_path: Path) -> World:
    clock = FakeClock(wall=T0)
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}", clock=clock.wall)
    registry.upgrade()
    paths = {
        1: digits_bundles.path(1),
        2: digits_bundles.path(2),
        3: mislabelled_bundle(digits_bundles, 3, tmp_path),
    }
    loaded = {}
    for v, p in paths.items():
        b = read_bundle(
            p, digits_bundles.keys.trusted_root(), now=datetime.now(UTC),
            installed_version=None, device=None,
        )  # fmt: skip
        loaded[v] = (b.manifest, b.artifact)
        registry.publish_bundle(
            "digits", v, channel="stable", sha256=f"{v}" * 64, length=1, targets_sha256="0" * 64
        )
    w = World(registry, clock, loaded, digits_bundles.x_eval, np.random.default_rng(5))
    for d in DEVICES:
        registry.enroll(d, group="line-3")
        w.devices[d] = Device(d)
        w.install(d, 1)
    for _ in range(60):  # half an hour on v1 before any rollout
        w.interval()
    return w


def roll_out(w: World, version: int) -> Rollout:
    runner = RolloutRunner(w.registry, Service(w), w.clock.wall)
    r = runner.create("digits", version, selector=Selector(group="line-3"), policy=RolloutPolicy())
    assert r.from_version == 1
    for _ in range(400):
        runner.step(w.clock.wall())
        r = runner.get(r.id)
        if not r.active:
            return r
        w.interval()
    raise AssertionError(f"rollout still {r.state}: {r.reasons}")


def test_the_confidently_wrong_candidate_stops_at_the_canary(world: World) -> None:
    r = roll_out(world, 3)
    assert r.state == "paused", r.reasons
    assert r.wave == 0  # only the canary wave ever served it
    assert len(r.members) == 2
    served = [d.id for d in world.devices.values() if d.version == 3]
    assert sorted(served) == sorted(r.members)
    g = next(g for g in r.gates if g.name == "output_distribution")
    assert g.status == "breach", g.detail
    assert "class 3:" in g.detail
    assert "class 8:" in g.detail
    assert "vs control on v1" in g.detail
    assert "vs the same devices on v1 before the switch" in g.detail
    assert any(x.startswith("gate output_distribution breached") for x in r.reasons)
    # The gates that used to let it through saw nothing wrong.
    for name in ("reject_rate", "fallback_rate", "error_rate", "p99_latency"):
        assert next(g for g in r.gates if g.name == name).status != "breach", name


def test_a_good_candidate_completes(world: World) -> None:
    r = roll_out(world, 2)
    assert r.state == "completed", r.reasons
    assert all(d.version == 2 for d in world.devices.values())
    g = next(g for g in r.gates if g.name == "output_distribution")
    # The last wave had no control group left: judged against the devices before the switch.
    assert g.status == "ok", g.detail
    assert "vs the same devices on v1 before the switch" in g.detail
    assert "control" not in g.detail
