"""The rollout runner fills the output moments from stored telemetry, on SQLite and PostgreSQL.

Devices report real tier-A output drift windows (``DriftMonitor`` over softmax-like rows) every
minute, on v1 before a rollout and on v2 after it; the history job folds part of it into
rollups. The runner's observations must carry exactly the moments of the windows each device
reported in its window (members since they joined, the control group since the rollout
started) and the members' v1 windows from before they switched (the last wave's only
reference); a confidently wrong v2 then breaches the output gate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from clock import FakeClock
from edge_agent.drift import DriftMonitor, MonitorPolicy, build_baseline
from edge_agent.wire.reported import ModelReport, ReportedState
from edge_agent.wire.telemetry import DriftSummary
from fleet_server.jobs.history import HistoryJob
from fleet_server.jobs.rollout_runner import RolloutRunner
from fleet_server.registry.store import Registry
from fleet_server.registry.values import TelemetryEntry
from fleet_server.rollouts.metrics import OutputMoments
from fleet_server.rollouts.policy import RolloutPolicy, Selector

T0 = datetime(2026, 6, 1, 10, 0, 7, tzinfo=UTC)
DEVICES = tuple(f"dev-{i}" for i in range(6))
ROWS = 40  # output rows per report (one closed window)
EVEN = np.full(10, 0.1)
LABEL_BUG = np.array([0.1, 0.1, 0.1, 0.02, 0.1, 0.1, 0.1, 0.1, 0.18, 0.1])


def softmax_rows(rng: np.random.Generator, shares: np.ndarray, n: int) -> np.ndarray:
    """``n`` rows of a confident 10-class model answering classes with ``shares``."""
    k = rng.choice(10, n, p=shares / shares.sum())
    conf = rng.uniform(0.9, 0.999, n)
    out = np.repeat(((1 - conf) / 9)[:, None], 10, axis=1)
    out[np.arange(n), k] = conf
    return out


@dataclass
class Sent:
    """What one device reported: per report, when, its version and its output rows."""

    reports: list[tuple[datetime, int, np.ndarray | None]] = field(default_factory=list)

    def rows(self, version: int, lo: datetime, hi: datetime) -> np.ndarray:
        parts = [x for at, v, x in self.reports if v == version and lo <= at < hi and x is not None]
        return np.concatenate(parts) if parts else np.zeros((0, 10))


@dataclass
class Fleet:
    registry: Registry
    clock: FakeClock
    rng: np.random.Generator
    sent: dict[str, Sent] = field(default_factory=dict)
    seq: dict[str, int] = field(default_factory=dict)
    ok: dict[str, int] = field(default_factory=dict)
    monitors: dict[int, dict[str, DriftMonitor]] = field(default_factory=dict)

    def install(self, device: str, version: int) -> None:
        m = ModelReport(active=version, assigned=version, outcome="installed")
        self.registry.record_reported(
            device, ReportedState(device, 0.0, "0.1", 1, {"digits": m}).to_dict()
        )

    def report(self, device: str, version: int, shares: np.ndarray | None) -> None:
        """One report at the clock's time; ``shares`` None: a report without output windows."""
        seq = self.seq[device] = self.seq.get(device, 0) + 1
        self.ok[device] = self.ok.get(device, 0) + ROWS
        stats: dict[str, Any] = {
            "version": version,
            "outcomes": {"ok": self.ok[device], "error": 0, "rejected": 0},
            "sources": {"device": self.ok[device], "cloud": 0},
            "latency_buckets": [self.ok[device]] + [0] * 11,
        }
        rows = None
        if shares is not None:
            rows = softmax_rows(self.rng, shares, ROWS)
            windows = self.monitors[version][device].observe("probabilities", rows, now=seq)
            assert len(windows) == 1
            stats["drift"] = [DriftSummary.from_window(w).to_dict() for w in windows]
        self.sent.setdefault(device, Sent()).reports.append((self.clock.wall(), version, rows))
        payload = {"window_end": 1.0, "started_at": 1.0, "models": {"digits": stats}}
        self.registry.ingest(device, [TelemetryEntry(seq, "report", payload)])


def expected(rows: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    return len(rows), rows.sum(axis=0), (rows * rows).sum(axis=0)


def check(got: OutputMoments, rows: np.ndarray) -> None:
    n, s, sq = expected(rows)
    t = got.tensors["probabilities"]
    assert t.count == (n,) * 10  # counts merge exactly
    assert np.allclose(t.sum, s, rtol=1e-12)
    assert np.allclose(t.sumsq, sq, rtol=1e-12)
    assert got.mismatched == 0


@pytest.fixture
def fleet(registry_url: str) -> Fleet:
    clock = FakeClock(wall=T0)
    registry = Registry.open(registry_url, clock=clock.wall)
    registry.upgrade()
    rng = np.random.default_rng(12)
    for v in (1, 2):
        registry.publish_bundle(
            "digits", v, channel="stable", sha256=f"{v}" * 64, length=1, targets_sha256="0" * 64
        )
    # Each version has its own baseline (other bin edges): the moments do not depend on them.
    policy = MonitorPolicy(max_values=ROWS, min_values=1)
    f = Fleet(registry, clock, rng)
    for v, shares in ((1, EVEN), (2, LABEL_BUG)):
        base = build_baseline(
            {"input": rng.normal(size=(200, 2))},
            {"probabilities": softmax_rows(rng, shares, 400)},
        )
        f.monitors[v] = {d: DriftMonitor(base, policy) for d in DEVICES}
    for d in DEVICES:
        registry.enroll(d, group="g")
        f.install(d, 1)
    # 40 minutes on v1; the first report of a version carries no window (only a baseline).
    for minute in range(40):
        clock.set_wall(T0 + timedelta(minutes=minute))
        for d in DEVICES:
            f.report(d, 1, None if minute == 0 else EVEN)
    clock.set_wall(T0 + timedelta(minutes=40))
    return f


def serve_v2(f: Fleet, members: set[str], minutes: int) -> None:
    start = f.clock.wall()
    for minute in range(minutes):
        f.clock.set_wall(start + timedelta(minutes=minute, seconds=30))
        for d in DEVICES:
            if d in members:
                f.report(d, 2, None if minute == 0 else LABEL_BUG)
            else:
                f.report(d, 1, EVEN)
    f.clock.set_wall(start + timedelta(minutes=minutes))


def test_members_and_control_get_their_output_windows_from_raw_rows_and_rollups(
    fleet: Fleet,
) -> None:
    f = fleet
    runner = RolloutRunner(f.registry, _Service(f), f.clock.wall)
    policy = RolloutPolicy(canary_count=2, steps=(1.0,), dwell_seconds=600, min_devices=2)
    r = runner.create("digits", 2, selector=Selector(group="g"), policy=policy)
    assert r.from_version == 1
    runner.step(f.clock.wall())
    r = runner.get(r.id)
    members = set(r.members)
    assert len(members) == 2
    serve_v2(f, members, 25)
    # Fold what is older than the grace into rollups: the windows are part rollups, part raw.
    assert HistoryJob(f.registry, clock=f.clock.wall).run_once().fine_buckets > 0
    now = f.clock.wall()
    start = r.started_at
    assert start is not None
    obs = {o.device_id: o for o in runner.observations(r, now)}
    for d in DEVICES:
        if d in members:
            joined = r.members[d]
            check(obs[d].outputs, f.sent[d].rows(2, joined, now))
            check(obs[d].outputs_before, f.sent[d].rows(1, joined - (now - joined), joined))
        else:
            check(obs[d].outputs, f.sent[d].rows(1, start, now))
            assert obs[d].outputs_before == OutputMoments()  # only members have a "before"
    # The step judges them: 2 canaries answering with a label bug against 4 control devices.
    runner.step(now)
    g = next(g for g in runner.get(r.id).gates if g.name == "output_distribution")
    assert g.status == "breach", g.detail
    assert "class 3: 9.7% -> 2.5%" in g.detail
    assert "vs control on v1 (n=4000)" in g.detail
    assert "vs the same devices on v1 before the switch (n=2000)" in g.detail


def test_with_no_control_left_members_get_their_windows_before_the_switch(fleet: Fleet) -> None:
    f = fleet
    runner = RolloutRunner(f.registry, _Service(f), f.clock.wall)
    policy = RolloutPolicy(canary_fraction=1.0, steps=(1.0,), dwell_seconds=600, min_devices=2)
    r = runner.create("digits", 2, selector=Selector(group="g"), policy=policy)
    runner.step(f.clock.wall())
    r = runner.get(r.id)
    assert set(r.members) == set(DEVICES)
    serve_v2(f, set(DEVICES), 25)
    assert HistoryJob(f.registry, clock=f.clock.wall).run_once().fine_buckets > 0
    now = f.clock.wall()
    obs = {o.device_id: o for o in runner.observations(r, now)}
    for d in DEVICES:
        joined = r.members[d]
        check(obs[d].outputs, f.sent[d].rows(2, joined, now))
        # As long before joining as it has served since: 25 minutes of v1 windows.
        before = f.sent[d].rows(1, joined - (now - joined), joined)
        assert len(before) == 25 * ROWS
        check(obs[d].outputs_before, before)
    runner.step(now)
    g = next(g for g in runner.get(r.id).gates if g.name == "output_distribution")
    assert g.status == "breach", g.detail
    assert "vs the same devices on v1 before the switch" in g.detail


@dataclass
class _Service:
    """Assignments take effect at once: the device reports the version it was given."""

    fleet: Fleet

    def assign(self, target: str, name: str, version: int, *, group: bool = False) -> list[Any]:
        self.fleet.install(target, version)
        return []
