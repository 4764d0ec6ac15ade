"""fleet_server.rollouts.engine: the pure engine, table-driven (waves, dwell, gates, commands)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from edge_agent.quality.confusion import Confusion, wilson_interval
from fleet_server.errors import RolloutPolicyError, RolloutStateError
from fleet_server.rollouts.engine import abort, approve, decide, resume, wave_order
from fleet_server.rollouts.metrics import (
    DeviceObservation,
    OutputMoments,
    TensorMoments,
    WindowMetrics,
    one_sided_increase,
)
from fleet_server.rollouts.policy import RolloutPolicy, Selector, Thresholds
from fleet_server.rollouts.state import Decision, Rollout

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
IDS = [f"dev-{i:02d}" for i in range(30)]
FAST = (0, 0, 0, 1000, 0, 0, 0, 0, 0, 0, 0, 0)  # all requests in (5, 10] ms
SLOW = (0, 0, 0, 0, 0, 0, 0, 1000, 0, 0, 0, 0)  # all in (100, 200] ms
# 950 answers of a confident 10-class model, 10 % per class (the output_distribution gate).
# 100 labelled answers of a 10-class model, 97 right (the ground_truth gate).
LABELLED = Confusion(
    tuple(tuple(10 if t == q else (1 if t < 3 and q == t + 1 else 0) for q in range(10))
          for t in range(10))
)  # fmt: skip
OUTPUTS = OutputMoments.of_tensor("probabilities", TensorMoments.of([950] * 10, [95.0] * 10,
                                                                    [90.0] * 10))  # fmt: skip


def healthy(**kw: Any) -> WindowMetrics:
    base: dict[str, Any] = {
        "reports": 3,
        "requests": 1000,
        "rejected": 10,
        "device_answers": 950,
        "cloud_answers": 50,
        "drift_windows": 10,
        "drift_alerts": 0,
        "max_psi": 0.02,
        "shadow_compared": 1000,
        "shadow_agree": 990,
        "latency_buckets": FAST,
        "confusion": LABELLED,
    }
    base.update(kw)
    return WindowMetrics(**base)


def policy(**kw: Any) -> RolloutPolicy:
    thresholds = kw.pop("thresholds", Thresholds(min_shadow_agreement=0.9))
    base: dict[str, Any] = {
        "canary_fraction": 0.1,
        "steps": (0.5, 1.0),
        "dwell_seconds": 60,
        "min_devices": 3,
        "min_requests": 100,
        "thresholds": thresholds,
    }
    base.update(kw)
    return RolloutPolicy(**base)


def new_rollout(**kw: Any) -> Rollout:
    return Rollout(
        id="ro-1",
        model="digits",
        from_version=1,
        to_version=2,
        selector=Selector(group="line-3"),
        policy=kw.pop("policy", policy()),
        created_at=T0,
    )


def fleet(
    r: Rollout,
    *,
    canary: WindowMetrics | None = None,
    bad: dict[str, str] | None = None,
    reporting: int | None = None,
) -> list[DeviceObservation]:
    """Members run v2 with ``canary`` metrics, the others v1 with healthy metrics.

    ``bad`` maps a member to "failed" or "rolled_back"; ``reporting`` caps reporting members.
    """
    out, n = [], 0
    for d in IDS:
        if d in r.members:
            kind = (bad or {}).get(d)
            rep = reporting is None or n < reporting
            n += 1
            out.append(
                DeviceObservation(
                    d,
                    active_version=1 if kind else 2,
                    assigned_version=2,
                    outcome={"failed": "failed", "rolled_back": "rolled_back"}.get(
                        kind or "", "installed"
                    ),
                    install_failed=kind == "failed",
                    rolled_back=kind == "rolled_back",
                    metrics=(canary or healthy()) if rep and not kind else WindowMetrics(),
                    outputs=OUTPUTS if rep and not kind else OutputMoments(),
                )
            )
        else:
            out.append(DeviceObservation(d, 1, 1, "installed", metrics=healthy(), outputs=OUTPUTS))
    return out


def started(**kw: Any) -> Rollout:
    r = new_rollout(**kw)
    return decide(r, fleet(r), T0).rollout


def after_dwell(r: Rollout, s: int = 61) -> datetime:
    assert r.wave_started_at is not None
    return r.wave_started_at + timedelta(seconds=s)


# --------------------------------------------------------------------------- waves
@pytest.mark.parametrize(
    ("kw", "n", "sizes"),
    [
        ({"canary_fraction": 0.1, "steps": (0.25, 0.5, 1.0)}, 30, (3, 8, 15, 30)),
        ({"canary_count": 2, "steps": (0.25, 0.5)}, 10, (2, 3, 5, 10)),
        ({"canary_fraction": 0.1, "exponential": 2.0}, 100, (10, 20, 40, 80, 100)),
        ({"canary_fraction": 0.5, "steps": (0.25, 1.0)}, 4, (2, 4)),
        ({"canary_fraction": 0.1}, 1, (1,)),
        ({"canary_fraction": 0.1}, 0, ()),
    ],
)
def test_wave_sizes(kw: dict[str, Any], n: int, sizes: tuple[int, ...]) -> None:
    assert RolloutPolicy(**kw).wave_sizes(n) == sizes


def test_canaries_are_stable_across_runs_and_input_order() -> None:
    r = new_rollout()
    first = decide(r, fleet(r), T0)
    again = decide(r, list(reversed(fleet(r))), T0 + timedelta(days=3))
    assert first.assign == again.assign
    assert list(first.assign) == wave_order("digits", IDS)[:3]
    assert first.rollout.state == "dwelling"
    assert first.rollout.wave == 0


def test_pending_without_devices_waits() -> None:
    d = decide(new_rollout(), [], T0)
    assert d.rollout.state == "pending"
    assert d.assign == ()
    assert "no device matches" in d.reasons[-1]


@pytest.mark.parametrize(
    ("seconds", "state", "assigned"),
    [(0, "dwelling", 0), (59, "dwelling", 0), (61, "dwelling", 12)],
)
def test_dwell_time_is_respected(seconds: int, state: str, assigned: int) -> None:
    r = started()
    d = decide(r, fleet(r), after_dwell(r, seconds))
    assert d.rollout.state == state
    assert len(d.assign) == assigned
    if assigned:
        assert d.rollout.wave == 1
        assert set(r.members) < set(d.rollout.members)


@pytest.mark.parametrize(("reporting", "state"), [(2, "judging"), (3, "dwelling")])
def test_min_reporting_devices(reporting: int, state: str) -> None:
    r = started()
    d = decide(r, fleet(r, reporting=reporting), after_dwell(r))
    assert d.rollout.state == state
    if state == "judging":
        assert "2/3 canary devices reporting" in d.reasons[-1]
        assert d.assign == ()


# --------------------------------------------------------------------------- gates
GATE_CASES = [
    ("reject_rate", {"rejected": 100}, {}, "10.00% on canary"),
    ("fallback_rate", {"cloud_answers": 250, "device_answers": 750}, {}, "25.00% on canary"),
    ("prediction_drift", {"drift_alerts": 9}, {}, "27/30 output windows alerting"),
    ("shadow_agreement", {"shadow_agree": 500}, {}, "1500/3000 rows agree"),
    ("p99_latency", {"latency_buckets": SLOW}, {}, "x20.00, max x1.50"),
]


@pytest.mark.parametrize(("gate", "canary", "pol", "text"), GATE_CASES)
def test_each_quality_gate_trips_alone(
    gate: str, canary: dict[str, Any], pol: dict[str, Any], text: str
) -> None:
    r = started(policy=policy(on_breach="pause", **pol))
    d = decide(r, fleet(r, canary=healthy(**canary)), after_dwell(r))
    statuses = {g.name: g.status for g in d.rollout.gates}
    assert statuses[gate] == "breach"
    assert [n for n, s in statuses.items() if s == "breach"] == [gate]
    assert any(gate in x and text in x for x in d.reasons), d.reasons
    assert d.rollout.state == "paused"
    assert d.assign == ()
    assert d.revert == ()


def test_healthy_canary_passes_every_gate() -> None:
    r = started()
    d = decide(r, fleet(r), after_dwell(r))
    assert {g.status for g in d.rollout.gates} == {"ok"}
    assert d.rollout.wave == 1


def test_small_differences_do_not_trip_the_rate_gates() -> None:
    # 1.5 % vs 1.0 % rejects on 3000 requests: +0.5 points, well inside the +2 point margin.
    r = started()
    d = decide(r, fleet(r, canary=healthy(rejected=15)), after_dwell(r))
    assert next(g for g in d.rollout.gates if g.name == "reject_rate").status == "ok"


@pytest.mark.parametrize(
    ("kind", "gate", "text"),
    [
        ("failed", "install_failures", "2/3 members (66.7%; 3 finished)"),
        ("rolled_back", "device_rollbacks", "2/3 members (66.7%; 3 finished)"),
    ],
)
def test_safety_gates_trip_at_once_even_while_dwelling(kind: str, gate: str, text: str) -> None:
    r = started(policy=policy(on_breach="abort"))
    victims = sorted(r.members)[:2]
    d = decide(r, fleet(r, bad=dict.fromkeys(victims, kind)), after_dwell(r, 5))
    assert d.rollout.state == "aborted"
    assert any(gate in x and text in x for x in d.reasons), d.reasons
    assert set(d.revert) == set(r.members)
    if kind == "rolled_back":
        assert f"device-initiated rollback of v2 on {', '.join(victims)}" in d.reasons


@pytest.mark.parametrize("kind", ["failed", "rolled_back"])
def test_one_device_of_several_does_not_halt_a_wave(kind: str) -> None:
    r = started(policy=policy(on_breach="abort"))
    d = decide(r, fleet(r, bad={sorted(r.members)[0]: kind}), after_dwell(r, 5))
    assert d.rollout.state == "dwelling", d.reasons
    assert {g.status for g in d.rollout.gates} == {"ok"}


@pytest.mark.parametrize("kind", ["failed", "rolled_back"])
def test_every_member_failing_halts_even_a_one_device_canary(kind: str) -> None:
    r = new_rollout(policy=policy(on_breach="abort", canary_count=1))
    r = decide(r, fleet(r), T0).rollout
    (victim,) = r.members
    d = decide(r, fleet(r, bad={victim: kind}), after_dwell(r, 5))
    assert d.rollout.state == "aborted", d.reasons


@pytest.mark.parametrize(
    ("on_breach", "rollback", "state", "reverted"),
    [("abort", True, "aborted", 3), ("abort", False, "aborted", 0), ("pause", True, "paused", 0)],
)
def test_breach_policy(on_breach: str, rollback: bool, state: str, reverted: int) -> None:
    r = started(policy=policy(on_breach=on_breach, rollback_on_abort=rollback))
    d = decide(r, fleet(r, canary=healthy(rejected=300)), after_dwell(r))
    assert d.rollout.state == state
    assert len(d.revert) == reverted
    assert d.rollout.breached


def test_device_rollback_is_never_reassigned() -> None:
    r = started(policy=policy(thresholds=Thresholds(max_rollback_rate=1.0)))
    victim = next(iter(r.members))
    now = T0
    assigned: list[str] = []
    for _ in range(10):
        now = after_dwell(r)
        d = decide(r, fleet(r, bad={victim: "rolled_back"}), now)
        assigned += d.assign
        r = d.rollout
    assert r.state == "completed"
    assert victim not in assigned
    assert r.rolled_back == (victim,)


@pytest.mark.parametrize(("previous", "quarantine"), [(0, False), (1, True), (3, True)])
def test_quarantine_after_repeated_aborts(previous: int, quarantine: bool) -> None:
    r = started(policy=policy(on_breach="abort", quarantine_after=2))
    d = decide(r, fleet(r, canary=healthy(rejected=300)), after_dwell(r), previous_aborts=previous)
    assert d.quarantine is quarantine


def test_operator_abort_sends_back_and_counts_toward_quarantine() -> None:
    r = started(policy=policy(quarantine_after=2))
    d = abort(r, T0)
    assert d.rollout.state == "aborted"
    assert set(d.revert) == set(r.members)
    assert not d.quarantine  # a first abort
    with pytest.raises(RolloutStateError):
        abort(d.rollout, T0)
    # Aborted twice, whoever aborted it the first time: quarantined at once.
    assert abort(r, T0, previous_aborts=1).quarantine


def test_approval_between_waves() -> None:
    r = started(policy=policy(approval=True))
    d = decide(r, fleet(r), after_dwell(r))
    assert d.rollout.state == "awaiting_approval"
    assert d.assign == ()
    r = d.rollout
    d = decide(r, fleet(r), after_dwell(r, 600))
    assert d.rollout.state == "awaiting_approval"
    r = approve(d.rollout, T0)
    d = decide(r, fleet(r), after_dwell(r, 601))
    assert d.rollout.state == "dwelling"
    assert d.rollout.wave == 1
    assert len(d.assign) == 12


def test_runs_to_completion_then_stays() -> None:
    r = started()
    for _ in range(3):
        r = decide(r, fleet(r), after_dwell(r)).rollout
    assert r.state == "completed"
    assert set(r.members) == set(IDS)
    d = decide(r, fleet(r), after_dwell(r))
    assert d.rollout is r
    assert d.assign == ()


def test_resume_accepts_seen_failures_and_dwells_again() -> None:
    r = started(policy=policy(on_breach="pause"))
    victims = dict.fromkeys(sorted(r.members)[:2], "failed")
    r = decide(r, fleet(r, bad=victims), after_dwell(r, 1)).rollout
    assert r.state == "paused"
    later = T0 + timedelta(hours=1)
    r = resume(r, later)
    assert r.state == "dwelling"
    assert r.acknowledged == tuple(victims)
    d = decide(r, fleet(r, bad=victims), later + timedelta(seconds=5))
    assert d.rollout.state == "dwelling"
    with pytest.raises(RolloutStateError):
        resume(d.rollout, later)


@pytest.mark.parametrize(
    "kw",
    [
        {"canary_fraction": 0.0},
        {"canary_fraction": 1.5},
        {"steps": (0.5, 0.25)},
        {"exponential": 1.0},
        {"min_devices": 0},
        {"on_breach": "explode"},
        {"thresholds": {"max_rollback_rate": 2.0}},
        {"thresholds": {"max_p99_latency_ratio": 0.5}},
        {"bogus": 1},
    ],
)
def test_invalid_policies_are_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(RolloutPolicyError):
        RolloutPolicy.from_dict(kw)


def test_policy_round_trip() -> None:
    p = policy(exponential=3.0, approval=True, on_breach="abort")
    assert RolloutPolicy.from_dict(p.to_dict()) == p


def test_selector() -> None:
    assert Selector(tags={"site": "a"}).matches("x", {"site": "a", "k": 1})
    assert not Selector(tags={"site": "a"}).matches("x", {"site": "b"})
    assert Selector(group="g").matches("g", {})
    with pytest.raises(RolloutPolicyError):
        Selector()
    with pytest.raises(RolloutPolicyError):
        Selector(group="g", tags={"a": "b"})


# --------------------------------------------------------------------------- statistics
@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [(0, 0, 0.0, 1.0), (1, 3, 0.0783, 0.7462), (50, 100, 0.4190, 0.5810)],
)
def test_wilson_bounds(k: int, n: int, lo: float, hi: float) -> None:
    # The gates' Wilson bounds are the shared edge_agent.quality.confusion.wilson_interval.
    got = wilson_interval(k, n, 1.645)
    assert got[0] == pytest.approx(lo, abs=2e-3)
    assert got[1] == pytest.approx(hi, abs=2e-3)


@pytest.mark.parametrize(
    ("x1", "n1", "x2", "n2", "margin", "expected"),
    [
        (1, 3, 0, 3, 0.0, False),  # 33 % vs 0 % on 3 samples: not evidence
        (100, 1000, 10, 1000, 0.02, True),
        (15, 1000, 10, 1000, 0.02, False),
        (0, 1000, 0, 1000, 0.0, False),
        (5, 0, 0, 10, 0.0, False),
    ],
)
def test_one_sided_increase(
    x1: int, n1: int, x2: int, n2: int, margin: float, expected: bool
) -> None:
    assert one_sided_increase(x1, n1, x2, n2, margin, 1.645) is expected


def test_decision_is_a_value() -> None:
    r = new_rollout()
    d = decide(r, fleet(r), T0)
    assert isinstance(d, Decision)
    with pytest.raises(AttributeError):
        d.rollout.state = "x"  # type: ignore[misc]
    assert replace(d.rollout, state="paused").state == "paused"


@pytest.mark.parametrize(
    ("failures", "state"),
    [(1, "dwelling"), (2, "dwelling"), (6, "aborted")],
)
def test_install_failures_judged_on_finished_members_with_a_margin(
    failures: int, state: str
) -> None:
    # 15 members after wave 2: 1 or 2 failures among 15 finished are 6.7 % / 13 % (< 20 %, the
    # Wilson lower bound even lower); 6 of 15 is certain to exceed 20 %.
    r = started(policy=policy(on_breach="abort"))
    r = decide(r, fleet(r), after_dwell(r)).rollout
    bad = dict.fromkeys(sorted(r.members)[:failures], "failed")
    d = decide(r, fleet(r, bad=bad), after_dwell(r, 5))
    assert d.rollout.state == state, d.reasons
