"""RolloutRunner over a real SQLite registry and a fake service; its admin routes and CLI."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
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
from edge_agent.wire.reported import ModelReport, ReportedState
from edge_agent.wire.telemetry import ModelStats, TelemetryReport
from fleet_server.admin import client as admin_client
from fleet_server.admin.api import status_of
from fleet_server.admin.rollouts import Handler, rollout_routes
from fleet_server.cli import rollouts as cli_rollouts
from fleet_server.errors import (
    NotFoundError,
    QuarantinedVersionError,
    RolloutConflictError,
    RolloutStateError,
    UnknownRolloutError,
)
from fleet_server.jobs.rollout_runner import RolloutRunner
from fleet_server.registry import rollouts as store
from fleet_server.registry.store import Registry
from fleet_server.rollouts.engine import decide
from fleet_server.rollouts.policy import RolloutPolicy, Selector, Thresholds

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
IDS = [f"dev-{i}" for i in range(10)]
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


@dataclass
class FakeService:
    assigned: list[tuple[str, str, int]] = field(default_factory=list)
    fail_for: set[str] = field(default_factory=set)

    def assign(self, target: str, name: str, version: int, *, group: bool = False) -> list[Any]:
        if target in self.fail_for:
            raise EdgefleetError("broker down")
        self.assigned.append((target, name, version))
        return []


@dataclass
class World:
    registry: Registry
    runner: RolloutRunner
    service: FakeService
    clock: FakeClock
    seqs: dict[str, int] = field(default_factory=dict)

    def install(self, device: str, active: int, assigned: int, outcome: str = "installed") -> None:
        m = ModelReport(active=active, assigned=assigned, outcome=outcome)
        self.registry.record_reported(
            device, ReportedState(device, 0.0, "0.1", 1, {"digits": m}).to_dict()
        )

    def report(self, device: str, version: int, ok: int) -> None:
        seq = self.seqs[device] = self.seqs.get(device, 0) + 1
        buckets = (0, 0, 0, ok, 0, 0, 0, 0, 0, 0, 0, 0)
        stats = ModelStats(version=version, outcomes={"ok": ok, "error": 0, "rejected": 0},
                           sources={"device": ok, "cloud": 0}, latency_buckets=buckets)  # fmt: skip
        r = TelemetryReport(device, seq, 0.0, 1.0, started_at=1.0, models={"digits": stats})
        self.registry.ingest(device, [r])

    def healthy_window(self, members: set[str]) -> None:
        """Members installed v2, everyone reports twice on its version, some time passes."""
        for d in IDS:
            version = 2 if d in members else 1
            if d in members:
                self.install(d, 2, 2)
            self.report(d, version, 100)
        self.clock.advance(30)
        for d in IDS:
            self.report(d, 2 if d in members else 1, 200)
        self.clock.advance(31)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    clock = FakeClock(wall=T0)
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}", clock=clock.wall)
    registry.upgrade()
    for d in IDS:
        registry.enroll(d, group="line-3", tags={"site": "a"})
    registry.enroll("other", group="lab")
    for v in (1, 2):
        registry.publish_bundle("digits", v, channel="stable", sha256=f"{v}" * 64, length=10,
                                targets_sha256=f"{v + 2}" * 64)  # fmt: skip
    service = FakeService()
    runner = RolloutRunner(registry, service, clock.wall, interval=0.02)
    w = World(registry, runner, service, clock)
    for d in IDS:
        w.install(d, 1, 1)
    yield w
    runner.close()
    registry.close()


def test_create_infers_from_version_and_checks_the_bundle(world: World) -> None:
    r = world.runner.create("digits", 2, selector=Selector(group="line-3"), policy=POLICY)
    assert (r.from_version, r.state) == (1, "pending")
    with pytest.raises(NotFoundError):
        world.runner.create("digits", 9, selector=Selector(group="line-3"), policy=POLICY)


def test_waves_progress_and_a_device_rollback_aborts_and_quarantines(world: World) -> None:
    w = world
    r = w.runner.create("digits", 2, selector=Selector(tags={"site": "a"}), policy=POLICY)
    [d] = w.runner.step()
    canaries = set(d.assign)
    assert len(canaries) == 2
    assert w.service.assigned == [(x, "digits", 2) for x in d.assign]
    w.healthy_window(canaries)
    [d] = w.runner.step()
    assert d.rollout.wave == 1, d.reasons
    assert len(d.assign) == 3
    assert not canaries & set(d.assign)
    members = set(d.rollout.members)
    states = w.runner.device_states(d.rollout)
    assert "other" not in states  # not targeted
    assert {states[x] for x in canaries} == {"installed"}
    assert sorted(states.values()).count("assigned") == 3
    # One member goes back on its own: seen at the next step, the rollback gate breaches
    # (rollout_gates.safety_gates): abort, revert, quarantine.
    victim = sorted(canaries)[0]
    w.install(victim, 1, 2, outcome="rolled_back")
    w.service.assigned.clear()
    [d] = w.runner.step()
    assert d.rollout.state == "aborted"
    assert d.quarantine
    assert sorted(d.revert) == sorted(members)
    assert (victim, "digits", 1) in w.service.assigned
    assert not any(v == 2 for _, _, v in w.service.assigned)
    assert store.quarantined(w.registry, "digits", 2)
    kinds = [e.kind for e in store.rollout_events(w.registry, r.id)]
    assert kinds[0] == "created"
    assert kinds.count("decision") == 3
    with pytest.raises(QuarantinedVersionError):
        w.runner.create("digits", 2, selector=Selector(group="line-3"), policy=POLICY)
    assert w.runner.step() == []  # nothing active


def test_commands(world: World) -> None:
    w = world
    r = w.runner.create("digits", 2, selector=Selector(group="line-3"), policy=POLICY)
    w.runner.step()
    assert w.runner.pause(r.id).state == "paused"
    assert w.runner.step() == []
    assert w.runner.resume(r.id).state == "dwelling"
    assert w.runner.approve(r.id).approved_wave == 0
    w.service.assigned.clear()
    aborted = w.runner.abort(r.id)
    assert aborted.state == "aborted"
    assert {v for _, _, v in w.service.assigned} == {1}
    with pytest.raises(RolloutStateError):
        w.runner.pause(r.id)
    with pytest.raises(UnknownRolloutError):
        w.runner.approve("ro-nope")
    # quarantine_after=1: the first abort quarantines, an operator's as well as a gate's.
    assert store.quarantined(w.registry, "digits", 2)


def test_assign_failures_are_logged_in_the_event_log(world: World) -> None:
    w = world
    r = w.runner.create("digits", 2, selector=Selector(group="line-3"), policy=POLICY)
    w.service.fail_for = set(IDS)
    w.runner.step()
    [event] = [e for e in store.rollout_events(w.registry, r.id) if e.kind == "decision"]
    assert set(event.detail["errors"]) == set(event.detail["assign"])


def test_background_thread_steps(world: World) -> None:
    w = world
    w.runner.create("digits", 2, selector=Selector(group="line-3"), policy=POLICY)
    w.runner.start()
    done = threading.Event()
    for _ in range(200):
        if w.service.assigned:
            done.set()
            break
        threading.Event().wait(0.02)
    w.runner.close()
    assert done.is_set()


# --------------------------------------------------------------------------- admin + CLI
def _guarded(handler: Handler) -> Handler:
    async def run(request: Request) -> Response:
        if request.headers.get("authorization") != "Bearer t":
            return JSONResponse({"error": "no", "code": "unauthorized"}, status_code=401)
        try:
            return await handler(request)
        except EdgefleetError as exc:
            # The admin API's own status mapping (the one error table), as its guard applies it.
            return JSONResponse({"error": str(exc), "code": exc.code}, status_code=status_of(exc))

    return run


@pytest.fixture
def api(world: World) -> Iterator[TestClient]:
    app = Starlette(routes=rollout_routes(world.runner, _guarded))
    with TestClient(app, headers={"Authorization": "Bearer t"}) as client:
        yield client


def test_admin_routes(world: World, api: TestClient) -> None:
    body = {"model": "digits", "version": 2, "group": "line-3",
            "policy": {"canary_count": 2, "dwell_seconds": 60}}  # fmt: skip
    created = api.post("/v1/rollouts", json=body)
    assert created.status_code == 201, created.text
    rid = created.json()["id"]
    world.runner.step()
    shown = api.get(f"/v1/rollouts/{rid}").json()
    assert shown["state"] == "dwelling"
    assert shown["counts"] == {"assigned": 2, "control": 8}
    assert shown["wave_sizes"][0] == 2
    assert [e["kind"] for e in shown["events"]] == ["created", "decision"]
    assert [r["id"] for r in api.get("/v1/rollouts?active=1").json()["rollouts"]] == [rid]
    assert api.post(f"/v1/rollouts/{rid}/abort").json()["state"] == "aborted"
    again = api.post(f"/v1/rollouts/{rid}/pause")
    assert (again.status_code, again.json()["code"]) == (409, "rollout_state")
    assert api.get("/v1/rollouts/ro-nope").status_code == 404
    for bad in ({"model": "digits", "version": 2},
                {"model": "digits", "version": 2, "group": "g", "policy": {"canary_fraction": 3}},
                {"model": "", "version": 2, "group": "g"}):  # fmt: skip
        res = api.post("/v1/rollouts", json=bad)
        assert (res.status_code, res.json()["code"]) == (400, "rollout_policy_invalid")
    assert api.post("/v1/rollouts", content=b"{").json()["code"] == "bad_json"
    assert api.get("/v1/rollouts", headers={"Authorization": "Bearer x"}).status_code == 401


@pytest.fixture
def cli(api: TestClient, monkeypatch: pytest.MonkeyPatch) -> click.Group:
    transport = api._transport  # the TestClient's in-process transport

    def client(url: str, token: str) -> admin_client.AdminClient:
        return admin_client.AdminClient(url, token, transport=transport)

    monkeypatch.setattr(cli_rollouts, "AdminClient", client)

    @click.group()
    def main() -> None:
        pass

    cli_rollouts.register_rollout_commands(main)
    return main


def _run(cli: click.Group, *args: str) -> str:
    res = CliRunner().invoke(cli, ["rollouts", *args[:1], "--url", "http://testserver",
                                   "--token", "t", *args[1:]])  # fmt: skip
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.output


def test_cli(world: World, cli: click.Group) -> None:
    out = _run(cli, "create", "digits", "2", "--tag", "site=a", "--canary-count", "2",
               "--steps", "0.5,1", "--dwell", "60", "--min-devices", "2", "--approval",
               "--on-breach", "abort", "--max-p99-ratio", "2", "--min-p99-delta-ms", "5",
               "--json")  # fmt: skip
    r = json.loads(out)
    assert r["policy"]["steps"] == [0.5, 1.0]
    assert r["policy"]["approval"] is True
    assert r["policy"]["thresholds"]["max_p99_latency_ratio"] == 2.0
    assert r["policy"]["thresholds"]["min_p99_latency_delta_ms"] == 5.0
    world.runner.step()
    listing = _run(cli, "status")
    assert r["id"] in listing
    assert "dwelling" in listing
    view = _run(cli, "watch", r["id"], "--iterations", "1", "--interval", "0.1")
    assert "wave 1/3" in view
    assert "[>] 1: 2" in view
    assert "assigned 2" in view
    detail = _run(cli, "status", r["id"])
    assert "decision" in detail
    assert "approved" not in detail
    assert "dwelling" in _run(cli, "approve", r["id"])
    assert "paused" in _run(cli, "pause", r["id"])
    assert "dwelling" in _run(cli, "resume", r["id"])
    assert "aborted" in _run(cli, "abort", r["id"])
    bad = CliRunner().invoke(cli, ["rollouts", "create", "digits", "2", "--url", "http://x",
                                   "--token", "t"])  # fmt: skip
    assert bad.exit_code == 2
    assert "exactly one of --group, --tag, --selector, --label-group" in bad.output


@dataclass
class FollowerLock:
    leader: bool = False
    released: int = 0

    def try_acquire(self) -> bool:
        return self.leader

    def release(self) -> None:
        self.released += 1


def test_only_the_lock_holder_steps(world: World) -> None:
    lock = FollowerLock()
    runner = RolloutRunner(world.registry, world.service, world.clock.wall, lock=lock)
    runner.create("digits", 2, selector=Selector(group="line-3"), policy=POLICY)
    assert runner.step() == []
    assert world.service.assigned == []
    lock.leader = True
    assert len(runner.step()) == 1
    runner.close()
    assert lock.released == 1


def test_a_step_stops_at_the_next_rollout_once_the_lock_is_lost(world: World) -> None:
    lock = FollowerLock(leader=True)

    class DeposingService(FakeService):
        """The lock is lost while the first rollout is being stepped (its assigns run)."""

        def assign(self, target: str, name: str, version: int, *, group: bool = False) -> list[Any]:
            lock.leader = False
            return super().assign(target, name, version, group=group)

    service = DeposingService()
    runner = RolloutRunner(world.registry, service, world.clock.wall, lock=lock)
    a = runner.create("digits", 2, selector=Selector(group="line-3"), policy=POLICY)
    b = runner.create("digits", 2, selector=Selector(group="lab"), policy=POLICY)
    [d] = runner.step()  # the first rollout is finished, the second is not touched
    assert d.assign
    stepped, left = (a, b) if d.rollout.id == a.id else (b, a)
    assert runner.get(stepped.id).state != "pending"
    assert runner.get(left.id).state == "pending"
    assert [e.kind for e in store.rollout_events(world.registry, left.id)] == ["created"]
    assert {t for t, _, _ in service.assigned} <= set(d.assign)
    assert runner.step() == []  # still not the leader
    lock.leader = True
    service.assigned.clear()
    assert left.id in {x.rollout.id for x in runner.step()}
    runner.close()


def test_a_command_on_another_worker_is_never_overwritten_by_the_leaders_step(
    world: World,
) -> None:
    """Two workers share the registry: B pauses while A computes a step from the older state."""
    w = world
    r = w.runner.create("digits", 2, selector=Selector(group="line-3"), policy=POLICY)
    other = RolloutRunner(
        w.registry, FakeService(), w.clock.wall
    )  # the worker the operator reached
    read = store.get_rollout(w.registry, r.id)
    stale = decide(read, w.runner.observations(read, w.clock.wall()), w.clock.wall())
    assert stale.assign  # the step would start the canary
    assert other.pause(r.id).state == "paused"
    with pytest.raises(RolloutConflictError):
        w.runner._apply(stale, w.clock.wall(), kind="decision", old=read)
    assert w.service.assigned == []  # nothing was sent for the stale decision
    assert store.get_rollout(w.registry, r.id).state == "paused"  # the pause stands
    assert w.runner.step() == []  # and the next step sees it


def test_a_command_retries_when_a_step_saved_in_between(world: World) -> None:
    w = world
    r = w.runner.create("digits", 2, selector=Selector(group="line-3"), policy=POLICY)
    real = store.save_rollout
    calls = {"n": 0}

    def racing_save(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:  # the leader's step lands first
            raise RolloutConflictError("changed")
        real(*args, **kwargs)

    store.save_rollout = racing_save  # type: ignore[assignment]
    try:
        assert w.runner.pause(r.id).state == "paused"
    finally:
        store.save_rollout = real  # type: ignore[assignment]
    assert calls["n"] == 2
