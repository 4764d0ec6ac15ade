"""The ``ground_truth`` gate (quality): labelled accuracy of the canary vs the control group.

Where applications tell their device the right answer to earlier requests (``POST
.../feedback``), devices report confusion counts per answering version and the rollout window
merges them exactly (``WindowMetrics.confusion``, ``fleet_server.rollouts.truth``). This gate
compares the canary's accuracy on those labels with the control group's by a one-sided
two-proportion test on the error rates (``one_sided_increase``): it trips when the canary is
worse by more than ``max_ground_truth_drop`` (2 points by default) with confidence at the
policy's ``z``. Its detail shows both accuracies with 95 % Wilson intervals and, on a breach,
the canary's largest confusions (which classes it answers wrongly as which).

Answers: ``skipped`` "no labels" while no labelled answer of the canary arrived (a fleet without
ground truth keeps rolling out as before), ``skipped`` without a control group or without labels
on the control group, ``waiting`` while labels flow but either side has fewer than
``min_ground_truth_labels`` (200 by default), ``disabled`` with the threshold None.

Owns this gate's definition only.
"""

from __future__ import annotations

from typing import Final

from fleet_server.rollouts.gates.base import Gate, GateInputs
from fleet_server.rollouts.metrics import one_sided_increase
from fleet_server.rollouts.state import GateResult
from fleet_server.rollouts.truth import AccuracySummary

__all__ = ["GATE"]

_NAME: Final = "ground_truth"


def verdict(i: GateInputs) -> GateResult:
    """The canary's labelled accuracy against the control's minus the allowed drop."""
    p = i.rollout.policy
    limit, need = p.thresholds.max_ground_truth_drop, p.thresholds.min_ground_truth_labels
    if limit is None:
        return GateResult(_NAME, "skipped", None, None, "disabled")
    canary = AccuracySummary.of(i.canary.confusion)
    control = AccuracySummary.of(i.control.confusion)
    if canary.accuracy is None:
        return GateResult(_NAME, "skipped", None, limit, "no labels")
    if not i.has_control:
        detail = f"no control group left (canary {canary})"
        return GateResult(_NAME, "skipped", None, limit, detail)
    if control.accuracy is None:
        detail = f"no labels on the control group (canary {canary})"
        return GateResult(_NAME, "skipped", None, limit, detail)
    if min(canary.n, control.n) < need:
        detail = f"ground truth: {canary.n}/{control.n} labelled (canary/control), need {need} each"
        return GateResult(_NAME, "waiting", None, limit, detail)
    drop = control.accuracy - canary.accuracy
    breach = one_sided_increase(
        canary.n - canary.correct, canary.n, control.n - control.correct, control.n, limit, p.z
    )
    detail = (
        f"accuracy {canary} on canary vs {control} on control: "
        f"{-drop * 100:+.2f} points, max -{limit * 100:.2f}"
    )
    if breach and i.canary.confusion is not None:
        flips = ", ".join(f"{t}->{q} x{n}" for t, q, n in i.canary.confusion.flips(3))
        detail += f"; canary confuses (true->predicted) {flips}"
    return GateResult(_NAME, "breach" if breach else "ok", -drop, limit, detail)


GATE: Final = Gate(
    name=_NAME,
    phase="quality",
    reads=("confusion",),
    statistic="one-sided two-proportion test of the labelled error rate over control",
    thresholds=("max_ground_truth_drop", "min_ground_truth_labels"),
    verdict=verdict,
)
