"""Labels in the registry (SQLite and PostgreSQL): operator and reported labels and their
precedence, the indexed selector query against the pure matcher, tags seeded by enrollment
and by migration 0009, label groups and windows; the rollout runner targeting a selector,
picking up a device that starts matching, and holding a device outside its window until it
opens (the status view says when)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from clock import FakeClock
from edge_agent.wire.reported import ModelReport, ReportedState
from edge_agent.wire.telemetry import ModelStats, TelemetryReport
from fleet_server.errors import (
    LabelError,
    UnknownDeviceError,
    UnknownLabelGroupError,
    UnknownWindowError,
)
from fleet_server.jobs.rollout_runner import RolloutRunner
from fleet_server.registry import labels as ls
from fleet_server.registry.store import Registry
from fleet_server.rollouts.label_selector import LabelSelector
from fleet_server.rollouts.policy import RolloutPolicy, Selector, Thresholds
from fleet_server.rollouts.windows import MaintenanceWindow

T0 = datetime(2027, 1, 4, 11, 0, tzinfo=UTC)  # Monday, 12:00 in Berlin


@pytest.fixture
def registry(registry_url: str) -> Iterator[Registry]:
    reg = Registry.open(registry_url, clock=lambda: T0)
    reg.upgrade()
    yield reg
    reg.close()


def report(reg: Registry, device: str, labels: Any, active: int = 1) -> None:
    state = ReportedState(device, 0.0, "0.1", 1, {"digits": ModelReport(active, assigned=active)})
    doc = state.to_dict()
    doc["labels"] = labels
    # What the gateway stores: the parsed document (valid labels, the refusal count).
    reg.record_reported(device, ReportedState.from_dict(doc).to_dict())


def telemetry(reg: Registry, seqs: dict[str, int], device: str, version: int) -> None:
    """One more report of 100 answered requests on ``version`` (cumulative counters)."""
    seq = seqs[device] = seqs.get(device, 0) + 1
    ok = 100 * seq
    stats = ModelStats(version=version, outcomes={"ok": ok, "error": 0, "rejected": 0},
                       sources={"device": ok, "cloud": 0},
                       latency_buckets=(0, 0, 0, ok, 0, 0, 0, 0, 0, 0, 0, 0))  # fmt: skip
    report = TelemetryReport(device, seq, 0.0, 1.0, started_at=1.0, models={"digits": stats})
    reg.ingest(device, [report])


def test_operator_labels_win_over_the_devices_own_and_are_shown_apart(registry: Registry) -> None:
    registry.enroll("cam-1", group="g")
    report(registry, "cam-1", {"site": "claimed", "hw": "pi5", "bad key": "x", "os": ""})
    got = ls.device_labels(registry, "cam-1")
    assert got.device == {"hw": "pi5", "site": "claimed"}
    assert got.refused == 2
    got = ls.set_labels(registry, "cam-1", {"site": "berlin", "line": "3"})
    assert got.operator == {"line": "3", "site": "berlin"}
    assert got.effective == {"hw": "pi5", "line": "3", "site": "berlin"}
    select = LabelSelector.parse
    assert [d.id for d in ls.select_devices(registry, select("site=berlin"))] == ["cam-1"]
    assert ls.select_devices(registry, select("site=claimed")) == []
    # The device reporting again cannot undo the operator's label.
    report(registry, "cam-1", {"site": "claimed-again"})
    assert ls.labels_of(registry, ["cam-1"])["cam-1"]["site"] == "berlin"
    # Removing the operator's label lets the device's own show through.
    ls.set_labels(registry, "cam-1", {}, ["site"])
    assert ls.labels_of(registry, ["cam-1"])["cam-1"] == {"line": "3", "site": "claimed-again"}
    assert [d.id for d in ls.select_devices(registry, select("site=claimed-again"))] == ["cam-1"]


def test_operator_input_is_checked(registry: Registry) -> None:
    registry.enroll("cam-1")
    for bad in ({"bad key": "x"}, {"site": ""}, {"site": "x" * 64}, {"site": 3}):
        with pytest.raises(LabelError):
            ls.set_labels(registry, "cam-1", bad)  # type: ignore[arg-type]
    with pytest.raises(LabelError, match="at most 32"):
        ls.set_labels(registry, "cam-1", {f"k{i}": "v" for i in range(33)})
    ls.set_labels(registry, "cam-1", {f"k{i}": "v" for i in range(30)})
    with pytest.raises(LabelError, match="at most 32"):
        ls.set_labels(registry, "cam-1", {"x1": "v", "x2": "v", "x3": "v"})
    with pytest.raises(UnknownDeviceError):
        ls.set_labels(registry, "nope", {"site": "a"})
    with pytest.raises(UnknownDeviceError):
        ls.device_labels(registry, "nope")


def test_the_indexed_query_agrees_with_the_pure_matcher(registry: Registry) -> None:
    rng = random.Random(15)
    values = {"site": ["a", "b", "c"], "hw": ["pi4", "pi5", "orin"], "line": ["1", "2"]}
    truth: dict[str, dict[str, str]] = {}
    for i in range(60):
        d = f"dev-{i:02d}"
        registry.enroll(d)
        own = {k: rng.choice(v) for k, v in values.items() if rng.random() < 0.7}
        op = {k: rng.choice(v) for k, v in values.items() if rng.random() < 0.3}
        report(registry, d, own)
        if op:
            ls.set_labels(registry, d, op)
        truth[d] = {**own, **op}
    registry.revoke("dev-00")
    ops = ["{k}={v}", "{k}!={v}", "{k} in ({v},{w})", "{k} notin ({v})", "{k}", "!{k}"]
    for _ in range(60):
        parts = []
        for _ in range(rng.randint(1, 3)):
            k = rng.choice(list(values))
            v, w = rng.sample(values[k], 2)
            parts.append(rng.choice(ops).format(k=k, v=v, w=w))
        sel = LabelSelector.parse(",".join(parts))
        got = [d.id for d in ls.select_devices(registry, sel, include_revoked=False)]
        expected = sorted(d for d, lab in truth.items() if sel.matches(lab) and d != "dev-00")
        assert got == expected, str(sel)


def test_enrollment_tags_become_operator_labels(registry: Registry) -> None:
    registry.enroll("cam-1", tags={"site": "a", "floor": 3, "bad key": "x"})
    assert ls.device_labels(registry, "cam-1").operator == {"site": "a"}


def test_migration_0009_seeds_labels_from_existing_tags(registry_url: str) -> None:
    reg = Registry.open(registry_url, clock=lambda: T0)
    reg.upgrade("0008")
    # A device enrolled by the code of revision 0008 (tags, no label table yet).
    devices = sa.table(
        "devices",
        sa.column("id"), sa.column("group"), sa.column("tags", sa.JSON),
        sa.column("enrolled_at", sa.DateTime(timezone=True)), sa.column("epoch"),
    )  # fmt: skip
    with reg.engine.begin() as conn:
        conn.execute(
            devices.insert().values(
                id="old-1", group="g", tags={"site": "berlin", "n": 3}, enrolled_at=T0, epoch=1
            )
        )
    reg.upgrade()
    assert reg.current_revision() == Registry.head_revision()
    assert ls.device_labels(reg, "old-1").operator == {"site": "berlin"}
    reg.downgrade("0008")
    names = set(sa.inspect(reg.engine).get_table_names())
    assert "device_labels" not in names
    assert "maintenance_windows" not in names
    assert reg.get_device("old-1").tags == {"site": "berlin", "n": 3}
    reg.close()


def test_label_groups_and_windows(registry: Registry) -> None:
    registry.enroll("cam-1")
    ls.set_labels(registry, "cam-1", {"site": "b"})
    g = ls.define_group(registry, "site-b", LabelSelector.parse("site=b"), T0)
    assert ls.group(registry, "site-b").selector == g.selector
    ls.define_group(registry, "site-b", LabelSelector.parse("site in (b,c)"), T0)
    assert str(ls.groups(registry)[0].selector) == "site in (b,c)"
    with pytest.raises(LabelError):
        ls.define_group(registry, "Bad Name", LabelSelector.parse("a"), T0)
    ls.delete_group(registry, "site-b")
    with pytest.raises(UnknownLabelGroupError):
        ls.group(registry, "site-b")
    with pytest.raises(UnknownLabelGroupError):
        ls.delete_group(registry, "site-b")
    w = MaintenanceWindow.from_dict(
        {
            "name": "n",
            "selector": "site=b",
            "start": "02:00",
            "duration_minutes": 60,
            "timezone": "Europe/Berlin",
            "weekdays": ["mon"],
        }
    )
    ls.put_window(registry, w, T0)
    assert ls.windows(registry) == [w]
    ls.delete_window(registry, "n")
    assert ls.windows(registry) == []
    with pytest.raises(UnknownWindowError):
        ls.delete_window(registry, "n")


# --------------------------------------------------------------------------- the runner
@dataclass
class FakeService:
    assigned: list[tuple[str, int]] = field(default_factory=list)

    def assign(self, target: str, name: str, version: int, *, group: bool = False) -> list[Any]:
        self.assigned.append((target, version))
        return []

    def assign_shadow(self, *args: object) -> None:
        return None


POLICY = RolloutPolicy(
    canary_fraction=0.5,
    steps=(1.0,),
    dwell_seconds=60,
    min_devices=1,
    shadow_fraction=None,
    thresholds=Thresholds(
        max_reject_rate_increase=None,
        max_fallback_rate_increase=None,
        max_drift_alert_share=None,
        max_p99_latency_ratio=None,
        max_error_rate_increase=None,
        max_output_shift=None,
        max_ground_truth_drop=None,
    ),
)


def test_the_runner_targets_a_selector_and_holds_devices_outside_their_window(
    registry_url: str,
) -> None:
    clock = FakeClock(wall=T0)
    reg = Registry.open(registry_url, clock=clock.wall)
    reg.upgrade()
    for i in range(4):
        reg.enroll(f"cam-{i}", group="g")
        report(reg, f"cam-{i}", {"site": "a" if i < 2 else "b"})
    reg.enroll("lab-1", group="g")
    report(reg, "lab-1", {"site": "lab"})
    reg.publish_bundle("digits", 1, channel="s", sha256="1" * 64, length=1, targets_sha256="3" * 64)
    reg.publish_bundle("digits", 2, channel="s", sha256="2" * 64, length=1, targets_sha256="4" * 64)
    window = MaintenanceWindow.from_dict(
        {
            "name": "night",
            "selector": "site=b",
            "start": "02:00",
            "duration_minutes": 60,
            "timezone": "Europe/Berlin",
        }
    )
    ls.put_window(reg, window, clock.wall())
    service = FakeService()
    runner = RolloutRunner(reg, service, clock.wall)
    sel = Selector(labels=LabelSelector.parse("site in (a,b)"))
    r = runner.create("digits", 2, selector=sel, policy=POLICY)
    assert r.from_version == 1
    [d] = runner.step()
    targets = set(runner.device_states(d.rollout))
    assert targets == {"cam-0", "cam-1", "cam-2", "cam-3"}
    held = set(d.rollout.held)
    sent = {t for t, _ in service.assigned}
    assert all(x in ("cam-2", "cam-3") for x in held)
    assert sent == set(d.rollout.members) - held
    holds = runner.holds(d.rollout)
    for x in held:
        assert holds[x] == {"reason": "window", "opens_at": "2027-01-05T01:00:00+00:00"}
        assert runner.device_states(d.rollout)[x] == "waiting_window"
    # A device that starts matching is a target at the next step.
    report(reg, "lab-1", {"site": "a"})
    assert "lab-1" in runner.device_states(runner.get(r.id))
    # Steps before the window opens send nothing to site b; inside it they do.
    seqs: dict[str, int] = {}
    site = {"cam-0": "a", "cam-1": "a", "cam-2": "b", "cam-3": "b", "lab-1": "a"}

    def devices_act() -> None:
        got = {t for t, v in service.assigned if v == 2}
        for x, where in site.items():
            version = 2 if x in got else 1
            report(reg, x, {"site": where}, active=version)
            telemetry(reg, seqs, x, version)

    for _ in range(10):
        clock.advance(300)
        devices_act()
        runner.step()
    assert not {t for t, _ in service.assigned} & {"cam-2", "cam-3"}
    clock.now += (datetime(2027, 1, 5, 1, 5, tzinfo=UTC) - clock.wall()).total_seconds()
    for _ in range(30):
        runner.step()
        devices_act()
        clock.advance(60)
    final = runner.get(r.id)
    assert {t for t, v in service.assigned if v == 2} == {
        "cam-0",
        "cam-1",
        "cam-2",
        "cam-3",
        "lab-1",
    }
    b_sends = [t for t, _ in service.assigned if t in ("cam-2", "cam-3")]
    assert len(b_sends) == len(set(b_sends))  # each sent once
    assert final.state == "completed", final.reasons
    assert final.held == {}
    runner.close()
    reg.close()
