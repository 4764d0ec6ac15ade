"""The ``agent_reporting`` gate (quality, agent releases): every member's new agent reports.

A rollout of an agent release (``Rollout.agent``) moves on only once *every* member of the
rollout that neither failed nor went back (nor was accepted so by an operator) reports on the
new release: its reported state names the release and the new agent process has sent at least
two telemetry reports (``rollouts.agent_observation``: one counted interval). This is the
heartbeat after the switch. A model rollout needs ``min_devices`` reporting members; an agent
that does not come back takes the device's whole fleet link with it, so one silent member holds
the wave (``waiting``, naming it) until it reports, its launcher returns it (a rollback the
safety gates count) or the operator acts. Owns this gate's definition only.
"""

from __future__ import annotations

from typing import Final

from fleet_server.rollouts.gates.base import Gate, GateInputs
from fleet_server.rollouts.state import GateResult

__all__ = ["GATE"]

_NAME: Final = "agent_reporting"
#: Silent members named in the verdict's detail.
_SHOWN: Final = 5


def verdict(i: GateInputs) -> GateResult:
    """``ok`` when every counted member reports on the new release, else ``waiting``."""
    r = i.rollout
    excluded = {*r.failed, *r.rolled_back, *r.acknowledged}
    counted = [d for d in r.members if d not in excluded and d not in r.held]
    silent = sorted(d for d in counted if d not in i.devices or not i.devices[d].reporting)
    done = len(counted) - len(silent)
    if silent:
        names = ", ".join(silent[:_SHOWN]) + (" ..." if len(silent) > _SHOWN else "")
        msg = f"{len(silent)} member(s) not yet reporting on agent release {r.to_version}: {names}"
        return GateResult(_NAME, "waiting", done, len(counted), msg)
    msg = f"all {done} member(s) report on agent release {r.to_version}"
    return GateResult(_NAME, "ok", done, len(counted), msg)


GATE: Final = Gate(
    name=_NAME,
    phase="quality",
    reads=("members", "failed", "rolled_back", "acknowledged", "held", "reports"),
    statistic="every member not failed or rolled back has a counted report interval",
    thresholds=(),
    verdict=verdict,
)
