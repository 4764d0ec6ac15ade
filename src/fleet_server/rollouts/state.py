"""Rollout state: the persisted ``Rollout``, its gates' verdicts and a step's ``Decision`` (pure).

Owns the state names (``STATES``, ``ACTIVE_STATES``), ``GateResult`` (one gate's verdict, kept
in the rollout), ``OfflineCheck`` (the champion-vs-challenger comparison on a registered
evaluation set made before the rollout was admitted), ``Rollout`` (a rollout's whole state;
``fleet_server.registry.rollouts`` stores it as JSON) and ``Decision`` (what one step of
``decide`` asks the runner to do). These are the types both the gates and the engine read,
below both: the state machine itself is ``fleet_server.rollouts.engine``'s, the verdicts
``fleet_server.rollouts.gates``'.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from fleet_server.rollouts.admission import Override
from fleet_server.rollouts.policy import RolloutPolicy, Selector

__all__ = [
    "ACTIVE_STATES",
    "AGENT_ROLLOUT",
    "OFFLINE_VERDICTS",
    "PHASES",
    "STATES",
    "Decision",
    "GateResult",
    "OfflineCheck",
    "Rollout",
]

STATES: Final = (
    "pending",
    "dwelling",
    "judging",
    "awaiting_approval",
    "paused",
    "completed",
    "aborted",
)
ACTIVE_STATES: Final = frozenset({"pending", "dwelling", "judging", "awaiting_approval"})
#: The ``Rollout.model`` of a rollout of the agent's own software (its versions are agent
#: release numbers). Never a model name: those are ``[a-z0-9._-]`` only
#: (``edge_agent.ids.validate_name``), so quarantine and abort counts keyed by name stay apart.
AGENT_ROLLOUT: Final = "agent:edgefleet"
#: ``shadow``: the canaries run the candidate as a shadow (installed, not serving) and only
#: the shadow gates are judged; ``serving``: the waves serve it (every rollout ends here).
PHASES: Final = ("shadow", "serving")

#: What the offline comparison said when the rollout was created: ``passed`` (no regression
#: beyond the policy's offline limits), ``overridden`` (it regressed and an operator went ahead
#: with a recorded reason), ``no_eval_set`` (no evaluation set registered for the model),
#: ``no_champion`` (nothing to compare with: a first rollout) and ``disabled`` (the policy
#: turns the check off).
OFFLINE_VERDICTS: Final = ("passed", "overridden", "no_eval_set", "no_champion", "disabled")


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict: ``ok``, ``breach``, ``waiting`` (too little data) or ``skipped``."""

    name: str
    status: str
    measured: float | None
    threshold: float | None
    detail: str

    def to_dict(self) -> dict[str, object]:
        """JSON-safe dict."""
        return {k: getattr(self, k) for k in ("name", "status", "measured", "threshold", "detail")}


@dataclass(frozen=True)
class OfflineCheck:
    """The offline comparison made when the rollout was admitted (kept in the rollout).

    Attributes:
        verdict: One of ``OFFLINE_VERDICTS``.
        eval_set: The evaluation set's sha256 (hex), "" when none was used.
        n: Labelled samples compared (0 when none).
        disagreement: Share of those samples the two versions answer differently, None when
            nothing was compared (the shadow phase compares the field's disagreement with it).
        reasons: Why the candidate regressed (set when ``overridden``).
        notes: What could not be judged (classes with too few samples, a small set).
        comparison: ``edge_agent.quality.compare.ModelComparison.to_dict()``, or None.
        override: The operator's recorded reason to go ahead (``overridden`` only).
    """

    verdict: str
    eval_set: str = ""
    n: int = 0
    disagreement: float | None = None
    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    comparison: Mapping[str, Any] | None = None
    override: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (stored in the rollout, returned by the admin API)."""
        return {
            "verdict": self.verdict,
            "eval_set": self.eval_set,
            "n": self.n,
            "disagreement": self.disagreement,
            "reasons": list(self.reasons),
            "notes": list(self.notes),
            "comparison": None if self.comparison is None else dict(self.comparison),
            "override": self.override,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OfflineCheck:
        """Parse ``to_dict``'s output (a stored rollout; missing keys take defaults).

        Raises:
            KeyError, ValueError, TypeError: not a stored offline check.
        """
        verdict = str(d["verdict"])
        if verdict not in OFFLINE_VERDICTS:
            raise ValueError(f"unknown offline verdict {verdict!r}")
        dis = d.get("disagreement")
        comparison = d.get("comparison")
        return cls(
            verdict=verdict,
            eval_set=str(d.get("eval_set", "")),
            n=int(d.get("n", 0)),
            disagreement=None if dis is None else float(dis),
            reasons=tuple(str(r) for r in d.get("reasons", ())),
            notes=tuple(str(r) for r in d.get("notes", ())),
            comparison=None if comparison is None else dict(comparison),
            override=str(d.get("override", "")),
        )


@dataclass(frozen=True)
class Rollout:
    """A rollout's whole state (see ``fleet_server.rollouts.engine`` for its state machine).

    ``members`` maps each device the rollout assigned ``to_version`` to when it did;
    ``failed``/``rolled_back`` are members that failed to install or went back on their own;
    ``acknowledged`` are those an operator's resume accepted (no longer counted by the gates);
    ``reverted`` are devices the rollout sent back to ``from_version``; ``overrides`` are
    the operator's recorded reasons to roll out a quarantined or earlier aborted version;
    ``offline`` is the offline comparison made when it was created (None for rollouts created
    before the check existed). ``phase`` is ``shadow`` while the canaries run the candidate as
    a shadow (``shadows``: the canaries sent it, and when; none of them serves it yet), then
    ``serving``. A rollout of the agent's own software has ``model`` ``AGENT_ROLLOUT`` and
    agent release numbers as versions (``from_version`` None: the base install). ``held``
    are members whose assignment is not sent yet, with why
    (``window``: outside their maintenance window; ``budget``: the disruption budget of their
    label value is full); with a disruption budget, ``released`` says when each member the
    budget still counts was sent its assignment and ``settling`` when the server first saw it
    serve the version (counted until ``settle_seconds`` after that;
    ``fleet_server.rollouts.holds``).
    """

    id: str
    model: str
    from_version: int | None
    to_version: int
    selector: Selector
    policy: RolloutPolicy
    created_at: datetime
    state: str = "pending"
    wave: int = -1
    started_at: datetime | None = None
    wave_started_at: datetime | None = None
    updated_at: datetime | None = None
    members: Mapping[str, datetime] = field(default_factory=dict)
    failed: tuple[str, ...] = ()
    rolled_back: tuple[str, ...] = ()
    acknowledged: tuple[str, ...] = ()
    reverted: tuple[str, ...] = ()
    approved_wave: int = -1
    breached: bool = False
    gates: tuple[GateResult, ...] = ()
    reasons: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = ()
    offline: OfflineCheck | None = None
    phase: str = "serving"
    shadows: Mapping[str, datetime] = field(default_factory=dict)
    held: Mapping[str, str] = field(default_factory=dict)
    released: Mapping[str, datetime] = field(default_factory=dict)
    settling: Mapping[str, datetime] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Still moving (not paused, completed or aborted)."""
        return self.state in ACTIVE_STATES

    @property
    def agent(self) -> bool:
        """A rollout of an agent release (``AGENT_ROLLOUT``), not of a model."""
        return self.model == AGENT_ROLLOUT


@dataclass(frozen=True)
class Decision:
    """What to do now: assign ``assign`` to ``to_version``, ``revert`` to ``from_version``,
    and ``shadow`` ``from_version`` serving with ``to_version`` as its shadow (the shadow phase;
    a later assignment of either kind ends the shadow)."""

    rollout: Rollout
    assign: tuple[str, ...] = ()
    revert: tuple[str, ...] = ()
    shadow: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    quarantine: bool = False
