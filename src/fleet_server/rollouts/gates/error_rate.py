"""The ``error_rate`` gate (quality): requests that failed on the canary vs on the control group.

The share of failed requests (``errors / requests``; the agents' ``outcomes.error`` counter,
cumulative in every report and differenced into ``WindowMetrics.errors``) on the canary against
the control group's, by the same one-sided two-proportion test as the reject rate
(``fleet_server.rollouts.gates.rules.rate_increase``): it trips when the increase is above
``max_error_rate_increase`` (1 point by default) with confidence, and only once the canary has
at least ``MIN_ERRORS`` failed requests, so a handful of failures on a tiny sample never halts a
wave.

Unlike the reject-rate gate it never holds a rollout for traffic: with fewer than
``min_requests`` requests on a side it reports ``skipped`` (with the counts), not
``waiting``. A policy that turned off every traffic-based gate (a fleet without traffic during
the rollout) keeps moving as it did before this gate existed; with traffic, the gate judges at
the same moment as the reject-rate gate, whose evidence is the same requests.

Owns this gate's definition only.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Final

from fleet_server.rollouts.gates.base import Gate, GateInputs
from fleet_server.rollouts.gates.rules import rate_increase
from fleet_server.rollouts.state import GateResult

__all__ = ["GATE", "MIN_ERRORS"]

#: Failed canary requests needed before the gate may trip.
MIN_ERRORS: Final = 5


def verdict(i: GateInputs) -> GateResult:
    """The canary's failed-request rate against the control's plus the allowed increase."""
    c, k = i.canary, i.control
    limit = i.rollout.policy.thresholds.max_error_rate_increase
    g = rate_increase(
        i, "error_rate", (c.errors, c.requests), (k.errors, k.requests), limit, min_count=MIN_ERRORS
    )
    # Too few requests: judged later if traffic comes, but never a reason to wait.
    return replace(g, status="skipped") if g.status == "waiting" else g


GATE: Final = Gate(
    name="error_rate",
    phase="quality",
    reads=("errors", "requests"),
    statistic=f"one-sided two-proportion test of the increase over control, >= {MIN_ERRORS} errors",
    thresholds=("max_error_rate_increase",),
    verdict=verdict,
)
