"""The ``shadow_agreement`` gate (quality): rows on which the canary agrees with its shadow.

Trips when the Wilson upper bound of the canary's shadow agreement is below
``min_shadow_agreement`` (off by default); skipped while no shadow comparison was reported.
Owns this gate's definition only.
"""

from __future__ import annotations

from typing import Final

from edge_agent.quality.confusion import wilson_interval
from fleet_server.rollouts.gates.base import Gate, GateInputs
from fleet_server.rollouts.state import GateResult

__all__ = ["GATE"]

_NAME: Final = "shadow_agreement"


def verdict(i: GateInputs) -> GateResult:
    """The canary's shadow agreement against its minimum."""
    m, p = i.canary, i.rollout.policy
    limit = p.thresholds.min_shadow_agreement
    if limit is None:
        return GateResult(_NAME, "skipped", None, None, "disabled")
    if m.shadow_compared == 0:
        return GateResult(_NAME, "skipped", None, limit, "no shadow comparisons reported")
    share = m.shadow_agree / m.shadow_compared
    _, hi = wilson_interval(m.shadow_agree, m.shadow_compared, p.z)
    detail = (
        f"{m.shadow_agree}/{m.shadow_compared} rows agree ({share:.1%}, upper bound {hi:.1%}) "
        f"vs min {limit:.1%}"
    )
    return GateResult(_NAME, "breach" if hi < limit else "ok", share, limit, detail)


GATE: Final = Gate(
    name=_NAME,
    phase="quality",
    reads=("shadow_compared", "shadow_agree"),
    statistic="Wilson upper bound of the canary's agreement",
    thresholds=("min_shadow_agreement",),
    verdict=verdict,
)
