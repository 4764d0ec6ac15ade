"""What a rollout gate is and what it reads: ``Gate``, ``GateInputs`` and the inputs' builders.

A gate is one value, ``Gate``: its name, its phase (``safety``: judged at every step;
``quality``: judged after the dwell time, canary against control; ``shadow``: judged after the
shadow phase's dwell, the canaries' live answers against their shadow's), the fields it reads, the
statistic it applies, the ``Thresholds`` fields it takes from the policy and its verdict, a pure
function of ``GateInputs`` to a ``GateResult``. The engine runs every registered gate
(``fleet_server.rollouts.gates.GATES``) of a phase and acts on the verdicts; it knows no gate
by name.

Owns the gate type, the inputs every gate gets and how they are built from the observations
(``safety_inputs``, ``quality_inputs``; the latter may answer with the ``reporting`` wait
instead: too few reporting devices to compare). Does not own any verdict (one module per gate
in this package) nor what a breach leads to (``fleet_server.rollouts.engine``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from fleet_server.rollouts.metrics import DeviceObservation, OutputMoments, WindowMetrics
from fleet_server.rollouts.shadow_evidence import ShadowEvidence
from fleet_server.rollouts.state import GateResult, Rollout

__all__ = [
    "PHASES",
    "Gate",
    "GateInputs",
    "Phase",
    "Verdict",
    "quality_inputs",
    "safety_inputs",
]

Phase = Literal["safety", "shadow", "quality"]
#: In the order a rollout meets them (``safety`` at every step).
PHASES: Final[tuple[Phase, ...]] = ("safety", "shadow", "quality")


@dataclass(frozen=True)
class GateInputs:
    """Everything a gate may read, for one step of one rollout.

    Attributes:
        rollout: The rollout now: its policy (``rollout.policy.thresholds``, ``z``,
            ``min_devices``, ``min_requests``), members, failed and rolled-back devices.
        devices: The targeted devices' observations by id.
        canary: Window metrics summed over the reporting canary members (quality phase; zero
            in the safety phase).
        control: The same over the reporting control group (devices still on
            ``from_version``).
        has_control: Enough control devices are left to compare with (quality phase).
        canary_outputs: Output moments merged over the reporting canary members.
        control_outputs: The same over the reporting control group.
        before_outputs: The canary members' ``from_version`` output moments before they
            switched.
        before: The canary members' ``from_version`` window metrics over the same range.
        shadow: The shadowed canaries' live-vs-shadow evidence, merged (shadow phase).
    """

    rollout: Rollout
    devices: Mapping[str, DeviceObservation]
    canary: WindowMetrics = field(default_factory=WindowMetrics)
    control: WindowMetrics = field(default_factory=WindowMetrics)
    has_control: bool = False
    canary_outputs: OutputMoments = field(default_factory=OutputMoments)
    control_outputs: OutputMoments = field(default_factory=OutputMoments)
    before_outputs: OutputMoments = field(default_factory=OutputMoments)
    before: WindowMetrics = field(default_factory=WindowMetrics)
    shadow: ShadowEvidence = field(default_factory=ShadowEvidence)


Verdict = Callable[[GateInputs], GateResult]


@dataclass(frozen=True)
class Gate:
    """One rollout gate, registered in ``fleet_server.rollouts.gates.GATES``.

    Attributes:
        name: The name its ``GateResult`` carries (unique; shown by ``rollouts watch``).
        phase: ``safety`` (every step), ``quality`` (after the dwell, canary vs control) or
            ``shadow`` (after the shadow phase's dwell, live vs shadow on the canaries).
        reads: The ``WindowMetrics`` or ``Rollout`` fields it reads (documentation, checked by
            the registry's tests).
        statistic: One line: the test it applies.
        thresholds: The ``Thresholds`` fields it reads from the policy.
        verdict: The pure judgement: ``GateInputs`` in, a ``GateResult`` with this ``name``
            out (``ok``, ``breach``, ``waiting`` for too little data, or ``skipped``).
    """

    name: str
    phase: Phase
    reads: tuple[str, ...]
    statistic: str
    thresholds: tuple[str, ...]
    verdict: Verdict


def safety_inputs(r: Rollout, by_id: Mapping[str, DeviceObservation]) -> GateInputs:
    """The safety phase's inputs: the rollout and its devices."""
    return GateInputs(r, by_id)


def quality_inputs(
    r: Rollout, by_id: Mapping[str, DeviceObservation], order: Sequence[str]
) -> GateInputs | GateResult:
    """The quality phase's inputs, or the ``reporting`` wait when too few devices report.

    The canary is the members that neither failed nor rolled back (nor were accepted so by an
    operator); the control group is the targets outside the rollout still on
    ``from_version``. Each side needs ``min_devices`` reporting devices (a wave smaller than
    that, all of its members); a control group smaller than that is no control group.
    """
    p = r.policy
    excluded = {*r.failed, *r.rolled_back, *r.acknowledged}
    canary = [by_id[d] for d in r.members if d in by_id and d not in excluded]
    control = [by_id[d] for d in order if d not in r.members]
    control = [o for o in control if o.active_version == r.from_version]
    # A wave smaller than min_devices (tiny fleets, members that failed) needs all of it.
    need = max(1, min(p.min_devices, len(canary)))
    c_rep = [o for o in canary if o.reporting]
    k_rep = [o for o in control if o.reporting]
    if len(c_rep) < need:
        msg = f"{len(c_rep)}/{need} canary devices reporting on v{r.to_version}"
        return GateResult("reporting", "waiting", len(c_rep), need, msg)
    need = min(p.min_devices, len(order))
    has_control = len(control) >= need
    if has_control and len(k_rep) < need:
        msg = f"{len(k_rep)}/{need} control devices reporting on v{r.from_version}"
        return GateResult("reporting", "waiting", len(k_rep), need, msg)
    return GateInputs(
        rollout=r,
        devices=by_id,
        canary=WindowMetrics.total(o.metrics for o in c_rep),
        control=WindowMetrics.total(o.metrics for o in k_rep),
        has_control=has_control,
        canary_outputs=OutputMoments.total(o.outputs for o in c_rep),
        control_outputs=OutputMoments.total(o.outputs for o in k_rep),
        before_outputs=OutputMoments.total(o.outputs_before for o in canary),
        before=WindowMetrics.total(o.metrics_before for o in canary),
    )
