"""The shadow phase of a rollout (issue 12 item 2): the shadow_disagreement gate's decision
table, the device evidence built from telemetry rows, and the engine's shadow phase in decide
(canaries get the candidate as a shadow; a breach halts before any canary serves; a pass enters
the canary wave; devices without the capability, and rollouts given no shadow inputs, have no
shadow phase)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from statistics import NormalDist
from typing import Any

import pytest

from edge_agent.quality.confusion import Confusion
from fleet_server.cli.rollouts import render_rollout
from fleet_server.registry.rollouts import rollout_from_dict, rollout_to_dict
from fleet_server.rollouts.engine import decide, resume, wave_order
from fleet_server.rollouts.gates import GateInputs
from fleet_server.rollouts.gates.shadow_disagreement import GATE, breach_z
from fleet_server.rollouts.metrics import DeviceObservation
from fleet_server.rollouts.policy import RolloutPolicy, Selector, Thresholds
from fleet_server.rollouts.shadow_evidence import ShadowEvidence, ShadowInputs, shadow_evidence
from fleet_server.rollouts.state import OfflineCheck, Rollout
from rollout_cli import RolloutCli

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
IDS = [f"dev-{i:02d}" for i in range(20)]


def rollout(offline: float | None = None, **kw: Any) -> Rollout:
    thresholds = Thresholds(**kw.pop("thresholds", {}))
    policy = RolloutPolicy(
        canary_count=4, steps=(0.5, 1.0), dwell_seconds=60, thresholds=thresholds, **kw
    )
    check = None if offline is None else OfflineCheck("passed", n=500, disagreement=offline)
    return Rollout("ro-s", "digits", 1, 2, Selector(group="g"), policy, T0, offline=check)


def evidence(rows: int, disagree: int, flip: tuple[int, int] = (3, 8), **kw: Any) -> ShadowEvidence:
    """``rows`` compared over 10 classes, ``disagree`` of them live ``flip[0]`` -> ``flip[1]``."""
    m = [[0] * 10 for _ in range(10)]
    m[0][0] = rows - disagree
    m[flip[0]][flip[1]] = disagree
    flips = Confusion(tuple(tuple(r) for r in m))
    return ShadowEvidence(rows, rows - disagree, flips, devices=kw.pop("devices", 2), **kw)


def judge(e: ShadowEvidence, r: Rollout | None = None) -> tuple[str, str]:
    r = r or replace(rollout(), shadows=dict.fromkeys(IDS[:2], T0))
    g = GATE.verdict(GateInputs(r, {}, shadow=e))
    assert g.name == "shadow_disagreement"
    return g.status, g.detail


# --------------------------------------------------------------------------- the gate
@pytest.mark.parametrize(
    ("offline", "rows", "disagree", "status"),
    [
        (None, 0, 0, "waiting"),  # nothing compared yet
        (None, 299, 100, "waiting"),  # below the minimum sample, however bad
        (None, 1000, 0, "ok"),  # the same model
        (None, 1000, 30, "ok"),  # 3 % < 5 % policy maximum
        (None, 1000, 55, "waiting"),  # 5.5 %: neither clearly above nor below 5 %: more rows
        (None, 3000, 165, "breach"),  # still 5.5 % at 10x the minimum: the estimate decides
        (None, 3000, 140, "ok"),  # 4.7 % at 10x the minimum: the estimate decides
        (None, 500, 50, "breach"),  # 10 %: a labelling bug (3s answered as 8s)
        (0.01, 1000, 20, "ok"),  # 2 % vs expected 1 % + 2 points
        (0.01, 1000, 60, "breach"),  # 6 % vs expected 1 % + 2 points
        (0.09, 500, 50, "waiting"),  # 10 % vs 9 % + 2 points: not shown inside yet
        (0.09, 3000, 300, "ok"),  # 10 %, but the offline comparison expected 9 %
    ],
)
def test_decision_table(offline: float | None, rows: int, disagree: int, status: str) -> None:
    r = replace(rollout(offline), shadows=dict.fromkeys(IDS[:2], T0))
    got, detail = judge(evidence(rows, disagree), r)
    assert got == status, detail


@pytest.mark.parametrize("z", [1.282, 1.645, 2.326])
def test_breach_bound_spends_alpha_over_sample_doublings(z: float) -> None:
    """The gate looks at every report: its breach bound gets stricter as the sample doubles so
    that the looks of a whole shadow phase spend at most the policy's one-sided level."""
    normal = NormalDist()
    alpha = 1 - normal.cdf(z)
    need = 300
    epochs = [need * 2**k for k in range(12)]
    zs = [breach_z(z, n, need) for n in epochs]
    assert zs == sorted(zs)
    assert zs[0] > z  # never looser than the policy's own z
    spent = sum(1 - normal.cdf(x) for x in zs)
    assert alpha / 2 < spent <= alpha + 1e-12
    # Inside an epoch the bound does not move; below the minimum sample it is the first one's.
    assert breach_z(z, need, need) == breach_z(z, 2 * need - 1, need) == breach_z(z, 10, need)
    assert breach_z(z, 2 * need, need) > breach_z(z, 2 * need - 1, need)


@pytest.mark.parametrize("z", [1e-6, 0.5, 8.3, 8.5, 40.0, 1e6])
def test_any_policy_z_gives_a_bound_and_a_verdict(z: float) -> None:
    """The policy bounds z only below: where 1 - cdf(z) rounds to 0 the correction must not
    ask the inverse normal for 1.0 (StatisticsError, a crashed rollout step)."""
    from fleet_server.rollouts.gates.output_distribution import corrected_z

    for n in (0, 300, 5000, 10**9):
        assert breach_z(z, n, 300) >= z
    assert corrected_z(z, 40) >= z
    r = replace(rollout(), shadows=dict.fromkeys(IDS[:2], T0))
    r = replace(r, policy=replace(r.policy, z=z))
    assert judge(evidence(3000, 300), r)[0] in ("ok", "breach", "waiting")


@pytest.mark.parametrize(("rows", "disagree"), [(300, 22), (700, 48), (1300, 85)])
def test_a_borderline_sample_waits_instead_of_breaching(rows: int, disagree: int) -> None:
    """Past the policy's z but not past the look-corrected bound: more rows, not a halt."""
    r = replace(rollout(), shadows=dict.fromkeys(IDS[:2], T0))
    status, detail = judge(evidence(rows, disagree), r)
    assert status == "waiting", detail


def test_breach_names_the_flips_and_the_expectation() -> None:
    r = replace(rollout(0.01), shadows=dict.fromkeys(IDS[:2], T0))
    status, detail = judge(evidence(1000, 90), r)
    assert status == "breach"
    assert "3 -> 8: 90" in detail
    assert "expected 1.0% (offline) + 2.0 points" in detail
    status, detail = judge(evidence(1000, 90))
    assert "policy maximum (no offline comparison)" in detail


def test_disabled_and_failed_installs() -> None:
    off = replace(rollout(thresholds={"max_shadow_disagreement": None}), shadows={"a": T0, "b": T0})
    assert judge(evidence(1000, 500), off)[0] == "skipped"
    one = evidence(1000, 0, failed={"a": "golden samples failed"})
    assert judge(one)[0] == "ok"  # one of two canaries: not a halt by itself
    two = evidence(0, 0, failed={"a": "x", "b": "y"})
    status, detail = judge(two)
    assert status == "breach"
    assert "failed on 2/2" in detail
    # Judged like install failures: 2 of 20 canaries (10 % < 20 %) is the devices' own trouble,
    # 3 of 5 is the candidate's.
    wide = replace(rollout(), shadows=dict.fromkeys(IDS[:20], T0))
    two_of_20 = evidence(1000, 0, installed=18, failed={"a": "x", "b": "y"})
    assert judge(two_of_20, wide)[0] == "ok"
    five = replace(rollout(), shadows=dict.fromkeys(IDS[:5], T0))
    three_of_5 = evidence(100, 0, installed=2, failed={IDS[i]: "x" for i in range(3)})
    assert judge(three_of_5, five)[0] == "breach"


# --------------------------------------------------------------------------- evidence
@dataclass(frozen=True)
class Row:
    seq: int
    kind: str
    received_at: datetime
    payload: dict[str, Any]


def report(seq: int, at: datetime, compared: int, agree: int, counts: list[list[int]]) -> Row:
    entry = {"version": 2, "compared": compared, "agree": agree, "counts": counts}
    payload = {"models": {"digits": {"shadow_flips": {"versions": [entry]}}}}
    return Row(seq, "report", at, payload)


def test_evidence_differences_reports_and_restarts_from_zero() -> None:
    t = T0 + timedelta(seconds=10)
    rows = [
        Row(1, "report", T0 - timedelta(seconds=5), {"models": {"digits": {}}}),
        report(2, t, 10, 8, [[8, 2], [0, 0]]),  # new shadow: counted from zero
        report(3, t, 30, 25, [[20, 3], [2, 5]]),  # +20 rows
        report(4, t, 5, 5, [[5, 0], [0, 0]]),  # went backwards (shadow restarted): from zero
        Row(5, "report", t, {"models": "junk"}),  # malformed: skipped
    ]
    reported = {
        "device_id": "d",
        "models": {"digits": {"shadow": {"version": 2, "outcome": "installed"}}},
    }
    e = shadow_evidence("digits", 2, T0, reported, rows)
    assert (e.compared, e.agree, e.installed, e.devices) == (35, 30, 1, 1)
    assert e.flips == Confusion(((25, 3), (2, 5)))
    assert e.top_flips() == "0 -> 1: 3, 1 -> 0: 2"
    before = shadow_evidence("digits", 2, t + timedelta(seconds=1), None, rows)
    assert before.compared == 0  # every report before ``since`` is only a baseline
    failed = {
        "device_id": "d",
        "models": {"digits": {"shadow": {"version": 2, "outcome": "failed", "reason": "golden"}}},
    }
    assert shadow_evidence("digits", 2, T0, failed, []).failed == {"d": "golden"}


# --------------------------------------------------------------------------- in decide
def fleet(r: Rollout) -> list[DeviceObservation]:
    return [
        DeviceObservation(d, 2, 2, "installed") if d in r.members
        else DeviceObservation(d, 1, 1, "installed")
        for d in IDS
    ]  # fmt: skip


def inputs(r: Rollout, rows: int, disagree: int, capable: set[str] | None = None) -> ShadowInputs:
    per = {
        d: evidence(rows // max(1, len(r.shadows)), disagree // max(1, len(r.shadows)), devices=1)
        for d in r.shadows
    }
    return ShadowInputs(frozenset(IDS if capable is None else capable), True, per)


CANARY = wave_order("digits", IDS)[:4]


def start(r: Rollout, capable: set[str] | None = None) -> Any:
    return decide(r, fleet(r), T0, shadow=inputs(r, 0, 0, capable))


def test_shadow_phase_sends_shadows_first_and_serves_nothing() -> None:
    d = start(rollout())
    r = d.rollout
    assert (r.state, r.phase, r.wave) == ("dwelling", "shadow", -1)
    assert set(d.shadow) == set(CANARY)
    assert d.assign == ()
    assert r.members == {}
    assert "shadow phase: 4 canary device(s)" in d.reasons[-1]
    # dwelling: nothing else happens
    d = decide(r, fleet(r), T0 + timedelta(seconds=60), shadow=inputs(r, 2000, 200))
    assert d.rollout.phase == "shadow"
    assert d.assign == ()
    assert "shadow phase dwelling 60/120 s" in d.reasons[-1]
    # stored and read back with its phase
    assert rollout_from_dict(rollout_to_dict(r)) == r


@pytest.mark.parametrize("on_breach", ["pause", "abort"])
def test_a_bad_shadow_halts_before_any_canary_serves(on_breach: str) -> None:
    r = start(rollout(on_breach=on_breach)).rollout
    d = decide(r, fleet(r), T0 + timedelta(seconds=121), shadow=inputs(r, 2000, 200))
    assert d.rollout.state == ("paused" if on_breach == "pause" else "aborted")
    assert d.assign == ()
    assert d.rollout.members == {}
    assert any("gate shadow_disagreement breached" in x and "3 -> 8: 200" in x for x in d.reasons)
    # an abort withdraws the shadows (they never served)
    assert set(d.revert) == (set(CANARY) if on_breach == "abort" else set())


def test_a_good_shadow_lets_the_canary_serve() -> None:
    r = start(rollout()).rollout
    d = decide(r, fleet(r), T0 + timedelta(seconds=121), shadow=inputs(r, 2000, 20))
    assert (d.rollout.phase, d.rollout.state, d.rollout.wave) == ("serving", "dwelling", 0)
    assert set(d.assign) == set(CANARY)
    assert "shadow phase passed" in " ".join(d.reasons)
    assert any(g.name == "shadow_disagreement" and g.status == "ok" for g in d.rollout.gates)


def test_too_few_rows_keeps_waiting_in_the_shadow_phase() -> None:
    r = start(rollout()).rollout
    d = decide(r, fleet(r), T0 + timedelta(seconds=500), shadow=inputs(r, 40, 0))
    assert (d.rollout.phase, d.assign) == ("shadow", ())
    assert "rows compared in shadow" in d.reasons[-1]


def test_old_devices_get_no_shadow_and_serve_as_canaries_after_it() -> None:
    capable = set(CANARY[:2])
    d = start(rollout(), capable)
    assert set(d.shadow) == capable
    r = d.rollout
    d = decide(r, fleet(r), T0 + timedelta(seconds=121), shadow=inputs(r, 2000, 0, capable))
    assert set(d.assign) == set(CANARY)  # the old ones serve with the others, after the gate


@pytest.mark.parametrize(
    "shadow",
    [None, ShadowInputs(frozenset(IDS), False), ShadowInputs(frozenset(), True)],
    ids=["no-inputs", "not-a-classifier", "no-capable-canary"],
)
def test_no_shadow_phase(shadow: ShadowInputs | None) -> None:
    d = decide(rollout(), fleet(rollout()), T0, shadow=shadow)
    assert (d.rollout.phase, d.rollout.wave, d.shadow) == ("serving", 0, ())
    assert set(d.assign) == set(CANARY)


def test_policy_turns_it_off() -> None:
    r = rollout(shadow_fraction=None)
    d = decide(r, fleet(r), T0, shadow=inputs(r, 0, 0))
    assert d.shadow == ()
    assert set(d.assign) == set(CANARY)
    assert RolloutPolicy.from_dict(r.policy.to_dict()).shadow_fraction is None


# --------------------------------------------------------------------------- CLI
def test_status_shows_the_phase() -> None:
    r = start(rollout()).rollout
    body = {**rollout_to_dict(r), "wave_sizes": [4, 10, 20], "counts": {"control": 20}}
    text = "\n".join(render_rollout(body))
    assert "phase shadow: 4 canary device(s) run v2 as a shadow (not serving)" in text
    plain = "\n".join(render_rollout({**rollout_to_dict(rollout()), "counts": {}}))
    assert "phase" not in plain


def test_rollouts_create_takes_the_shadow_options(monkeypatch: pytest.MonkeyPatch) -> None:
    cli = RolloutCli(monkeypatch)
    sent = cli.sent
    res = cli.create(
        "--json",
        "--shadow-fraction",
        "0.5",
        "--shadow-dwell",
        "30",
        "--min-shadow-rows",
        "100",
        "--max-shadow-disagreement",
        "0.08",
    )
    assert res.exit_code == 0, res.output
    p = sent[-1]["policy"]
    assert (p["shadow_fraction"], p["shadow_dwell_seconds"]) == (0.5, 30.0)
    assert p["thresholds"] == {"min_shadow_rows": 100, "max_shadow_disagreement": 0.08}
    res = cli.create("--json", "--no-shadow")
    assert res.exit_code == 0, res.output
    assert sent[-1]["policy"]["shadow_fraction"] is None
    assert RolloutPolicy.from_dict(sent[-1]["policy"]).shadow_fraction is None
    bad = cli.create("--json", "--no-shadow", "--shadow-fraction", "0.5")
    assert bad.exit_code == 2


def test_a_paused_shadow_phase_resumes_into_the_shadow_phase() -> None:
    r = start(rollout()).rollout
    d = decide(r, fleet(r), T0 + timedelta(seconds=121), shadow=inputs(r, 2000, 200))
    assert d.rollout.state == "paused"
    later = T0 + timedelta(seconds=200)
    resumed = resume(d.rollout, later)
    assert (resumed.state, resumed.phase, resumed.members) == ("dwelling", "shadow", {})
    d = decide(resumed, fleet(resumed), later + timedelta(seconds=121), shadow=inputs(r, 2000, 0))
    assert d.rollout.phase == "serving"
    assert set(d.assign) == set(CANARY)
