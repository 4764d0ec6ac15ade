"""The ``device_rollbacks`` gate (safety): members that went back to the old version by themselves.

Judged at every step; a rollback counts the moment the device reports it. The same rule as
``install_failures`` against ``max_rollback_rate``
(``fleet_server.rollouts.gates.rules.member_share``). Owns this gate's definition only.
"""

from __future__ import annotations

from typing import Final

from fleet_server.rollouts.gates.base import Gate, GateInputs
from fleet_server.rollouts.gates.rules import member_share
from fleet_server.rollouts.state import GateResult

__all__ = ["GATE"]


def verdict(i: GateInputs) -> GateResult:
    """The device-rollback share of the wave's members against its maximum."""
    limit = i.rollout.policy.thresholds.max_rollback_rate
    return member_share(i, "device_rollbacks", i.rollout.rolled_back, limit)


GATE: Final = Gate(
    name="device_rollbacks",
    phase="safety",
    reads=("members", "rolled_back", "acknowledged", "active_version"),
    statistic="share of members; certain (>= 2, or all) or Wilson lower bound of finished",
    thresholds=("max_rollback_rate",),
    verdict=verdict,
)
