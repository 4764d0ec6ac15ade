"""The rollout runner halts a confidently wrong canary when labels flow (real registry: SQLite
and PostgreSQL).

Devices report what their applications told them (cumulative confusion counts per version in
the ``ground_truth`` part of their telemetry); the runner observes the window from the stored
rows, merges the counts per cohort and the ``ground_truth`` gate compares the canary's
labelled accuracy with the control group's. Every other signal is healthy and equal on both
sides (same traffic, latency, no rejects): only the labels show the canary is wrong. Without
labels the same rollout moves on, the gate reporting "no labels". The operator sees the gate's
detail in ``rollouts status`` (``render_rollout``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from clock import FakeClock
from edge_agent.quality.confusion import Confusion
from edge_agent.wire.reported import ModelReport, ReportedState
from edge_agent.wire.telemetry import ModelStats, TelemetryReport
from edge_agent.wire.telemetry_ground_truth import GroundTruthStats
from fleet_server.admin.rollouts import rollout_routes
from fleet_server.cli.rollouts import render_rollout
from fleet_server.jobs.rollout_runner import RolloutRunner
from fleet_server.registry.store import Registry
from fleet_server.rollouts.policy import RolloutPolicy, Selector

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
IDS = [f"dev-{i}" for i in range(10)]
# The default thresholds (the ground_truth gate: 2 points, 200 labels a side).
POLICY = RolloutPolicy(
    canary_count=2, steps=(0.5, 1.0), dwell_seconds=60, min_devices=2, min_requests=10,
    on_breach="abort",
)  # fmt: skip


@dataclass
class Assigned:
    calls: list[tuple[str, str, int]] = field(default_factory=list)

    def assign(self, target: str, name: str, version: int, *, group: bool = False) -> list[None]:
        self.calls.append((target, name, version))
        return []


def labels(n: int, accuracy: float) -> Confusion:
    """``n`` labelled digits, a share ``accuracy`` right; the wrong ones are 3s answered as 8s."""
    rows = [[0] * 10 for _ in range(10)]
    right = round(n * accuracy)
    for i in range(right):
        rows[i % 10][i % 10] += 1
    rows[3][8] += n - right
    return Confusion(tuple(tuple(r) for r in rows))


@dataclass
class World:
    registry: Registry
    runner: RolloutRunner
    clock: FakeClock
    seqs: dict[str, int] = field(default_factory=dict)

    def install(self, device: str, version: int) -> None:
        m = ModelReport(active=version, assigned=version, outcome="installed")
        doc = ReportedState(device, 0.0, "0.1", 1, {"digits": m}).to_dict()
        self.registry.record_reported(device, doc)

    def report(self, device: str, version: int, ok: int, truth: Confusion | None) -> None:
        seq = self.seqs[device] = self.seqs.get(device, 0) + 1
        gt = None if truth is None else GroundTruthStats({"counted": truth.n}, {version: truth})
        stats = ModelStats(
            version=version,
            outcomes={"ok": ok, "error": 0, "rejected": 0},
            sources={"device": ok, "cloud": 0},
            latency_buckets=(0, 0, 0, ok, 0, 0, 0, 0, 0, 0, 0, 0),
            ground_truth=gt,
        )
        r = TelemetryReport(device, seq, 0.0, 1.0, started_at=1.0, models={"digits": stats})
        self.registry.ingest(device, [r])

    def window(self, members: set[str], canary_accuracy: float | None) -> None:
        """Everyone reports twice on its version; with labels, 150 new ones per device."""
        for d in IDS:
            if d in members:
                self.install(d, 2)
            self.report(d, 2 if d in members else 1, 100, None)
        self.clock.advance(30)
        for d in IDS:
            accuracy = 0.99 if d not in members else canary_accuracy
            truth = None if accuracy is None else labels(150, accuracy)
            self.report(d, 2 if d in members else 1, 200, truth)
        self.clock.advance(31)


@pytest.fixture
def world(registry_url: str) -> Iterator[World]:
    clock = FakeClock(wall=T0)
    registry = Registry.open(registry_url, clock=clock.wall)
    registry.upgrade()
    for d in IDS:
        registry.enroll(d, group="line-3")
    for v in (1, 2):
        registry.publish_bundle("digits", v, channel="stable", sha256=f"{v}" * 64, length=10,
                                targets_sha256=f"{v + 2}" * 64)  # fmt: skip
    runner = RolloutRunner(registry, Assigned(), clock.wall, interval=0.02)
    w = World(registry, runner, clock)
    for d in IDS:
        w.install(d, 1)
    yield w
    runner.close()
    registry.engine.dispose()


def gate(decision_gates: object) -> dict[str, str]:
    [g] = [g for g in decision_gates if g.name == "ground_truth"]  # type: ignore[attr-defined]
    return {"status": g.status, "detail": g.detail}


def test_a_confidently_wrong_canary_is_stopped_by_its_labels(world: World) -> None:
    r = world.runner.create("digits", 2, selector=Selector(group="line-3"), policy=POLICY)
    [d] = world.runner.step()
    canaries = set(d.assign)
    world.window(canaries, canary_accuracy=0.90)  # 10 points worse than control
    [d] = world.runner.step()
    assert d.rollout.state == "aborted", d.reasons
    g = gate(d.rollout.gates)
    assert g["status"] == "breach"
    assert "90.0% of 300 labelled" in g["detail"]
    assert "98.7% of 1200 labelled" in g["detail"]  # 8 control devices, 148 of 150 right
    assert "3->8 x30" in g["detail"]  # which class it answers wrongly as which
    # Every other gate saw nothing wrong: only the labels stopped it.
    others = {x.name: x.status for x in d.rollout.gates if x.name != "ground_truth"}
    assert "breach" not in others.values(), others
    assert set(d.rollout.members) == canaries  # no device past the canary wave got it
    # The operator reads which gate stopped it, and why, in rollouts status.
    app = Starlette(routes=rollout_routes(world.runner, lambda handler: handler))
    with TestClient(app) as api:
        body = api.get(f"/v1/rollouts/{r.id}").json()
    shown = "\n".join(render_rollout(body))
    assert re.search(r"ground_truth +breach +-8\.67", shown), shown
    assert "3->8 x30" in shown


def test_without_labels_the_rollout_moves_on(world: World) -> None:
    world.runner.create("digits", 2, selector=Selector(group="line-3"), policy=POLICY)
    [d] = world.runner.step()
    world.window(set(d.assign), canary_accuracy=None)
    [d] = world.runner.step()
    assert d.rollout.wave == 1, d.reasons
    assert gate(d.rollout.gates) == {"status": "skipped", "detail": "no labels"}


def test_a_good_canary_with_labels_moves_on(world: World) -> None:
    world.runner.create("digits", 2, selector=Selector(group="line-3"), policy=POLICY)
    [d] = world.runner.step()
    world.window(set(d.assign), canary_accuracy=0.99)
    [d] = world.runner.step()
    assert d.rollout.wave == 1, d.reasons
    assert gate(d.rollout.gates)["status"] == "ok"
