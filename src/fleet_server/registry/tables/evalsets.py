"""The evaluation set table: labelled sets registered per model name.

Owns: the schema of ``eval_sets`` on the registry's ``Base`` (``orm``; the Alembic revision
``0005_eval_sets`` creates it). Does not own: the queries (``registry.evalsets``), the files
(stored by digest in the server's state directory, ``fleet_server.evalsets.store``) nor what
a set is used for (``fleet_server.evalsets.offline``).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from fleet_server.registry.orm import NAME_LEN, SHA256_LEN, Base

__all__ = ["MAX_NOTE", "MAX_SOURCE", "EvalSetRow"]

MAX_SOURCE = 512
MAX_NOTE = 1024


class EvalSetRow(Base):
    """One registration of an evaluation set file (by digest) for one model name."""

    __tablename__ = "eval_sets"
    __table_args__ = (
        UniqueConstraint("model", "sha256"),
        Index("ix_eval_sets_sha256", "sha256"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    model: Mapped[str] = mapped_column(String(NAME_LEN), index=True)
    sha256: Mapped[str] = mapped_column(String(SHA256_LEN))
    length: Mapped[int] = mapped_column(BigInteger)
    samples: Mapped[int] = mapped_column(BigInteger)
    classes: Mapped[int] = mapped_column(Integer)
    sample_shape: Mapped[str] = mapped_column(String(128))  # "8x8": one sample's shape
    source: Mapped[str] = mapped_column(String(MAX_SOURCE))
    note: Mapped[str] = mapped_column(String(MAX_NOTE))
    registered_at: Mapped[datetime] = mapped_column()
