"""fleet_server.rollouts.gates.output_distribution: the canary's outputs against the control's.

Table-driven on the gate's verdict, then once through ``decide`` (a confidently wrong canary
halts, a good one passes, the last wave is judged against the same devices before the switch),
then the threshold in the policy and the ``rollouts create`` option.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fleet_server.errors import RolloutPolicyError
from fleet_server.rollouts.engine import decide
from fleet_server.rollouts.gates import GATES, GateInputs
from fleet_server.rollouts.gates.output_distribution import (
    GATE,
    MAX_ROWS,
    MIN_ROWS,
    corrected_z,
    shifts,
)
from fleet_server.rollouts.metrics import (
    DeviceObservation,
    OutputMoments,
    TensorMoments,
    WindowMetrics,
)
from fleet_server.rollouts.policy import RolloutPolicy, Selector, Thresholds
from fleet_server.rollouts.state import Rollout
from rollout_cli import RolloutCli

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
EVEN = (0.1,) * 10
# A label bug: 80 % of the digits 3 answered as 8 (about 8 points less accurate).
LABEL_BUG = (0.1, 0.1, 0.1, 0.02, 0.1, 0.1, 0.1, 0.1, 0.18, 0.1)
# Half the 3s as 8s: about 5 points less accurate.
HALF_BUG = (0.1, 0.1, 0.1, 0.05, 0.1, 0.1, 0.1, 0.1, 0.15, 0.1)
# One point moved from class 3 to class 8: what two good models may differ by.
NUDGE = (0.1, 0.1, 0.1, 0.09, 0.1, 0.1, 0.1, 0.1, 0.11, 0.1)


def outputs(shares: Sequence[float], n: int, conf: float = 0.97) -> OutputMoments:
    """Moments of ``n`` softmax rows: the predicted class gets ``conf``, the others the rest."""
    rest = (1 - conf) / (len(shares) - 1)
    s = [n * (p * conf + (1 - p) * rest) for p in shares]
    sq = [n * (p * conf**2 + (1 - p) * rest**2) for p in shares]
    return OutputMoments.of_tensor("probabilities", TensorMoments.of([n] * len(shares), s, sq))


def rollout(**thresholds: Any) -> Rollout:
    policy = RolloutPolicy(steps=(0.5, 1.0), dwell_seconds=60, thresholds=Thresholds(**thresholds))
    return Rollout("ro-o", "digits", 1, 2, Selector(group="g"), policy, created_at=T0)


def judge(
    canary: OutputMoments,
    reference: OutputMoments,
    *,
    has_control: bool = True,
    before: OutputMoments | None = None,
    **thresholds: Any,
) -> tuple[str, float | None, str]:
    """The verdict against ``reference``: the control group's outputs when ``has_control``
    (with ``before`` as the before-switch windows, none by default), else the before-switch
    windows."""
    i = GateInputs(
        rollout(**thresholds),
        {},
        has_control=has_control,
        canary_outputs=canary,
        control_outputs=reference if has_control else OutputMoments(),
        before_outputs=(before or OutputMoments()) if has_control else reference,
    )
    g = GATE.verdict(i)
    assert g.name == "output_distribution"
    return g.status, g.measured, g.detail


@pytest.mark.parametrize(
    ("canary", "control", "status"),
    [
        (outputs(EVEN, 1000), outputs(EVEN, 9000), "ok"),  # the same distribution
        (outputs(EVEN, 1000, 0.995), outputs(EVEN, 9000, 0.9), "ok"),  # only more confident
        (outputs(NUDGE, 20000), outputs(EVEN, 20000), "ok"),  # a point moved, huge samples
        (outputs(LABEL_BUG, 1000), outputs(EVEN, 9000), "breach"),  # confidently wrong
        (outputs(LABEL_BUG, MIN_ROWS), outputs(EVEN, 3000), "breach"),  # on the minimum sample
        (outputs(HALF_BUG, 2000), outputs(EVEN, 9000), "breach"),  # 5 points less accurate
        (outputs(HALF_BUG, 400), outputs(EVEN, 9000), "waiting"),  # neither bad nor fine yet
        (outputs(LABEL_BUG, MIN_ROWS - 1), outputs(EVEN, 9000), "waiting"),  # too few rows
        (outputs(EVEN, 1000), outputs(LABEL_BUG, MIN_ROWS - 1), "waiting"),  # likewise control
    ],
)
def test_decision_table(canary: OutputMoments, control: OutputMoments, status: str) -> None:
    got, measured, detail = judge(canary, control)
    assert got == status, detail
    if min(canary.rows, control.rows) >= MIN_ROWS:
        assert measured is not None
        assert f"on canary (n={canary.rows}) vs control on v1 (n={control.rows})" in detail
        assert "max 0.10" in detail
    if status == "waiting" and min(canary.rows, control.rows) < MIN_ROWS:
        assert measured is None
        assert f"{canary.rows} output rows on canary, {control.rows} on control" in detail
        assert f"need {MIN_ROWS}" in detail


def test_inconclusive_waits_then_the_point_estimate_decides_at_max_rows() -> None:
    status, measured, detail = judge(outputs(HALF_BUG, 400), outputs(EVEN, 9000))
    assert status == "waiting"
    assert detail.startswith("output_distribution inconclusive: output shift |d| 0.19")
    # Shares just past the limit (d about 0.11) on MAX_ROWS rows: the estimate is above it.
    near = (0.1, 0.1, 0.1, 0.07, 0.1, 0.1, 0.1, 0.1, 0.13, 0.1)
    status, measured, detail = judge(outputs(near, MAX_ROWS), outputs(EVEN, MAX_ROWS))
    assert status == "breach", detail
    assert detail.startswith(f"inconclusive after {MAX_ROWS} rows")
    assert measured is not None
    assert 0.1 < measured < 0.12
    closer = (0.1, 0.1, 0.1, 0.08, 0.1, 0.1, 0.1, 0.1, 0.12, 0.1)  # d about 0.07
    status, _, detail = judge(outputs(closer, MAX_ROWS), outputs(EVEN, MAX_ROWS))
    assert status == "ok", detail


def test_the_message_names_the_classes_that_moved_most() -> None:
    _, measured, detail = judge(outputs(LABEL_BUG, 1000), outputs(EVEN, 9000))
    # Class 3 lost most (d about 0.34), then class 8 gained (about 0.24); others did not move.
    assert "class 3: 10.0% -> 2.3% (d -0.34), class 8: 10.0% -> 17.7% (d +0.23)" in detail
    assert "class 0" not in detail  # unmoved classes are not listed
    assert measured is not None
    assert 0.3 < measured < 0.4
    assert "on canary (n=1000) vs control on v1 (n=9000): |d| 0.34, evidence z 10.4" in detail


def test_many_features_are_tested_with_a_bonferroni_z() -> None:
    assert corrected_z(1.645, 1) == pytest.approx(1.645, abs=1e-3)
    assert corrected_z(1.645, 20) == pytest.approx(2.807, abs=1e-3)  # 5 % / 20
    _, _, detail = judge(outputs(LABEL_BUG, 1000), outputs(EVEN, 9000))
    assert "evidence z above 2.81 for 10 features" in detail


@pytest.mark.parametrize(
    ("canary", "control", "kw", "detail"),
    [
        (outputs(LABEL_BUG, 1000), outputs(EVEN, 1000), {"max_output_shift": None}, "disabled"),
        (OutputMoments(), outputs(EVEN, 1000), {}, "no output windows reported on canary"),
        (
            outputs(LABEL_BUG, 1000),
            OutputMoments(),
            {},
            "no output windows of control or the same devices before the switch",
        ),
        (
            outputs(LABEL_BUG, 1000),
            OutputMoments.of_tensor("logits", TensorMoments.of([1000], [1.0], [1.0])),
            {},
            "no output tensor shared by the canary and control on v1",
        ),
    ],
)
def test_skipped(
    canary: OutputMoments, control: OutputMoments, kw: dict[str, Any], detail: str
) -> None:
    status, measured, got = judge(canary, control, **kw)
    assert (status, measured, got) == ("skipped", None, detail)


def test_a_larger_threshold_lets_the_half_bug_through() -> None:
    assert judge(outputs(HALF_BUG, 2000), outputs(EVEN, 9000))[0] == "breach"
    assert judge(outputs(HALF_BUG, 2000), outputs(EVEN, 9000), max_output_shift=0.3)[0] == "ok"


def test_last_wave_compares_with_the_same_devices_before_the_switch() -> None:
    before = outputs(EVEN, 5000)
    status, _, detail = judge(outputs(LABEL_BUG, 1000), before, has_control=False)
    assert status == "breach"
    assert "vs the same devices on v1 before the switch (n=5000)" in detail
    assert judge(outputs(EVEN, 1000), before, has_control=False)[0] == "ok"
    got = judge(outputs(LABEL_BUG, 1000), OutputMoments(), has_control=False)
    assert got == ("skipped", None, "no output windows of the same devices before the switch")


# A site whose devices see more 8s and fewer 3s than the rest of the fleet, on either version.
SITE_MIX = LABEL_BUG


@pytest.mark.parametrize(
    ("control", "before", "status"),
    [
        # The canary's devices always saw this mix: the control differs, their own past does not.
        (outputs(EVEN, 9000), outputs(SITE_MIX, 1000), "ok"),
        # Their traffic changed at the switch, the control's too: the control does not differ.
        (outputs(SITE_MIX, 9000), outputs(EVEN, 1000), "ok"),
        # A candidate that answers differently: both references see it.
        (outputs(EVEN, 9000), outputs(EVEN, 1000), "breach"),
        # Too little history before the switch (devices new to the fleet): the control judges.
        (outputs(EVEN, 9000), outputs(EVEN, MIN_ROWS - 1), "breach"),
        (outputs(SITE_MIX, 9000), outputs(EVEN, MIN_ROWS - 1), "ok"),
    ],
)
def test_both_references_must_see_the_shift(
    control: OutputMoments, before: OutputMoments, status: str
) -> None:
    got, measured, detail = judge(outputs(SITE_MIX, 1000), control, before=before)
    assert got == status, detail
    assert measured is not None
    assert "vs control on v1 (n=9000)" in detail
    judged_before = before.rows >= MIN_ROWS
    assert ("vs the same devices on v1 before the switch (n=1000)" in detail) == judged_before


def test_waits_while_no_reference_has_enough_rows() -> None:
    got = judge(outputs(LABEL_BUG, 1000), outputs(EVEN, 200), before=outputs(EVEN, 100))
    assert got == (
        "waiting",
        None,
        "output_distribution: 1000 output rows on canary, 200 on control on v1, 100 on the "
        "same devices on v1 before the switch; need 300",
    )


def test_non_probability_outputs_are_shown_as_means() -> None:
    def m(mean: float, n: int) -> OutputMoments:
        return OutputMoments.of_tensor("y", TensorMoments.of([n], [mean * n], [(mean**2 + 4) * n]))

    status, _, detail = judge(m(13.0, 1000), m(10.0, 5000))  # sd 2, mean +3: d = 1.5
    assert status == "breach"
    assert "class 0: 10 -> 13 (d +1.50)" in detail


def test_moments_merge_exactly_and_refuse_another_shape() -> None:
    a, b = outputs(EVEN, 300), outputs(LABEL_BUG, 700)
    total = OutputMoments.total([a, b])
    assert total.rows == 1000
    t = total.tensors["probabilities"]
    sa, sb = a.tensors["probabilities"].sum, b.tensors["probabilities"].sum
    assert t.sum == tuple(x + y for x, y in zip(sa, sb, strict=True))
    assert t.windows == 2
    odd = OutputMoments.of_tensor("probabilities", TensorMoments.of([5], [1.0], [1.0]))
    merged = total.merge(odd)
    assert merged.tensors == total.tensors
    assert merged.mismatched == 1
    assert shifts(total, odd, 0.1) == []


def test_registered_as_a_quality_gate_with_its_threshold() -> None:
    assert GATE in GATES
    assert GATE.phase == "quality"
    assert GATE.thresholds == ("max_output_shift",)


def test_threshold_is_in_the_policy_document_with_a_default() -> None:
    assert Thresholds().max_output_shift == 0.1
    p = RolloutPolicy(thresholds=Thresholds(max_output_shift=0.2))
    assert p.to_dict()["thresholds"]["max_output_shift"] == 0.2  # type: ignore[index]
    assert RolloutPolicy.from_dict(p.to_dict()) == p
    # A policy stored before the gate existed takes the default.
    old = RolloutPolicy().to_dict()
    del old["thresholds"]["max_output_shift"]  # type: ignore[attr-defined]
    assert RolloutPolicy.from_dict(old).thresholds.max_output_shift == 0.1
    with pytest.raises(RolloutPolicyError, match="max_output_shift must be in"):
        RolloutPolicy.from_dict({"thresholds": {"max_output_shift": 2}})


# --------------------------------------------------------------------------- in decide
IDS = [f"dev-{i:02d}" for i in range(30)]
FAST = tuple(1000 if i == 3 else 0 for i in range(len(WindowMetrics().latency_buckets)))
HEALTHY = WindowMetrics(reports=3, requests=1000, device_answers=1000, latency_buckets=FAST)


def fleet(r: Rollout, canary: OutputMoments) -> list[DeviceObservation]:
    """Members on v2 answering like ``canary``, the others on v1 evenly; v1 before the switch."""
    before = outputs(EVEN, 1000)
    member = DeviceObservation(
        "", 2, 2, "installed", metrics=HEALTHY, outputs=canary, outputs_before=before
    )
    control = DeviceObservation("", 1, 1, "installed", metrics=HEALTHY, outputs=before)
    return [replace(member if d in r.members else control, device_id=d) for d in IDS]


def run(canary: OutputMoments, policy: RolloutPolicy | None = None) -> Rollout:
    """Step a rollout (default policy unless given) until it leaves the active states."""
    r = Rollout("ro-o", "digits", 1, 2, Selector(group="g"), policy or RolloutPolicy(),
                created_at=T0)  # fmt: skip
    now = T0
    for _ in range(50):
        r = decide(r, fleet(r, canary), now).rollout
        if not r.active:
            return r
        now += timedelta(seconds=r.policy.dwell_seconds + 1)
    raise AssertionError(f"rollout still {r.state}")


def test_default_policy_halts_a_confidently_wrong_canary_and_completes_a_good_one() -> None:
    bad = run(outputs(LABEL_BUG, 400))
    assert bad.state == "paused"
    assert bad.wave == 0  # stopped at the canary
    assert [g.name for g in bad.gates if g.status == "breach"] == ["output_distribution"]
    assert any("gate output_distribution breached" in x and "class 3" in x for x in bad.reasons)
    good = run(outputs(EVEN, 400, 0.99))
    assert good.state == "completed"
    assert next(g for g in good.gates if g.name == "output_distribution").status == "ok"


def test_last_wave_is_judged_against_the_before_switch_windows() -> None:
    # A canary of everyone: no control group at any wave, so only "before" can judge.
    everyone = RolloutPolicy(canary_fraction=1.0, steps=(1.0,), dwell_seconds=60)
    good = run(outputs(EVEN, 400), everyone)
    assert good.state == "completed"
    g = next(g for g in good.gates if g.name == "output_distribution")
    assert g.status == "ok"
    assert "before the switch" in g.detail
    bad = run(outputs(LABEL_BUG, 400), everyone)
    assert bad.state == "paused"
    assert any(
        "output_distribution breached" in x and "before the switch" in x for x in bad.reasons
    )


# --------------------------------------------------------------------------- CLI
def test_rollouts_create_takes_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    cli = RolloutCli(monkeypatch)
    res = cli.create("--max-output-shift", "0.25", "--json")
    assert res.exit_code == 0, res.output
    assert cli.sent[0]["policy"]["thresholds"] == {"max_output_shift": 0.25}
    bad = cli.create("--max-output-shift", "2")
    assert bad.exit_code == 2
    assert len(cli.sent) == 1
