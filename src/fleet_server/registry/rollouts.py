"""Rollout persistence: rollouts, their event log, quarantined versions.

Owns: the queries and transactions on the tables of ``tables.rollouts`` and the JSON form of a
``fleet_server.rollouts.state.Rollout`` (``rollout_to_dict``/``rollout_from_dict``, also the
admin API's shape). Each function takes the ``Registry`` and runs in one of its transactions;
database failures raise ``RegistryUnavailableError`` like every registry call. Does not decide
anything (``fleet_server.rollouts.engine``), run the engine (``fleet_server.jobs.rollout_runner``)
or read the telemetry a rollout judges (``fleet_server.history.rollouts.rollout_inputs``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from fleet_server.errors import RegistryError, RolloutConflictError, UnknownRolloutError
from fleet_server.registry.store import Registry
from fleet_server.registry.tables.rollouts import QuarantineRow, RolloutEventRow, RolloutRow
from fleet_server.rollouts.admission import Override
from fleet_server.rollouts.label_selector import LabelSelector
from fleet_server.rollouts.policy import RolloutPolicy, Selector
from fleet_server.rollouts.state import GateResult, OfflineCheck, Rollout

__all__ = [
    "QuarantineRecord",
    "RolloutEvent",
    "abort_count",
    "breach_aborts",
    "create_rollout",
    "get_rollout",
    "list_quarantine",
    "list_rollouts",
    "quarantine_reason",
    "quarantine_version",
    "quarantined",
    "rollout_events",
    "rollout_from_dict",
    "rollout_to_dict",
    "save_rollout",
]


@dataclass(frozen=True)
class RolloutEvent:
    """One entry of a rollout's event log."""

    id: int
    rollout_id: str
    at: datetime
    kind: str
    detail: Mapping[str, Any]


@dataclass(frozen=True)
class QuarantineRecord:
    """A quarantined model version."""

    model: str
    version: int
    reason: str
    at: datetime


# --------------------------------------------------------------------------- codec
def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def _time(v: Any) -> datetime | None:
    return None if v is None else datetime.fromisoformat(str(v))


def rollout_to_dict(r: Rollout) -> dict[str, Any]:
    """A rollout as JSON-safe dict (stored, and returned by the admin API)."""
    # ``offline`` is left out when None: a rollout stored before the check existed reads back
    # and compares (``save_rollout``'s ``read``) equal to its stored document.
    out: dict[str, Any] = {
        "id": r.id,
        "model": r.model,
        "from_version": r.from_version,
        "to_version": r.to_version,
        "selector": r.selector.to_dict(),
        "policy": r.policy.to_dict(),
        "created_at": _iso(r.created_at),
        "state": r.state,
        "wave": r.wave,
        "started_at": _iso(r.started_at),
        "wave_started_at": _iso(r.wave_started_at),
        "updated_at": _iso(r.updated_at),
        "members": {d: _iso(t) for d, t in sorted(r.members.items())},
        "failed": list(r.failed),
        "rolled_back": list(r.rolled_back),
        "acknowledged": list(r.acknowledged),
        "reverted": list(r.reverted),
        "approved_wave": r.approved_wave,
        "breached": r.breached,
        "gates": [g.to_dict() for g in r.gates],
        "reasons": list(r.reasons),
        "overrides": [o.to_dict() for o in r.overrides],
    }
    if r.offline is not None:
        out["offline"] = r.offline.to_dict()
    if r.phase != "serving" or r.shadows:  # absent for rollouts without a shadow phase
        out["phase"] = r.phase
        out["shadows"] = {d: _iso(t) for d, t in sorted(r.shadows.items())}
    if r.held or r.released or r.settling:  # absent for rollouts that never held or budgeted
        out["held"] = dict(sorted(r.held.items()))
        out["released"] = {d: _iso(t) for d, t in sorted(r.released.items())}
        out["settling"] = {d: _iso(t) for d, t in sorted(r.settling.items())}
    return out


def rollout_from_dict(d: Mapping[str, Any]) -> Rollout:
    """Parse ``rollout_to_dict``'s output.

    Raises:
        RolloutPolicyError: the stored policy or selector is invalid.
        SelectorSyntaxError: the stored label selector does not parse.
        KeyError, ValueError: the document is not a stored rollout.
    """
    created = _time(d["created_at"])
    assert created is not None
    sel = d["selector"]
    return Rollout(
        id=str(d["id"]),
        model=str(d["model"]),
        from_version=d.get("from_version"),
        to_version=int(d["to_version"]),
        selector=Selector(
            group=sel.get("group"),
            tags=dict(sel.get("tags") or {}),
            labels=None if sel.get("labels") is None else LabelSelector.parse(sel["labels"]),
        ),
        policy=RolloutPolicy.from_dict(d["policy"]),
        created_at=created,
        state=str(d["state"]),
        wave=int(d["wave"]),
        started_at=_time(d.get("started_at")),
        wave_started_at=_time(d.get("wave_started_at")),
        updated_at=_time(d.get("updated_at")),
        members={k: t for k, v in d.get("members", {}).items() if (t := _time(v)) is not None},
        failed=tuple(d.get("failed", ())),
        rolled_back=tuple(d.get("rolled_back", ())),
        acknowledged=tuple(d.get("acknowledged", ())),
        reverted=tuple(d.get("reverted", ())),
        approved_wave=int(d.get("approved_wave", -1)),
        breached=bool(d.get("breached", False)),
        gates=tuple(GateResult(**g) for g in d.get("gates", ())),
        reasons=tuple(d.get("reasons", ())),
        overrides=tuple(Override(str(o["kind"]), str(o["reason"])) for o in d.get("overrides", ())),
        offline=None if d.get("offline") is None else OfflineCheck.from_dict(d["offline"]),
        phase=str(d.get("phase", "serving")),
        shadows={k: t for k, v in d.get("shadows", {}).items() if (t := _time(v)) is not None},
        held={str(k): str(v) for k, v in d.get("held", {}).items()},
        released={k: t for k, v in d.get("released", {}).items() if (t := _time(v)) is not None},
        settling={k: t for k, v in d.get("settling", {}).items() if (t := _time(v)) is not None},
    )


# --------------------------------------------------------------------------- rollouts
def create_rollout(registry: Registry, rollout: Rollout, at: datetime) -> Rollout:
    """Store a new rollout and a ``created`` event (with the offline comparison's summary).

    Raises:
        RegistryError: a rollout with this id exists.
        RegistryUnavailableError: the database failed.
    """
    with registry.write_session("creating a rollout", RegistryError) as s:
        s.add(_row(rollout, at))
        s.flush()
        detail: dict[str, Any] = (
            {"overrides": [o.to_dict() for o in rollout.overrides]} if rollout.overrides else {}
        )
        if rollout.offline is not None:
            o = rollout.offline
            detail["offline"] = {
                "verdict": o.verdict,
                "eval_set": o.eval_set,
                "n": o.n,
                "disagreement": o.disagreement,
            }
            detail["reasons"] = [f"offline comparison: {o.verdict}", *o.reasons]
        s.add(RolloutEventRow(rollout_id=rollout.id, at=at, kind="created", detail=detail))
    return rollout


def save_rollout(
    registry: Registry,
    rollout: Rollout,
    at: datetime,
    events: Sequence[tuple[str, Mapping[str, Any]]] = (),
    *,
    read: Rollout | None = None,
) -> None:
    """Replace a rollout's state and append ``(kind, detail)`` events, in one transaction.

    ``read`` is the state the change was computed from: the save is refused when the stored
    state is no longer that one (a command or step on another worker wrote in between), so
    two writers never overwrite each other's decision silently.

    Raises:
        UnknownRolloutError: no such rollout.
        RolloutConflictError: the stored state changed since ``read``.
        RegistryUnavailableError: the database failed.
    """
    with registry.write_session("saving a rollout") as s:
        row = s.get(RolloutRow, rollout.id, with_for_update=True)
        if row is None:
            raise UnknownRolloutError(f"no rollout {rollout.id!r}")
        # Both sides normalised through the codec: a rollout stored before a policy or state
        # field existed (its document lacks the key) still compares equal to itself.
        if read is not None and _normal(rollout_from_dict(row.state_doc)) != _normal(read):
            raise RolloutConflictError(f"rollout {rollout.id} changed since it was read")
        new = _row(rollout, at)
        for col in ("state", "breached", "updated_at", "state_doc", "from_version"):
            setattr(row, col, getattr(new, col))
        for kind, detail in events:
            s.add(RolloutEventRow(rollout_id=rollout.id, at=at, kind=kind, detail=dict(detail)))


def _normal(r: Rollout) -> Any:
    return json.loads(json.dumps(rollout_to_dict(r)))


def get_rollout(registry: Registry, rollout_id: str) -> Rollout:
    """One rollout.

    Raises:
        UnknownRolloutError: no such rollout.
        RegistryUnavailableError: the database failed.
    """
    with registry.read_session("reading a rollout") as s:
        row = s.get(RolloutRow, rollout_id)
        if row is None:
            raise UnknownRolloutError(f"no rollout {rollout_id!r}")
        return rollout_from_dict(row.state_doc)


def list_rollouts(
    registry: Registry, *, states: Sequence[str] | None = None, model: str | None = None
) -> list[Rollout]:
    """Rollouts, newest first, optionally in some states or of one model.

    Raises:
        RegistryUnavailableError: the database failed.
    """
    stmt = select(RolloutRow).order_by(RolloutRow.created_at.desc(), RolloutRow.id)
    if states is not None:
        stmt = stmt.where(RolloutRow.state.in_(list(states)))
    if model is not None:
        stmt = stmt.where(RolloutRow.model == model)
    with registry.read_session("listing rollouts") as s:
        return [rollout_from_dict(r.state_doc) for r in s.scalars(stmt)]


def rollout_events(registry: Registry, rollout_id: str, *, limit: int = 200) -> list[RolloutEvent]:
    """The latest ``limit`` events of a rollout, oldest first.

    Raises:
        RegistryUnavailableError: the database failed.
    """
    stmt = (
        select(RolloutEventRow)
        .where(RolloutEventRow.rollout_id == rollout_id)
        .order_by(RolloutEventRow.id.desc())
        .limit(max(1, limit))
    )
    with registry.read_session("reading rollout events") as s:
        rows = list(s.scalars(stmt))
    return [RolloutEvent(r.id, r.rollout_id, r.at, r.kind, r.detail) for r in reversed(rows)]


def breach_aborts(registry: Registry, model: str, version: int) -> int:
    """How many rollouts of ``model`` v``version`` a gate breach aborted.

    Raises:
        RegistryUnavailableError: the database failed.
    """
    stmt = (
        select(func.count())
        .select_from(RolloutRow)
        .where(
            RolloutRow.model == model,
            RolloutRow.to_version == version,
            RolloutRow.state == "aborted",
            RolloutRow.breached.is_(True),
        )
    )
    with registry.read_session("counting aborted rollouts") as s:
        return int(s.scalar(stmt) or 0)


def abort_count(registry: Registry, model: str, version: int) -> int:
    """How many rollouts of ``model`` v``version`` were aborted (by a gate or an operator).

    Raises:
        RegistryUnavailableError: the database failed.
    """
    stmt = (
        select(func.count())
        .select_from(RolloutRow)
        .where(
            RolloutRow.model == model,
            RolloutRow.to_version == version,
            RolloutRow.state == "aborted",
        )
    )
    with registry.read_session("counting aborted rollouts") as s:
        return int(s.scalar(stmt) or 0)


def quarantine_reason(registry: Registry, model: str, version: int) -> str | None:
    """Why the version is quarantined, or None when it is not.

    Raises:
        RegistryUnavailableError: the database failed.
    """
    stmt = select(QuarantineRow.reason).where(
        QuarantineRow.model == model, QuarantineRow.version == version
    )
    with registry.read_session("reading the quarantine") as s:
        reason = s.scalar(stmt)
    return None if reason is None else str(reason)


# --------------------------------------------------------------------------- quarantine
def quarantine_version(
    registry: Registry, model: str, version: int, reason: str, at: datetime
) -> None:
    """Quarantine a model version (idempotent).

    Raises:
        RegistryUnavailableError: the database failed.
    """
    with registry.write_session("quarantining a version") as s:
        exists = s.scalar(
            select(QuarantineRow).where(
                QuarantineRow.model == model, QuarantineRow.version == version
            )
        )
        if exists is None:
            s.add(QuarantineRow(model=model, version=version, reason=reason[:1024], at=at))


def quarantined(registry: Registry, model: str, version: int) -> bool:
    """True when the version is quarantined. Raises: RegistryUnavailableError."""
    stmt = select(QuarantineRow.id).where(
        QuarantineRow.model == model, QuarantineRow.version == version
    )
    with registry.read_session("reading the quarantine") as s:
        return s.scalar(stmt) is not None


def list_quarantine(registry: Registry) -> list[QuarantineRecord]:
    """Every quarantined version. Raises: RegistryUnavailableError."""
    stmt = select(QuarantineRow).order_by(QuarantineRow.model, QuarantineRow.version)
    with registry.read_session("reading the quarantine") as s:
        return [QuarantineRecord(r.model, r.version, r.reason, r.at) for r in s.scalars(stmt)]


def _row(r: Rollout, at: datetime) -> RolloutRow:
    return RolloutRow(
        id=r.id,
        model=r.model,
        from_version=r.from_version,
        to_version=r.to_version,
        state=r.state,
        breached=r.breached,
        created_at=r.created_at,
        updated_at=at,
        state_doc=rollout_to_dict(r),
    )
