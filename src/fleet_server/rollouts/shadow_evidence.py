"""What the shadow phase of a rollout knows: the canaries' live-vs-shadow answers (pure).

Owns ``ShadowEvidence`` (rows compared, rows agreeing and the flip matrix of one or more
devices' shadow of one version, plus the devices whose shadow failed to install; a monoid),
``shadow_evidence`` (one device's, built from its stored telemetry rows and reported state) and
``ShadowInputs`` (what the engine needs to run a shadow phase: who can take a shadow, whether
the candidate classifies, and each shadowed canary's evidence).

The device reports, per shadow version, cumulative counts while the shadow runs (the
``shadow_flips`` telemetry part; rows = live answer, columns = shadow answer). A window is the
sum of differences between consecutive reports received since the shadow was assigned; a
report whose counts went backwards, or that follows one without the version, counts from zero
(the shadow's counters start at zero when it starts, which is after its assignment).

Pure: no database, clock or network; the rollout runner passes the rows in. Does not own the
verdict (``fleet_server.rollouts.gates.shadow_disagreement``) nor the phase
(``fleet_server.rollouts.engine``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from edge_agent.errors import ContractError
from edge_agent.quality.confusion import Confusion
from edge_agent.trust.assignment import SHADOW_CAPABILITY
from fleet_server.rollouts.metrics import TelemetryRowLike

__all__ = ["ShadowEvidence", "ShadowInputs", "shadow_capable", "shadow_evidence"]


@dataclass(frozen=True)
class ShadowEvidence:
    """Live-vs-shadow comparisons of one candidate version on one or more devices.

    Attributes:
        compared: Rows answered by both the live model and the shadow.
        agree: Of those, rows where both gave the same class.
        flips: Rows by live class (row) and shadow class (column); None before any.
        devices: Devices that reported comparisons.
        installed: Devices whose reported state says the shadow runs.
        failed: Devices whose shadow failed to install or load, with why.
    """

    compared: int = 0
    agree: int = 0
    flips: Confusion | None = None
    devices: int = 0
    installed: int = 0
    failed: Mapping[str, str] = field(default_factory=dict)

    @property
    def disagreement(self) -> float | None:
        """Share of compared rows where the shadow answered another class (None before any)."""
        return None if self.compared == 0 else 1.0 - self.agree / self.compared

    def merge(self, other: ShadowEvidence) -> ShadowEvidence:
        """Both devices' (or windows') evidence; flip matrices of other sizes are not added."""
        flips = self.flips
        if other.flips is not None:
            if flips is None:
                flips = other.flips
            elif flips.n_classes == other.flips.n_classes:
                flips = flips.merge(other.flips)
        return ShadowEvidence(
            compared=self.compared + other.compared,
            agree=self.agree + other.agree,
            flips=flips,
            devices=self.devices + other.devices,
            installed=self.installed + other.installed,
            failed={**self.failed, **other.failed},
        )

    @classmethod
    def total(cls, items: Iterable[ShadowEvidence]) -> ShadowEvidence:
        """The merge of ``items``."""
        out = cls()
        for item in items:
            out = out.merge(item)
        return out

    def top_flips(self, top: int = 3) -> str:
        """The largest off-diagonal cells, ``"3 -> 8: 41, 5 -> 9: 3"`` ("" without any)."""
        if self.flips is None:
            return ""
        return ", ".join(f"{a} -> {b}: {n}" for a, b, n in self.flips.flips(top=top) if n > 0)


@dataclass(frozen=True)
class ShadowInputs:
    """What ``decide`` needs for a rollout's shadow phase.

    Attributes:
        capable: Targeted devices whose reported state lists the ``shadow`` capability.
        classification: The candidate is a classifier (its answers can be compared by class).
        devices: Per device given the shadow, its evidence since then.
    """

    capable: frozenset[str] = frozenset()
    classification: bool = False
    devices: Mapping[str, ShadowEvidence] = field(default_factory=dict)


def shadow_capable(reported: Mapping[str, object] | None) -> bool:
    """Whether a device's stored reported state lists the ``shadow`` capability (older agents
    do not: their strict desired-state parser would refuse a shadow assignment)."""
    caps = (reported or {}).get("capabilities")
    return isinstance(caps, list) and SHADOW_CAPABILITY in caps


def _entry(payload: Mapping[str, Any], model: str, version: int) -> tuple[int, int, Confusion]:
    """The cumulative (compared, agree, flips) of ``version`` in a report, zeros if absent.

    Raises:
        ContractError, KeyError, TypeError, ValueError: a malformed entry.
    """
    m = (payload.get("models") or {}).get(model) or {}
    part = m.get("shadow_flips") or {}
    for e in part.get("versions") or ():
        if e.get("version") == version:
            flips = Confusion.from_dict({"counts": e["counts"]})
            return int(e["compared"]), int(e["agree"]), flips
    raise KeyError(version)


def shadow_evidence(
    model: str,
    version: int,
    since: datetime,
    reported: Mapping[str, Any] | None,
    rows: Sequence[TelemetryRowLike],
) -> ShadowEvidence:
    """One device's evidence of ``model``'s shadow v``version`` from ``since`` on.

    Malformed rows and reported documents are skipped, never raised.
    """
    failed: dict[str, str] = {}
    installed = 0
    device = ""
    m = ((reported or {}).get("models") or {}).get(model) or {}
    shadow = m.get("shadow") if isinstance(m, Mapping) else None
    if isinstance(shadow, Mapping) and shadow.get("version") == version:
        device = str((reported or {}).get("device_id", ""))
        if shadow.get("outcome") == "failed":
            failed[device] = str(shadow.get("reason", ""))[:200]
        elif shadow.get("outcome") == "installed":
            installed = 1
    compared = agree = 0
    flips: Confusion | None = None
    prev: tuple[int, int, Confusion] | None = None
    for row in sorted((r for r in rows if r.kind == "report"), key=lambda r: r.seq):
        try:
            cur = _entry(row.payload, model, version)
        except (ContractError, KeyError, TypeError, ValueError, AttributeError):
            prev = None
            continue
        if row.received_at >= since:
            delta = cur
            if prev is not None and prev[2].n_classes == cur[2].n_classes:
                d = (cur[0] - prev[0], cur[1] - prev[1])
                cells = [
                    [a - b for a, b in zip(ra, rb, strict=True)]
                    for ra, rb in zip(cur[2].counts, prev[2].counts, strict=True)
                ]
                if min(*d, *(c for r in cells for c in r)) >= 0:
                    delta = (d[0], d[1], Confusion(tuple(tuple(r) for r in cells)))
            compared += delta[0]
            agree += delta[1]
            if flips is None or flips.n_classes != delta[2].n_classes:
                flips = delta[2]
            else:
                flips = flips.merge(delta[2])
        prev = cur
    return ShadowEvidence(
        compared=compared,
        agree=agree,
        flips=flips,
        devices=1 if compared else 0,
        installed=installed,
        failed=failed,
    )
