"""The rollout tables: rollouts, their event log and quarantined model versions.

Owns: the schema of rollout persistence on the registry's ``Base`` (``orm``; the Alembic revision
``0002_rollouts`` creates it). Does not own: queries (``registry.rollouts``) nor the rollout's
meaning (``fleet_server.rollouts.engine``); the whole engine state is one JSON document per
rollout, with the columns the server filters on next to it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from fleet_server.registry.orm import NAME_LEN, Base

__all__ = ["QuarantineRow", "RolloutEventRow", "RolloutRow"]

ROLLOUT_ID_LEN = 64


class RolloutRow(Base):
    """One rollout: filterable columns plus the engine state as JSON (``state_doc``)."""

    __tablename__ = "rollouts"
    __table_args__ = (Index("ix_rollouts_model_to_version", "model", "to_version"),)

    id: Mapped[str] = mapped_column(String(ROLLOUT_ID_LEN), primary_key=True)
    model: Mapped[str] = mapped_column(String(NAME_LEN))
    from_version: Mapped[int | None] = mapped_column(BigInteger)
    to_version: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(32), index=True)
    breached: Mapped[bool] = mapped_column()
    created_at: Mapped[datetime] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column()
    state_doc: Mapped[dict[str, Any]] = mapped_column()


class RolloutEventRow(Base):
    """One entry of a rollout's event log (decisions, commands, assignments)."""

    __tablename__ = "rollout_events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    rollout_id: Mapped[str] = mapped_column(
        String(ROLLOUT_ID_LEN), ForeignKey("rollouts.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[datetime] = mapped_column()
    kind: Mapped[str] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column()


class QuarantineRow(Base):
    """A model version that is not rolled out again (after repeated aborted rollouts)."""

    __tablename__ = "quarantine"
    __table_args__ = (UniqueConstraint("model", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(NAME_LEN))
    version: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(String(1024))
    at: Mapped[datetime] = mapped_column()
