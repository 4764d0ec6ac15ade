"""The ``fallback_rate`` gate (quality): requests answered by the cloud, canary vs control.

Trips when the canary's share of answers from cloud fallback (``cloud / (cloud + device)``)
exceeds the control group's by more than ``max_fallback_rate_increase`` by a one-sided
two-proportion test; waits for ``min_requests`` answers per side
(``fleet_server.rollouts.gates.rules.rate_increase``). Owns this gate's definition only.
"""

from __future__ import annotations

from typing import Final

from fleet_server.rollouts.gates.base import Gate, GateInputs
from fleet_server.rollouts.gates.rules import rate_increase
from fleet_server.rollouts.state import GateResult

__all__ = ["GATE"]


def verdict(i: GateInputs) -> GateResult:
    """The canary's cloud-answer share against the control's plus the allowed increase."""
    c, k = i.canary, i.control
    limit = i.rollout.policy.thresholds.max_fallback_rate_increase
    canary = (c.cloud_answers, c.cloud_answers + c.device_answers)
    control = (k.cloud_answers, k.cloud_answers + k.device_answers)
    return rate_increase(i, "fallback_rate", canary, control, limit)


GATE: Final = Gate(
    name="fallback_rate",
    phase="quality",
    reads=("cloud_answers", "device_answers"),
    statistic="one-sided two-proportion test of the increase over control",
    thresholds=("max_fallback_rate_increase",),
    verdict=verdict,
)
