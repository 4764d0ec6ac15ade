"""fleet_server.rollouts.gates.error_rate: the failed-request gate, table-driven, then in decide."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fleet_server.errors import RolloutPolicyError
from fleet_server.rollouts.engine import decide
from fleet_server.rollouts.gates import GATES, GateInputs
from fleet_server.rollouts.gates.error_rate import GATE, MIN_ERRORS
from fleet_server.rollouts.metrics import DeviceObservation, WindowMetrics
from fleet_server.rollouts.policy import RolloutPolicy, Selector, Thresholds
from fleet_server.rollouts.state import Rollout
from rollout_cli import RolloutCli

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def rollout(min_requests: int = 100, **thresholds: Any) -> Rollout:
    policy = RolloutPolicy(
        steps=(0.5, 1.0),
        dwell_seconds=60,
        min_requests=min_requests,
        thresholds=Thresholds(**thresholds),
    )
    return Rollout("ro-e", "digits", 1, 2, Selector(group="g"), policy, created_at=T0)


def judge(
    canary: tuple[int, int],
    control: tuple[int, int],
    *,
    has_control: bool = True,
    min_requests: int = 100,
    **thresholds: Any,
) -> tuple[str, float | None, str]:
    """The gate's (status, measured, detail) for canary and control ``(errors, requests)``."""
    c = WindowMetrics(reports=1, errors=canary[0], requests=canary[1])
    k = WindowMetrics(reports=1, errors=control[0], requests=control[1])
    g = GATE.verdict(GateInputs(rollout(min_requests, **thresholds), {}, c, k, has_control))
    assert g.name == "error_rate"
    return g.status, g.measured, g.detail


@pytest.mark.parametrize(
    ("canary", "control", "status"),
    [
        ((0, 1000), (0, 9000), "ok"),  # no failures anywhere
        ((10, 1000), (90, 9000), "ok"),  # equal rates (1 %)
        ((15, 1000), (90, 9000), "ok"),  # +0.5 points: inside the 1 point margin
        ((25, 1000), (90, 9000), "ok"),  # +1.5 points, not clearly above +1 on 1000 requests
        ((60, 1000), (90, 9000), "breach"),  # 6 % vs 1 %: clearly worse
        ((300, 3000), (0, 27000), "breach"),  # a candidate failing 10 % of requests
        ((5, 100), (0, 1000), "breach"),  # 5 % vs 0 on the minimum sample: 5 errors suffice
        ((4, 100), (0, 1000), "ok"),  # 4 of 100 vs 0: could be chance at z = 1.645
        ((100, 10000), (10, 10000), "ok"),  # 1 % vs 0.1 %: +0.9 points, under the margin
    ],
)
def test_decision_table(canary: tuple[int, int], control: tuple[int, int], status: str) -> None:
    got, measured, detail = judge(canary, control)
    assert got == status, detail
    assert measured == pytest.approx(canary[0] / canary[1] - control[0] / control[1])
    assert f"(n={canary[1]})" in detail
    assert "max +1.00" in detail


@pytest.mark.parametrize("errors", range(1, MIN_ERRORS))
def test_a_handful_of_failures_never_halts_even_when_all_requests_fail(errors: int) -> None:
    # min_requests=1 lets a tiny sample through the request count; every canary request
    # failed, none of the control's: still fewer than MIN_ERRORS failures, no breach.
    status, _, _ = judge((errors, errors), (0, errors), min_requests=1)
    assert status == "ok"


def test_min_errors_failures_on_a_tiny_sample_do_halt() -> None:
    status, _, _ = judge((MIN_ERRORS, MIN_ERRORS), (0, 100), min_requests=1)
    assert status == "breach"


def test_too_few_requests_skips_and_never_waits() -> None:
    # 50 of 50 canary requests failed, but the policy wants 100 per side: not judged, and the
    # gate does not hold the rollout for traffic either (it is not "waiting").
    got = judge((50, 50), (0, 5000))
    assert got == ("skipped", None, "error_rate: 50/5000 requests (canary/control), need 100 each")


@pytest.mark.parametrize(
    ("kw", "has_control", "detail"),
    [
        ({"max_error_rate_increase": None}, True, "disabled"),
        ({}, False, "no control group left"),
    ],
)
def test_skipped(kw: dict[str, Any], has_control: bool, detail: str) -> None:
    assert judge((500, 1000), (0, 1000), has_control=has_control, **kw) == (
        "skipped",
        None,
        detail,
    )


def test_threshold_is_a_rate_in_the_policy_document() -> None:
    assert Thresholds().max_error_rate_increase == 0.01
    p = RolloutPolicy(thresholds=Thresholds(max_error_rate_increase=0.03))
    assert p.to_dict()["thresholds"]["max_error_rate_increase"] == 0.03  # type: ignore[index]
    assert RolloutPolicy.from_dict(p.to_dict()) == p
    assert RolloutPolicy.from_dict({}).thresholds.max_error_rate_increase == 0.01
    with pytest.raises(RolloutPolicyError, match="max_error_rate_increase must be in"):
        RolloutPolicy.from_dict({"thresholds": {"max_error_rate_increase": 1.5}})


def test_registered_after_the_other_quality_gates() -> None:
    assert GATES[-1] is GATE
    assert GATE.phase == "quality"
    assert GATE.thresholds == ("max_error_rate_increase",)


# --------------------------------------------------------------------------- in decide
IDS = [f"dev-{i:02d}" for i in range(30)]


def fleet(r: Rollout, canary_errors: int) -> list[DeviceObservation]:
    """Members on v2 with ``canary_errors`` failures in 1000 requests; others 1 in 1000 on v1."""

    fast = tuple(1000 if i == 3 else 0 for i in range(len(WindowMetrics().latency_buckets)))

    def m(errors: int) -> WindowMetrics:
        return WindowMetrics(
            reports=3, requests=1000, errors=errors, device_answers=1000, latency_buckets=fast
        )

    return [
        DeviceObservation(d, 2, 2, "installed", metrics=m(canary_errors))
        if d in r.members
        else DeviceObservation(d, 1, 1, "installed", metrics=m(1))
        for d in IDS
    ]


@pytest.mark.parametrize(("errors", "state"), [(1, "dwelling"), (60, "paused")])
def test_decide_pauses_on_an_error_rate_breach_alone(errors: int, state: str) -> None:
    r = decide(rollout(), fleet(rollout(), 0), T0).rollout
    d = decide(r, fleet(r, errors), T0 + timedelta(seconds=61))
    assert d.rollout.state == state, d.reasons
    breached = [g.name for g in d.rollout.gates if g.status == "breach"]
    assert breached == ([] if errors == 1 else ["error_rate"])
    if breached:
        assert any("gate error_rate breached: 6.00% on canary" in x for x in d.reasons)
        assert d.assign == ()
    else:
        assert d.rollout.wave == 1


# --------------------------------------------------------------------------- CLI
def test_rollouts_create_takes_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    cli = RolloutCli(monkeypatch)
    res = cli.create("--max-error-increase", "0.03", "--json")
    assert res.exit_code == 0, res.output
    assert cli.sent[0]["policy"]["thresholds"] == {"max_error_rate_increase": 0.03}
    bad = cli.create("--max-error-increase", "2")
    assert bad.exit_code == 2
    assert len(cli.sent) == 1
