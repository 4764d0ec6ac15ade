"""Each model version's history of failure, derived from the rollout and quarantine tables.

Owns: ``VersionHistory`` (aborted rollouts, the quarantine, operators' overrides, for one
``(model, version)``) and ``version_history`` (one query per table, no table of its own: the
history is what the rollouts recorded). Shown by ``fleet-server models list|show`` and the
admin API's ``/v1/models``. Does not decide whether a version may be rolled out
(``fleet_server.rollouts.admission``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from fleet_server.registry.rollouts import QuarantineRecord
from fleet_server.registry.store import Registry
from fleet_server.registry.tables.rollouts import QuarantineRow, RolloutRow

__all__ = ["VersionHistory", "version_history"]


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


@dataclass(frozen=True)
class VersionHistory:
    """What went wrong with one model version before (empty: nothing did).

    Attributes:
        model: Model name.
        version: Model version.
        aborts: The aborted rollouts of it, oldest first: ``{"rollout", "at", "by"
            ("gate"|"operator"), "reasons"}``.
        quarantine: The quarantine entry, if the version is quarantined.
        overrides: Operators' reasons to roll it out anyway: ``{"rollout", "at", "kind",
            "reason"}``.
        rollouts: How many rollouts of it were created.
    """

    model: str
    version: int
    aborts: tuple[Mapping[str, Any], ...] = ()
    quarantine: QuarantineRecord | None = None
    overrides: tuple[Mapping[str, Any], ...] = ()
    rollouts: int = 0

    @property
    def status(self) -> str:
        """``quarantined``, ``aborted`` (at least once, not quarantined) or ``clean``."""
        if self.quarantine is not None:
            return "quarantined"
        return "aborted" if self.aborts else "clean"

    def summary(self) -> str:
        """One short line for tables: ``quarantined, aborted 2x, 1 override`` or ``-``."""
        parts = ["quarantined"] if self.quarantine is not None else []
        if self.aborts:
            parts.append(f"aborted {len(self.aborts)}x")
        if self.overrides:
            parts.append(f"{len(self.overrides)} override(s)")
        return ", ".join(parts) or "-"

    def to_dict(self) -> dict[str, Any]:
        q = self.quarantine
        return {
            "status": self.status,
            "summary": self.summary(),
            "rollouts": self.rollouts,
            "aborts": [dict(a) for a in self.aborts],
            "quarantine": None if q is None else {"reason": q.reason, "at": _iso(q.at)},
            "overrides": [dict(o) for o in self.overrides],
        }


def version_history(
    registry: Registry, model: str | None = None, version: int | None = None
) -> dict[tuple[str, int], VersionHistory]:
    """The history of every version that was rolled out or quarantined (of ``model``, and of
    ``version`` when given), by ``(model, version)``; versions never rolled out are absent.

    Raises:
        RegistryUnavailableError: the database failed.
    """
    rows = select(RolloutRow).order_by(RolloutRow.created_at, RolloutRow.id)
    quar = select(QuarantineRow)
    if model is not None:
        rows = rows.where(RolloutRow.model == model)
        quar = quar.where(QuarantineRow.model == model)
    if version is not None:
        rows = rows.where(RolloutRow.to_version == version)
        quar = quar.where(QuarantineRow.version == version)
    aborts: dict[tuple[str, int], list[dict[str, Any]]] = {}
    overrides: dict[tuple[str, int], list[dict[str, Any]]] = {}
    counts: dict[tuple[str, int], int] = {}
    with registry.read_session("reading version history") as s:
        for r in s.scalars(rows):
            key = (r.model, int(r.to_version))
            counts[key] = counts.get(key, 0) + 1
            doc = r.state_doc or {}
            for o in doc.get("overrides") or ():
                overrides.setdefault(key, []).append(
                    {"rollout": r.id, "at": _iso(r.created_at), **o}
                )
            if r.state == "aborted":
                aborts.setdefault(key, []).append(
                    {
                        "rollout": r.id,
                        "at": _iso(r.updated_at),
                        "by": "gate" if r.breached else "operator",
                        "reasons": list(doc.get("reasons") or ()),
                    }
                )
        quarantine = {
            (q.model, int(q.version)): QuarantineRecord(q.model, q.version, q.reason, q.at)
            for q in s.scalars(quar)
        }
    return {
        key: VersionHistory(
            key[0],
            key[1],
            tuple(aborts.get(key, ())),
            quarantine.get(key),
            tuple(overrides.get(key, ())),
            counts.get(key, 0),
        )
        for key in sorted({*counts, *quarantine})
    }
