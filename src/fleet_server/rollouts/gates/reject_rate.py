"""The ``reject_rate`` gate (quality): requests refused by input validation, canary vs control.

Trips when the canary's reject rate (``rejected / requests``) exceeds the control group's by
more than ``max_reject_rate_increase`` by a one-sided two-proportion test; waits for
``min_requests`` per side (``fleet_server.rollouts.gates.rules.rate_increase``). Owns this
gate's definition only.
"""

from __future__ import annotations

from typing import Final

from fleet_server.rollouts.gates.base import Gate, GateInputs
from fleet_server.rollouts.gates.rules import rate_increase
from fleet_server.rollouts.state import GateResult

__all__ = ["GATE"]


def verdict(i: GateInputs) -> GateResult:
    """The canary's reject rate against the control's plus the allowed increase."""
    c, k = i.canary, i.control
    limit = i.rollout.policy.thresholds.max_reject_rate_increase
    return rate_increase(
        i, "reject_rate", (c.rejected, c.requests), (k.rejected, k.requests), limit
    )


GATE: Final = Gate(
    name="reject_rate",
    phase="quality",
    reads=("rejected", "requests"),
    statistic="one-sided two-proportion test of the increase over control",
    thresholds=("max_reject_rate_increase",),
    verdict=verdict,
)
