"""Rollout state: the persisted ``Rollout``, its gates' verdicts and a step's ``Decision`` (pure).

Owns the state names (``STATES``, ``ACTIVE_STATES``), ``GateResult`` (one gate's verdict, kept
in the rollout), ``Rollout`` (a rollout's whole state; ``fleet_server.registry.rollouts``
stores it as JSON) and ``Decision`` (what one step of ``decide`` asks the runner to do). These
are the types both the gates and the engine read, below both: the state machine itself is
``fleet_server.rollouts.engine``'s, the verdicts ``fleet_server.rollouts.gates``'.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from fleet_server.rollouts.admission import Override
from fleet_server.rollouts.policy import RolloutPolicy, Selector

__all__ = ["ACTIVE_STATES", "STATES", "Decision", "GateResult", "Rollout"]

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
class Rollout:
    """A rollout's whole state (see ``fleet_server.rollouts.engine`` for its state machine).

    ``members`` maps each device the rollout assigned ``to_version`` to when it did;
    ``failed``/``rolled_back`` are members that failed to install or went back on their own;
    ``acknowledged`` are those an operator's resume accepted (no longer counted by the gates);
    ``reverted`` are devices the rollout sent back to ``from_version``; ``overrides`` are
    the operator's recorded reasons to roll out a quarantined or earlier aborted version.
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

    @property
    def active(self) -> bool:
        """Still moving (not paused, completed or aborted)."""
        return self.state in ACTIVE_STATES


@dataclass(frozen=True)
class Decision:
    """What to do now: assign ``assign`` to ``to_version``, ``revert`` to ``from_version``."""

    rollout: Rollout
    assign: tuple[str, ...] = ()
    revert: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    quarantine: bool = False
