"""Evaluation set registrations: add, list, find by digest, the one a model's check uses.

Owns: ``EvalSetRecord`` (one registration: which model, which file by sha256, its size and shape,
and its provenance: free-text source, the operator's note, when) and the queries on
``tables.evalsets.EvalSetRow``. Each function runs in one of the ``Registry``'s transactions;
database failures raise ``RegistryUnavailableError``. Does not own the files
(``fleet_server.evalsets.store``) nor validate the provenance text (its callers do).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from fleet_server.errors import RegistryError, UnknownEvalSetError
from fleet_server.registry.store import Registry
from fleet_server.registry.tables.evalsets import EvalSetRow

__all__ = [
    "EvalSetRecord",
    "add_eval_set",
    "eval_set_registrations",
    "latest_eval_set",
    "list_eval_sets",
]


@dataclass(frozen=True)
class EvalSetRecord:
    """One registration of an evaluation set file for a model name."""

    model: str
    sha256: str
    length: int
    samples: int
    classes: int
    sample_shape: tuple[int, ...]
    source: str
    note: str
    registered_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (the admin API's shape)."""
        return {
            "model": self.model,
            "sha256": self.sha256,
            "length": self.length,
            "samples": self.samples,
            "classes": self.classes,
            "sample_shape": list(self.sample_shape),
            "source": self.source,
            "note": self.note,
            "registered_at": self.registered_at.isoformat(),
        }


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def _record(row: EvalSetRow) -> EvalSetRecord:
    shape = tuple(int(d) for d in row.sample_shape.split("x") if d)
    return EvalSetRecord(
        row.model,
        row.sha256,
        row.length,
        row.samples,
        row.classes,
        shape,
        row.source,
        row.note,
        row.registered_at,
    )


def add_eval_set(registry: Registry, record: EvalSetRecord) -> tuple[EvalSetRecord, bool]:
    """Register ``record``; the stored one and whether it is new.

    Registering the same file for the same model again keeps the first registration (its
    provenance) and returns it with ``False``.

    Raises:
        RegistryUnavailableError: the database failed.
    """
    with registry.write_session("registering an evaluation set", RegistryError) as s:
        row = s.scalars(
            select(EvalSetRow).where(
                EvalSetRow.model == record.model, EvalSetRow.sha256 == record.sha256
            )
        ).first()
        if row is not None:
            return _record(row), False
        s.add(
            EvalSetRow(
                model=record.model,
                sha256=record.sha256,
                length=record.length,
                samples=record.samples,
                classes=record.classes,
                sample_shape=_shape_text(record.sample_shape),
                source=record.source,
                note=record.note,
                registered_at=record.registered_at,
            )
        )
    return record, True


def list_eval_sets(registry: Registry, model: str | None = None) -> list[EvalSetRecord]:
    """Registrations (of ``model``, or all), newest first.

    Raises:
        RegistryUnavailableError: the database failed.
    """
    with registry.read_session("listing evaluation sets") as s:
        stmt = select(EvalSetRow).order_by(EvalSetRow.registered_at.desc(), EvalSetRow.id.desc())
        if model is not None:
            stmt = stmt.where(EvalSetRow.model == model)
        return [_record(r) for r in s.scalars(stmt)]


def eval_set_registrations(registry: Registry, sha256: str) -> list[EvalSetRecord]:
    """Every registration of the file with this digest, newest first.

    Raises:
        UnknownEvalSetError: no set with this digest is registered.
        RegistryUnavailableError: the database failed.
    """
    with registry.read_session("reading an evaluation set") as s:
        rows = s.scalars(
            select(EvalSetRow)
            .where(EvalSetRow.sha256 == sha256)
            .order_by(EvalSetRow.registered_at.desc(), EvalSetRow.id.desc())
        ).all()
        if not rows:
            raise UnknownEvalSetError(f"no evaluation set {sha256[:64]!r}")
        return [_record(r) for r in rows]


def latest_eval_set(registry: Registry, model: str) -> EvalSetRecord | None:
    """The set the offline comparison of ``model`` uses: its newest registration, or None.

    Raises:
        RegistryUnavailableError: the database failed.
    """
    with registry.read_session("reading an evaluation set") as s:
        row = s.scalars(
            select(EvalSetRow)
            .where(EvalSetRow.model == model)
            .order_by(EvalSetRow.registered_at.desc(), EvalSetRow.id.desc())
            .limit(1)
        ).first()
        return None if row is None else _record(row)
