"""fleet_server.rollouts.gates: the registry is consistent and decide runs whatever it holds."""

from __future__ import annotations

import dataclasses
import inspect
from datetime import UTC, datetime, timedelta

import pytest

from fleet_server.rollouts import engine
from fleet_server.rollouts.engine import decide
from fleet_server.rollouts.gates import AGENT_GATES, GATES, Gate, GateInputs, GateResult
from fleet_server.rollouts.gates.base import PHASES
from fleet_server.rollouts.metrics import DeviceObservation, WindowMetrics
from fleet_server.rollouts.policy import RolloutPolicy, Selector, Thresholds
from fleet_server.rollouts.state import Rollout

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
IDS = [f"dev-{i:02d}" for i in range(10)]
FIELDS = {
    *WindowMetrics.__dataclass_fields__,
    *Rollout.__dataclass_fields__,
    *DeviceObservation.__dataclass_fields__,
}


def test_names_are_unique_and_phases_known() -> None:
    names = [g.name for g in GATES]
    assert len(names) == len(set(names))
    assert "reporting" not in names  # the engine's own wait for reporting devices
    assert {g.phase for g in GATES} <= set(PHASES)


def test_every_gate_reads_real_fields_and_thresholds() -> None:
    thresholds = {f.name for f in dataclasses.fields(Thresholds)}
    for g in {*GATES, *AGENT_GATES}:
        assert g.reads, g.name
        assert set(g.reads) <= FIELDS, g.name
        assert set(g.thresholds) <= thresholds, g.name
        assert g.statistic.strip(), g.name


def test_every_threshold_belongs_to_a_gate() -> None:
    used = {t for g in GATES for t in g.thresholds}
    assert used == {f.name for f in dataclasses.fields(Thresholds)}


def test_safety_gates_come_first() -> None:
    phases = [g.phase for g in GATES]
    assert phases == sorted(phases, key=PHASES.index)


def test_the_engine_knows_no_gate_by_name() -> None:
    source = inspect.getsource(engine)
    assert [g.name for g in GATES if f'"{g.name}"' in source] == []


def test_every_gate_is_skipped_or_ok_on_a_healthy_canary_by_its_own_verdict() -> None:
    r = Rollout("ro", "m", 1, 2, Selector(group="g"), RolloutPolicy(), created_at=T0)
    m = WindowMetrics(reports=1, requests=1000, device_answers=1000)
    for g in GATES:
        result = g.verdict(GateInputs(r, {}, m, m, True))
        assert result.name == g.name
        assert result.status in ("ok", "skipped", "waiting"), result


# --------------------------------------------------------------------------- extension
def _always(status: str) -> Gate:
    def verdict(i: GateInputs) -> GateResult:
        return GateResult("always", status, 1.0, 0.5, f"always {status}")

    return Gate("always", "quality", ("requests",), "constant", (), verdict)


def observations(r: Rollout) -> list[DeviceObservation]:
    m = WindowMetrics(reports=1)
    return [DeviceObservation(d, 2 if d in r.members else 1, None, metrics=m) for d in IDS]


@pytest.mark.parametrize(
    ("status", "state"), [("ok", "dwelling"), ("breach", "paused"), ("waiting", "judging")]
)
def test_decide_acts_on_a_registered_gate_it_has_never_heard_of(status: str, state: str) -> None:
    policy = RolloutPolicy(canary_count=3, dwell_seconds=10, min_devices=3)
    r = Rollout("ro", "m", 1, 2, Selector(group="g"), policy, created_at=T0)
    gates = (*(g for g in GATES if g.phase == "safety"), _always(status))
    r = decide(r, observations(r), T0, gates=gates).rollout
    d = decide(r, observations(r), T0 + timedelta(seconds=11), gates=gates)
    assert d.rollout.state == state, d.reasons
    assert [g.name for g in d.rollout.gates] == ["install_failures", "device_rollbacks", "always"]
    if status == "breach":
        assert "gate always breached: always breach" in d.reasons
    if status == "waiting":
        assert d.reasons[-1] == "always waiting"
