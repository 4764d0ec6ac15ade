"""The ``ground_truth`` gate and what feeds it: labelled confusion counts, differenced per report
interval, merged over devices, kept by history rollups, and judged canary vs control."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from click.testing import CliRunner

from edge_agent.quality.confusion import Confusion
from edge_agent.wire.telemetry import ModelStats, TelemetryReport
from edge_agent.wire.telemetry_ground_truth import GroundTruthStats
from fleet_server.cli import rollouts as cli_rollouts
from fleet_server.errors import RolloutPolicyError
from fleet_server.history.cells import RawRow, RollupCell, fold_rows, merge_cells
from fleet_server.rollouts.gates import GATES, GateInputs
from fleet_server.rollouts.gates.ground_truth import GATE
from fleet_server.rollouts.metrics import WindowMetrics
from fleet_server.rollouts.observation import interval_metrics
from fleet_server.rollouts.policy import RolloutPolicy, Selector, Thresholds
from fleet_server.rollouts.state import Rollout
from fleet_server.rollouts.truth import AccuracySummary, confusion_delta, merge_confusion

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def matrix(n: int, correct: int, k: int = 3) -> Confusion:
    """``n`` labelled samples of ``k`` classes, ``correct`` right (the wrong ones as 0 -> 1)."""
    rows = [[0] * k for _ in range(k)]
    rows[0][0] = correct
    rows[0][1] = n - correct
    return Confusion(tuple(tuple(r) for r in rows))


def rollout(**thresholds: Any) -> Rollout:
    policy = RolloutPolicy(steps=(0.5, 1.0), dwell_seconds=60, thresholds=Thresholds(**thresholds))
    return Rollout("ro-g", "digits", 1, 2, Selector(group="g"), policy, created_at=T0)


def judge(
    canary: Confusion | None,
    control: Confusion | None,
    *,
    has_control: bool = True,
    **thresholds: Any,
) -> tuple[str, str]:
    c = WindowMetrics(reports=1, confusion=canary)
    k = WindowMetrics(reports=1, confusion=control)
    g = GATE.verdict(GateInputs(rollout(**thresholds), {}, c, k, has_control))
    assert g.name == "ground_truth"
    return g.status, g.detail


@pytest.mark.parametrize(
    ("canary", "control", "status", "shown"),
    [
        ((1000, 990), (9000, 8910), "ok", "99.0% of 1000 labelled"),  # equal accuracy
        ((1000, 975), (9000, 8910), "ok", "-1.50 points"),  # inside the 2 point margin
        ((300, 290), (3000, 2970), "ok", "max -2.00"),  # 96.7 %: -2.3 points, not certain
        ((1000, 910), (9000, 8970), "breach", "0->1 x90"),  # 91 % vs 99.7 %: the case
        ((200, 180), (200, 198), "breach", "90.0% of 200"),  # 10 points on the minimum sample
        ((200, 192), (200, 198), "ok", "96.0% of 200"),  # 3 points on 200 each: could be chance
        ((1000, 1000), (1000, 900), "ok", "+10.00 points"),  # the canary is better
        ((199, 100), (9000, 8970), "waiting", "199/9000 labelled"),  # too few canary labels
        ((1000, 900), (150, 150), "waiting", "1000/150 labelled"),
    ],
)
def test_decision_table(
    canary: tuple[int, int], control: tuple[int, int], status: str, shown: str
) -> None:
    got, detail = judge(matrix(*canary), matrix(*control))
    assert got == status, detail
    assert shown in detail


def test_no_labels_never_hold_a_rollout() -> None:
    assert judge(None, None) == ("skipped", "no labels")
    assert judge(None, matrix(1000, 990))[0] == "skipped"
    status, detail = judge(matrix(500, 450), None)
    assert (status, detail.startswith("no labels on the control group")) == ("skipped", True)
    status, detail = judge(matrix(500, 450), matrix(500, 495), has_control=False)
    assert status == "skipped"
    assert "no control group left (canary 90.0% of 500 labelled" in detail
    assert judge(matrix(1000, 500), matrix(1000, 1000), max_ground_truth_drop=None) == (
        "skipped",
        "disabled",
    )


def test_thresholds_in_the_policy_are_backward_compatible() -> None:
    t = RolloutPolicy.from_dict({}).thresholds
    assert (t.max_ground_truth_drop, t.min_ground_truth_labels) == (0.02, 200)
    p = RolloutPolicy(thresholds=Thresholds(max_ground_truth_drop=0.05, min_ground_truth_labels=50))
    assert RolloutPolicy.from_dict(p.to_dict()) == p
    assert judge(matrix(60, 50), matrix(60, 60), min_ground_truth_labels=50)[0] == "breach"
    for bad in (0, -1, 1.5, True):
        with pytest.raises(RolloutPolicyError, match="min_ground_truth_labels"):
            Thresholds(min_ground_truth_labels=bad)
    with pytest.raises(RolloutPolicyError, match="max_ground_truth_drop"):
        RolloutPolicy.from_dict({"thresholds": {"max_ground_truth_drop": 2}})


def test_registered_as_a_quality_gate_with_a_create_option() -> None:
    assert GATE in GATES
    assert GATE.phase == "quality"
    assert GATE.thresholds == ("max_ground_truth_drop", "min_ground_truth_labels")
    group = cli_rollouts.click.Group()
    cli_rollouts.register_rollout_commands(group)
    runner = CliRunner()
    out = runner.invoke(group, ["rollouts", "create", "--help"]).output
    assert "--max-accuracy-drop" in out
    assert "--min-labels" in out


# ------------------------------------------------------------------ from reports to windows
def report(seq: int, version: int, truth: dict[int, Confusion] | None, ok: int = 10) -> Any:
    gt = (
        None
        if truth is None
        else GroundTruthStats({"counted": sum(c.n for c in truth.values())}, truth)
    )
    stats = ModelStats(version=version, outcomes={"ok": ok, "error": 0, "rejected": 0},
                       ground_truth=gt)  # fmt: skip
    return TelemetryReport("dev-1", seq, 0.0, 1.0, started_at=5.0, models={"m": stats}).to_dict()


def test_the_interval_counts_the_serving_versions_new_labels() -> None:
    a, b = matrix(10, 9), matrix(25, 20)
    first, second = report(1, 2, {2: a}), report(2, 2, {1: matrix(4, 4), 2: b})
    delta = interval_metrics(first, second, "m", 2)
    assert delta is not None
    assert delta.confusion == Confusion(
        tuple(
            tuple(x - y for x, y in zip(rb, ra, strict=True))
            for rb, ra in zip(b.counts, a.counts, strict=True)
        )
    )
    # Labels before any were counted: the previous report had none (counters start at zero).
    assert interval_metrics(report(1, 2, None), first, "m", 2).confusion == a  # type: ignore[union-attr]
    # No new labels, none at all, or counts that went backwards: no confusion for the interval.
    assert interval_metrics(first, report(2, 2, {2: a}), "m", 2).confusion is None  # type: ignore[union-attr]
    assert interval_metrics(report(1, 2, None), report(2, 2, None), "m", 2).confusion is None  # type: ignore[union-attr]
    assert confusion_delta(second["models"]["m"], first["models"]["m"]) is None
    other = report(2, 2, {2: matrix(30, 30, k=4)})
    assert confusion_delta(first["models"]["m"], other["models"]["m"]) is None  # classes differ


def test_merging_is_exact_and_tolerates_other_classes() -> None:
    a, b = matrix(10, 9), matrix(5, 1)
    total = WindowMetrics.total(
        [WindowMetrics(confusion=a), WindowMetrics(), WindowMetrics(confusion=b)]
    )
    assert total.confusion == a.merge(b)
    assert merge_confusion(a, matrix(3, 3, k=4)) == a
    assert merge_confusion(None, None) is None
    s = AccuracySummary.of(a.merge(b))
    assert (s.n, s.correct) == (15, 10)
    assert s.low < 10 / 15 < s.high
    assert str(AccuracySummary.of(None)) == "no labels"


def test_rollups_keep_the_confusion_counts() -> None:
    rows = [
        RawRow("dev-1", seq, "report", T0, report(seq, 2, {2: matrix(10 * seq, 9 * seq)}))
        for seq in (1, 2, 3)
    ]
    cells = fold_rows(rows[1:], {"dev-1": rows[0].payload}, {"dev-1": "g"})
    cell = cells[("dev-1", "m", 2)]
    assert cell.metrics.confusion == matrix(20, 18)
    stored = RollupCell.from_docs("g", None, cell.metrics_doc(), None)
    assert stored.metrics.confusion == matrix(20, 18)
    merged = merge_cells([(("dev-1", "m", 2), stored), (("dev-1", "m", 2), stored)])
    assert merged[("dev-1", "m", 2)].metrics.confusion == matrix(40, 36)
    # A rollup stored before ground truth (no key), or with a malformed one, has none.
    doc = cell.metrics_doc()
    assert (
        RollupCell.from_docs("g", None, {**doc, "confusion": {"counts": 7}}).metrics.confusion
        is None
    )
    del doc["confusion"]
    assert RollupCell.from_docs("g", None, doc).metrics.confusion is None
