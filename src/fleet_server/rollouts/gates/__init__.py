"""Rollout gates: one module per gate, and the registry the engine runs (``GATES``).

A gate is a ``Gate`` value (``fleet_server.rollouts.gates.base``): name, phase, the fields it
reads, its statistic, the ``Thresholds`` fields it takes from the policy and its verdict, a pure
function of ``GateInputs`` to a ``GateResult``. ``fleet_server.rollouts.engine.decide`` runs the
registered gates of the ``safety`` phase at every step and those of the ``quality`` phase after
the dwell time, in this order, and acts on the verdicts without knowing any gate by name.

Adding a gate: one module here defining ``GATE`` (``error_rate`` is the smallest example), one
line in ``GATES`` below, its threshold as one field of ``fleet_server.rollouts.policy.Thresholds``,
and its tests (docs/rollouts.md, "Adding a gate").

Owns the registry and re-exports the names the gates' users need; each verdict is its module's.
"""

from __future__ import annotations

from typing import Final

from fleet_server.rollouts.gates import (
    agent_reporting,
    device_rollbacks,
    error_rate,
    fallback_rate,
    ground_truth,
    install_failures,
    output_distribution,
    p99_latency,
    prediction_drift,
    reject_rate,
    shadow_agreement,
    shadow_disagreement,
)
from fleet_server.rollouts.gates.base import Gate, GateInputs, quality_inputs, safety_inputs
from fleet_server.rollouts.gates.p99_latency import histogram_quantile_ms, latency_histograms
from fleet_server.rollouts.state import GateResult

__all__ = [
    "AGENT_GATES",
    "GATES",
    "Gate",
    "GateInputs",
    "GateResult",
    "histogram_quantile_ms",
    "latency_histograms",
    "quality_inputs",
    "safety_inputs",
]

#: Every gate the engine runs, in the order their verdicts are reported.
GATES: Final[tuple[Gate, ...]] = (
    install_failures.GATE,
    device_rollbacks.GATE,
    shadow_disagreement.GATE,
    reject_rate.GATE,
    fallback_rate.GATE,
    prediction_drift.GATE,
    output_distribution.GATE,
    shadow_agreement.GATE,
    p99_latency.GATE,
    ground_truth.GATE,
    error_rate.GATE,
)

#: The gates of an agent release's rollout (``Rollout.agent``): the members' install failures
#: and their launchers' returns at every step, then, after the dwell, every member's new agent
#: reporting (``agent_reporting``: the heartbeat after the switch) and the error rate and p99
#: latency of every model the members serve against the control group's. The
#: model-quality gates (rejects, fallback, drift, outputs, shadow, ground truth) judge a model
#: version and do not apply.
AGENT_GATES: Final[tuple[Gate, ...]] = (
    install_failures.GATE,
    device_rollbacks.GATE,
    agent_reporting.GATE,
    p99_latency.GATE,
    error_rate.GATE,
)
