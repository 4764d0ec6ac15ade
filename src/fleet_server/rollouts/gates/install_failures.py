"""The ``install_failures`` gate (safety): members that failed to install the new version.

Judged at every step. Trips when the failures are certain to put the wave above
``max_install_failure_rate`` (at least two, or every member) or when the Wilson lower bound of
the failure rate among the members that finished installing exceeds it
(``fleet_server.rollouts.gates.rules.member_share``). Owns this gate's definition only.
"""

from __future__ import annotations

from typing import Final

from fleet_server.rollouts.gates.base import Gate, GateInputs
from fleet_server.rollouts.gates.rules import member_share
from fleet_server.rollouts.state import GateResult

__all__ = ["GATE"]


def verdict(i: GateInputs) -> GateResult:
    """The install-failure share of the wave's members against its maximum."""
    limit = i.rollout.policy.thresholds.max_install_failure_rate
    return member_share(i, "install_failures", i.rollout.failed, limit)


GATE: Final = Gate(
    name="install_failures",
    phase="safety",
    reads=("members", "failed", "acknowledged", "active_version"),
    statistic="share of members; certain (>= 2, or all) or Wilson lower bound of finished",
    thresholds=("max_install_failure_rate",),
    verdict=verdict,
)
