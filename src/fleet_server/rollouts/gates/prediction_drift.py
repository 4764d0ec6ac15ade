"""The ``prediction_drift`` gate (quality): the canary's output drift windows that alert.

Trips when the Wilson lower bound of the share of the canary's closed output-drift windows whose
calibrated verdict alerted exceeds ``max_drift_alert_share``; skipped while no output window was
reported. Owns this gate's definition only.
"""

from __future__ import annotations

from typing import Final

from edge_agent.quality.confusion import wilson_interval
from fleet_server.rollouts.gates.base import Gate, GateInputs
from fleet_server.rollouts.state import GateResult

__all__ = ["GATE"]

_NAME: Final = "prediction_drift"


def verdict(i: GateInputs) -> GateResult:
    """The canary's alerting share of output drift windows against its maximum."""
    m, p = i.canary, i.rollout.policy
    limit = p.thresholds.max_drift_alert_share
    if limit is None:
        return GateResult(_NAME, "skipped", None, None, "disabled")
    if m.drift_windows == 0:
        return GateResult(_NAME, "skipped", None, limit, "no output drift windows reported")
    share = m.drift_alerts / m.drift_windows
    lo, _ = wilson_interval(m.drift_alerts, m.drift_windows, p.z)
    psi = "-" if m.max_psi is None else f"{m.max_psi:.3f}"
    detail = (
        f"{m.drift_alerts}/{m.drift_windows} output windows alerting ({share:.1%}, lower bound "
        f"{lo:.1%}; max PSI {psi}) vs max {limit:.1%}"
    )
    return GateResult(_NAME, "breach" if lo > limit else "ok", share, limit, detail)


GATE: Final = Gate(
    name=_NAME,
    phase="quality",
    reads=("drift_windows", "drift_alerts", "max_psi"),
    statistic="Wilson lower bound of the canary's alerting share",
    thresholds=("max_drift_alert_share",),
    verdict=verdict,
)
