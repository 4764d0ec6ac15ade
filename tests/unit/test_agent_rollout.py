"""Agent releases roll out through the rollout engine: observation, decisions, runner, API, CLI.

The pure part (``observe_agent``, ``decide`` with ``AGENT_GATES``) with values; the runner over
a real SQLite registry and a fake service that records ``assign_agent``; the admin route and
``fleet-server agent rollout`` over the runner in-process.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.testclient import TestClient

from clock import FakeClock
from edge_agent.errors import EdgefleetError
from edge_agent.wire.reported import AgentReport, ModelReport, ReportedState
from edge_agent.wire.telemetry import ModelStats, TelemetryReport
from fleet_server.admin import client as admin_client
from fleet_server.admin.api import status_of
from fleet_server.admin.rollouts import Handler, rollout_routes
from fleet_server.cli import agent as cli_agent
from fleet_server.cli import rollouts as cli_rollouts
from fleet_server.errors import ModelNotPublishedError, QuarantinedVersionError
from fleet_server.jobs.rollout_runner import RolloutRunner
from fleet_server.registry import rollouts as store
from fleet_server.registry.labels import put_window
from fleet_server.registry.ops.agent_releases import AgentReleaseRecord, publish_agent_release
from fleet_server.registry.store import Registry
from fleet_server.rollouts.agent_observation import observe_agent
from fleet_server.rollouts.engine import abort, decide
from fleet_server.rollouts.gates import AGENT_GATES
from fleet_server.rollouts.label_selector import LabelSelector
from fleet_server.rollouts.metrics import DeviceObservation, WindowMetrics
from fleet_server.rollouts.policy import DisruptionBudget, RolloutPolicy, Selector, Thresholds
from fleet_server.rollouts.state import AGENT_ROLLOUT, Rollout
from fleet_server.rollouts.windows import MaintenanceWindow

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CAPABLE = [f"dev-{i}" for i in range(8)]
PLAIN = ["old-0", "old-1"]  # no launcher: never targeted
POLICY = RolloutPolicy(
    canary_count=2,
    steps=(0.5, 1.0),
    dwell_seconds=60,
    min_devices=2,
    min_requests=10,
    on_breach="abort",
    quarantine_after=1,
    thresholds=Thresholds(max_rollback_rate=0.1),
)


# --------------------------------------------------------------------------- observation
@dataclass(frozen=True)
class Row:
    seq: int
    kind: str
    received_at: datetime
    payload: dict[str, Any]


def _report(seq: int, at: datetime, started: float, ok: int, err: int = 0) -> Row:
    buckets = (0, 0, 0, ok + err, 0, 0, 0, 0, 0, 0, 0, 0)
    models = {
        name: ModelStats(version=v, outcomes={"ok": ok, "error": err, "rejected": 0},
                         sources={"device": ok, "cloud": 0}, latency_buckets=buckets)
        for name, v in (("digits", 1), ("faces", 3))
    }  # fmt: skip
    r = TelemetryReport("d", seq, 0.0, 1.0, started_at=started, models=models)
    return Row(seq, "report", at, r.to_dict())


def _reported(release: int | None, assigned: int | None, outcome: str, failed: tuple[int, ...] = ()
              ) -> dict[str, Any]:  # fmt: skip
    agent = AgentReport(release=release, assigned=assigned, outcome=outcome, failed=failed)
    return ReportedState("d", 0.0, "0.1", 1, {}, capabilities=("agent-update",),
                         agent=agent).to_dict()  # fmt: skip


def test_observe_agent_counts_every_model_of_the_running_process_only() -> None:
    since = T0 + timedelta(seconds=10)
    rows = [
        _report(1, T0, 1.0, 100),  # the old agent process
        _report(2, T0 + timedelta(seconds=20), 1.0, 200),
        _report(3, T0 + timedelta(seconds=30), 2.0, 10),  # the new release: a new process
        _report(4, T0 + timedelta(seconds=40), 2.0, 30, err=4),
        _report(5, T0 + timedelta(seconds=50), 2.0, 50, err=4),
    ]
    o = observe_agent("d", 2, since, _reported(2, 2, "installed"), rows)
    assert (o.active_version, o.rolled_back, o.install_failed) == (2, False, False)
    # Two intervals of the new process, both models: (20 + 4) + 20 requests each.
    assert o.metrics.reports == 2
    assert o.metrics.requests == 2 * (24 + 20)
    assert o.metrics.errors == 2 * 4
    # Before the assignment (``since``): the old agent's interval, the latency gate's reference.
    assert (o.metrics_before.reports, o.metrics_before.requests) == (0, 0)  # ends at 20 s >= 10
    late = observe_agent("d", 2, T0 + timedelta(seconds=25), _reported(2, 2, "installed"), rows)
    assert (late.metrics_before.reports, late.metrics_before.requests) == (1, 2 * 100)
    # On trial: the launcher may still take it back, so it does not report on release 2 yet.
    assert not observe_agent("d", 2, since, _reported(2, 2, "trying"), rows).reporting
    # Not yet switched (still release 1): nothing counts on release 2, it is not reporting.
    assert not observe_agent("d", 2, since, _reported(1, 2, "trying"), rows).reporting
    # The control group's device on release 1 counts its own current process.
    assert observe_agent("d", 1, since, _reported(1, None, "pending"), rows[:2]).reporting
    # So does one on the base install (no release, nothing assigned).
    assert observe_agent("d", None, since, _reported(None, None, "pending"), rows[:2]).reporting


def test_a_member_confirmed_before_its_first_report_is_not_judged_on_the_old_process() -> None:
    # The launcher confirms the new agent when it connects, before its first telemetry report;
    # meanwhile the newest reports are still the old process's (started before the assignment).
    since = T0 + timedelta(seconds=10)
    old = [
        _report(1, T0, 1.0, 100),
        _report(2, T0 + timedelta(seconds=20), 1.0, 200),
        _report(3, T0 + timedelta(seconds=30), 1.0, 300),
    ]
    confirmed = _reported(2, 2, "installed")
    o = observe_agent("d", 2, since, confirmed, old, member=True)
    assert not o.reporting
    assert (o.metrics.reports, o.metrics.requests) == (0, 0)
    # Its first reports as the new process count as soon as there are two.
    new = [*old, _report(4, T0 + timedelta(seconds=40), 2.0, 10),
           _report(5, T0 + timedelta(seconds=50), 2.0, 30)]  # fmt: skip
    o = observe_agent("d", 2, since, confirmed, new, member=True)
    assert o.reporting
    assert o.metrics.reports == 1
    # A control device's process may well predate the rollout: it counts.
    assert observe_agent("d", 1, since, _reported(1, None, "pending"), old).reporting


@pytest.mark.parametrize(
    ("reported", "failed", "rolled"),
    [
        (_reported(1, 2, "rolled_back", (2,)), False, True),
        (_reported(1, 3, "installed", (2,)), False, True),  # rolled back before, assigned on
        (_reported(1, 2, "failed"), True, False),
        (_reported(2, 2, "installed"), False, False),
        (_reported(1, 2, "downloading"), False, False),
        ({"agent": "not an object"}, False, False),
        (None, False, False),
    ],
)
def test_observe_agent_outcomes(reported: Any, failed: bool, rolled: bool) -> None:
    o = observe_agent("d", 2, T0, reported, [])
    assert (o.install_failed, o.rolled_back) == (failed, rolled)


# --------------------------------------------------------------------------- decide
def _rollout(**kw: Any) -> Rollout:
    base: dict[str, Any] = {
        "id": "ro-a",
        "model": AGENT_ROLLOUT,
        "from_version": 1,
        "to_version": 2,
        "selector": Selector(group="g"),
        "policy": POLICY,
        "created_at": T0,
    }
    return Rollout(**{**base, **kw})


def _obs(d: str, release: int, **kw: Any) -> DeviceObservation:
    return DeviceObservation(d, active_version=release, **kw)


def test_a_broken_release_aborts_at_the_canary_and_sends_nothing_back() -> None:
    ids = CAPABLE
    first = decide(_rollout(), [_obs(d, 1) for d in ids], T0, gates=AGENT_GATES)
    canary = set(first.assign)
    assert len(canary) == 2
    # Both canaries' launchers went back to release 1 after the trial.
    obs = [
        _obs(d, 1, assigned_version=2, outcome="rolled_back", rolled_back=True)
        if d in canary
        else _obs(d, 1)
        for d in ids
    ]
    later = T0 + timedelta(seconds=5)
    d = decide(first.rollout, obs, later, gates=AGENT_GATES)
    assert d.rollout.state == "aborted"
    assert set(d.rollout.rolled_back) == canary
    assert (d.assign, d.revert) == ((), ())  # never an older agent sent
    assert d.quarantine
    assert any("device_rollbacks" in r for r in d.reasons)
    # Nothing more happens to an aborted rollout: the next wave is never entered.
    assert decide(d.rollout, obs, later + timedelta(hours=1), gates=AGENT_GATES).assign == ()


def test_an_operator_abort_of_an_agent_rollout_sends_nothing_back() -> None:
    first = decide(_rollout(), [_obs(d, 1) for d in CAPABLE], T0, gates=AGENT_GATES)
    d = abort(first.rollout, T0)
    assert d.revert == ()
    assert d.rollout.state == "aborted"


def _metrics(requests: int, errors: int) -> WindowMetrics:
    buckets = (0, 0, 0, requests, 0, 0, 0, 0, 0, 0, 0, 0)
    return WindowMetrics(reports=2, requests=requests, errors=errors, latency_buckets=buckets)


def test_the_error_rate_of_the_new_agent_halts_the_wave_and_model_gates_do_not_run() -> None:
    first = decide(_rollout(), [_obs(d, 1) for d in CAPABLE], T0, gates=AGENT_GATES)
    canary = set(first.assign)
    obs = [
        _obs(d, 2, metrics=_metrics(500, 60))
        if d in canary
        else _obs(d, 1, metrics=_metrics(500, 1))
        for d in CAPABLE
    ]
    d = decide(first.rollout, obs, T0 + timedelta(seconds=61), gates=AGENT_GATES)
    assert d.rollout.state == "aborted", d.reasons
    names = {g.name for g in d.rollout.gates}
    assert names == {g.name for g in AGENT_GATES}
    assert names == {
        "install_failures", "device_rollbacks", "agent_reporting", "p99_latency", "error_rate"
    }  # fmt: skip
    assert [g.status for g in d.rollout.gates if g.name == "error_rate"] == ["breach"]


def test_with_no_control_left_latency_is_judged_against_the_same_devices_before() -> None:
    everyone = replace(POLICY, canary_count=len(CAPABLE))
    first = decide(_rollout(policy=everyone), [_obs(d, 1) for d in CAPABLE], T0, gates=AGENT_GATES)
    assert len(first.assign) == len(CAPABLE)
    slow = WindowMetrics(reports=2, requests=500, latency_buckets=(0,) * 10 + (500, 0))
    fast = WindowMetrics(reports=2, requests=500, latency_buckets=(0, 0, 500) + (0,) * 9)
    obs = [_obs(d, 2, metrics=slow, metrics_before=fast) for d in CAPABLE]
    d = decide(first.rollout, obs, T0 + timedelta(seconds=61), gates=AGENT_GATES)
    [gate] = [g for g in d.rollout.gates if g.name == "p99_latency"]
    assert gate.status == "breach", gate.detail
    assert d.rollout.state == "aborted"


def test_a_member_whose_new_agent_does_not_report_holds_the_wave() -> None:
    first = decide(_rollout(), [_obs(d, 1) for d in CAPABLE], T0, gates=AGENT_GATES)
    canary = set(first.assign)
    obs = [_obs(d, 2) if d in canary else _obs(d, 1, metrics=_metrics(100, 0)) for d in CAPABLE]
    d = decide(first.rollout, obs, T0 + timedelta(hours=1), gates=AGENT_GATES)
    assert d.rollout.state == "judging"
    assert d.assign == ()
    assert any("canary devices reporting on v2" in r for r in d.reasons)


def test_every_member_must_report_on_the_new_agent_not_only_min_devices() -> None:
    policy = replace(POLICY, min_devices=1)
    first = decide(_rollout(policy=policy), [_obs(d, 1) for d in CAPABLE], T0, gates=AGENT_GATES)
    quiet, talking = sorted(first.assign)
    obs = [
        _obs(d, 2, metrics=_metrics(100, 0)) if d == talking
        else _obs(d, 2) if d == quiet
        else _obs(d, 1, metrics=_metrics(100, 0))
        for d in CAPABLE
    ]  # fmt: skip
    d = decide(first.rollout, obs, T0 + timedelta(hours=1), gates=AGENT_GATES)
    assert (d.rollout.state, d.assign) == ("judging", ())
    [gate] = [g for g in d.rollout.gates if g.name == "agent_reporting"]
    assert gate.status == "waiting"
    assert quiet in gate.detail
    assert talking not in gate.detail
    obs = [replace(o, metrics=_metrics(100, 0)) if o.device_id == quiet else o for o in obs]
    d = decide(d.rollout, obs, T0 + timedelta(hours=1, seconds=1), gates=AGENT_GATES)
    assert len(d.assign) == 2, d.reasons  # the next wave


# --------------------------------------------------------------------------- runner
@dataclass
class Sent:
    published: bool
    error: str | None = None


@dataclass
class FakeService:
    agent: list[tuple[str, int]] = field(default_factory=list)
    models: list[tuple[str, str, int]] = field(default_factory=list)

    def assign(self, target: str, name: str, version: int, *, group: bool = False) -> list[Any]:
        self.models.append((target, name, version))
        return []

    def assign_shadow(self, *args: Any) -> None:
        raise AssertionError("an agent rollout has no shadow phase")

    def assign_agent(self, target: str, release: int, *, group: bool = False) -> list[Sent]:
        if target.startswith("down"):
            raise EdgefleetError("broker down")
        self.agent.append((target, release))
        return [Sent(True)]


@dataclass
class World:
    registry: Registry
    runner: RolloutRunner
    service: FakeService
    clock: FakeClock
    seqs: dict[str, int] = field(default_factory=dict)

    def agent(self, device: str, release: int | None, assigned: int | None = None,
              outcome: str = "installed", failed: tuple[int, ...] = (), capable: bool = True
              ) -> None:  # fmt: skip
        agent = AgentReport(release=release, assigned=assigned, outcome=outcome, failed=failed)
        digits = {"digits": ModelReport(active=1, assigned=1, outcome="installed")}
        caps = ("agent-update",) if capable else ()
        state = ReportedState(device, 0.0, "0.1", 1, digits, capabilities=caps,
                              agent=agent if capable else None)  # fmt: skip
        self.registry.record_reported(device, state.to_dict())

    def report(self, device: str, started: float, ok: int, err: int = 0) -> None:
        seq = self.seqs[device] = self.seqs.get(device, 0) + 1
        buckets = (0, 0, 0, ok + err, 0, 0, 0, 0, 0, 0, 0, 0)
        stats = ModelStats(version=1, outcomes={"ok": ok, "error": err, "rejected": 0},
                           sources={"device": ok, "cloud": 0}, latency_buckets=buckets)  # fmt: skip
        r = TelemetryReport(device, seq, 0.0, 1.0, started_at=started, models={"digits": stats})
        self.registry.ingest(device, [r])

    def healthy_window(self, members: set[str], release: int) -> None:
        """Members run ``release`` in a new process; everyone reports twice; time passes."""
        for d in CAPABLE:
            if d in members:
                self.agent(d, release, release)
            self.report(d, float(release) if d in members else 1.0, 100)
        self.clock.advance(30)
        for d in CAPABLE:
            self.report(d, float(release) if d in members else 1.0, 200)
        self.clock.advance(31)


def _publish(registry: Registry, release: int) -> None:
    digest, targets = f"{release}" * 64, f"{release + 3}" * 64
    record = AgentReleaseRecord(release, f"0.1.{release}", "3.11", digest, 10, targets, T0)
    publish_agent_release(registry, record)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    clock = FakeClock(wall=T0)
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}", clock=clock.wall)
    registry.upgrade()
    for d in [*CAPABLE, *PLAIN]:
        registry.enroll(d, group="line", tags={"site": "a"})
    for release in (1, 2, 3):
        _publish(registry, release)
    service = FakeService()
    runner = RolloutRunner(registry, service, clock.wall, interval=0.02)
    w = World(registry, runner, service, clock)
    for d in CAPABLE:
        w.agent(d, 1)
    for d in PLAIN:
        w.agent(d, None, capable=False)
    yield w
    runner.close()
    registry.close()


def test_create_agent_checks_the_release_and_targets_launcher_devices(world: World) -> None:
    r = world.runner.create_agent(2, selector=Selector(group="line"), policy=POLICY)
    assert (r.model, r.from_version, r.to_version, r.agent) == (AGENT_ROLLOUT, 1, 2, True)
    with pytest.raises(ModelNotPublishedError):
        world.runner.create_agent(9, selector=Selector(group="line"), policy=POLICY)
    states = world.runner.device_states(r)
    assert sorted(states) == CAPABLE  # the devices no launcher runs are not targeted
    assert set(states.values()) == {"control"}


def test_a_broken_release_halts_at_the_canary_the_rest_never_get_it(world: World) -> None:
    w = world
    r = w.runner.create_agent(2, selector=Selector(group="line"), policy=POLICY)
    [d] = w.runner.step()
    canary = set(d.assign)
    assert len(canary) == 2
    assert sorted(w.service.agent) == sorted((x, 2) for x in canary)
    assert w.service.models == []
    for x in canary:  # each launcher tried release 2 and went back to 1 by itself
        w.agent(x, 1, 2, "rolled_back", failed=(2,))
    w.clock.advance(5)
    [d] = w.runner.step()
    got = w.runner.get(r.id)
    assert got.state == "aborted", d.reasons
    assert set(got.rolled_back) == canary
    assert w.runner.device_states(got) == {
        x: "rolled_back" if x in canary else "control" for x in CAPABLE
    }
    assert store.quarantined(w.registry, AGENT_ROLLOUT, 2)
    for _ in range(3):
        w.clock.advance(120)
        w.runner.step()
    assert sorted(w.service.agent) == sorted((x, 2) for x in canary)  # nobody else, ever
    with pytest.raises(QuarantinedVersionError):
        w.runner.create_agent(2, selector=Selector(group="line"), policy=POLICY)


def test_a_good_release_completes_wave_by_wave(world: World) -> None:
    w = world
    r = w.runner.create_agent(2, selector=Selector(group="line"), policy=POLICY)
    members: set[str] = set()
    for _ in range(10):
        [d] = w.runner.step()
        members |= set(d.assign)
        if w.runner.get(r.id).state == "completed":
            break
        w.healthy_window(members, 2)
    final = w.runner.get(r.id)
    assert final.state == "completed", final.reasons
    assert members == set(CAPABLE)
    assert sorted(w.service.agent) == sorted((x, 2) for x in CAPABLE)
    assert {g.name for g in final.gates} == {g.name for g in AGENT_GATES}


def test_a_disruption_budget_holds_agent_assignments(world: World) -> None:
    w = world
    policy = RolloutPolicy(canary_count=2, dwell_seconds=60, min_devices=2,
                           disruption_budget=DisruptionBudget("site", max_devices=1))  # fmt: skip
    r = w.runner.create_agent(2, selector=Selector(group="line"), policy=policy)
    [d] = w.runner.step()
    assert len(d.assign) == 1
    got = w.runner.get(r.id)
    assert list(got.held.values()) == ["budget"]
    assert len(w.service.agent) == 1


def test_a_maintenance_window_holds_agent_assignments_until_it_opens(world: World) -> None:
    w = world
    window = MaintenanceWindow(
        "night", LabelSelector.parse("site=a"), frozenset({0}), time(2, 0), 60, "UTC"
    )
    put_window(w.registry, window, T0)
    r = w.runner.create_agent(2, selector=Selector(group="line"), policy=POLICY)
    [d] = w.runner.step()  # Sunday noon: closed
    assert d.assign == ()
    assert set(w.runner.get(r.id).held.values()) == {"window"}
    assert w.service.agent == []
    w.clock.advance((timedelta(hours=14, minutes=30)).total_seconds())  # Monday 02:30
    [d] = w.runner.step()
    assert len(d.assign) == 2
    assert sorted(w.service.agent) == sorted((x, 2) for x in d.assign)


# --------------------------------------------------------------------------- admin + CLI
def _guarded(handler: Handler) -> Handler:
    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except EdgefleetError as exc:
            return JSONResponse({"error": str(exc), "code": exc.code}, status_code=status_of(exc))

    return run


@pytest.fixture
def api(world: World) -> Iterator[TestClient]:
    app = Starlette(routes=rollout_routes(world.runner, _guarded))
    with TestClient(app) as client:
        yield client


def test_admin_route_creates_an_agent_rollout(world: World, api: TestClient) -> None:
    res = api.post("/v1/rollouts", json={"agent": 2, "group": "line"})
    assert res.status_code == 201, res.text
    assert (res.json()["model"], res.json()["to_version"]) == (AGENT_ROLLOUT, 2)
    world.runner.step()
    shown = api.get(f"/v1/rollouts/{res.json()['id']}").json()
    assert sum(shown["counts"].values()) == len(CAPABLE)
    for bad, code in (
        ({"agent": 2, "model": "digits", "group": "line"}, 400),
        ({"agent": 2, "group": "line", "override_offline": "x"}, 400),
        ({"agent": "2", "group": "line"}, 400),
        ({"agent": 0, "group": "line"}, 400),
        ({"agent": 7, "group": "line"}, 404),
    ):
        got = api.post("/v1/rollouts", json=bad)
        assert got.status_code == code, (bad, got.text)


def test_cli_agent_rollout(world: World, api: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    transport = api._transport  # the TestClient's in-process transport

    def client(url: str, token: str) -> admin_client.AdminClient:
        return admin_client.AdminClient(url, token, transport=transport)

    monkeypatch.setattr(cli_agent, "AdminClient", client)
    monkeypatch.setattr(cli_rollouts, "AdminClient", client)

    @click.group()
    def main() -> None:
        pass

    cli_agent.register_agent_commands(main)
    cli_rollouts.register_rollout_commands(main)
    args = ["--url", "http://testserver", "--token", "t"]
    res = CliRunner().invoke(main, ["agent", "rollout", "2", "--group", "line", "--canary-count",
                                    "2", "--dwell", "30", "--on-breach", "abort",
                                    "--max-rollback-rate", "0.2", "--json", *args])  # fmt: skip
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["policy"]["canary_count"] == 2
    assert r["policy"]["on_breach"] == "abort"
    assert r["policy"]["thresholds"]["max_rollback_rate"] == 0.2
    world.runner.step()
    view = CliRunner().invoke(main, ["rollouts", "status", r["id"], *args])
    assert view.exit_code == 0, view.output
    assert "agent release 1 -> 2" in view.output
    assert "assigned 2" in view.output
    text = CliRunner().invoke(main, ["agent", "rollout", "3", "--group", "line", *args])
    assert "agent release 1 -> 3 on group=line" in text.output
    bad = CliRunner().invoke(main, ["agent", "rollout", "2", *args])
    assert bad.exit_code == 2
    assert "exactly one of --group" in bad.output
