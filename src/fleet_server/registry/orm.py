"""The registry's ORM base: the declarative ``Base`` every table class derives from, and the
column types and sizes the tables share.

Owns: the shared ``MetaData`` and its constraint naming convention, timezone-aware UTC timestamps
(``UTCDateTime``), JSON columns (``JSONB`` on PostgreSQL, JSON text on SQLite) and the id/name
lengths. Does not own: any table (``tables.core`` for devices, bundles and telemetry,
``tables.rollouts`` for rollouts) nor the complete schema (``schema``, which imports every table
module).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, MetaData
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator

__all__ = ["ID_LEN", "NAME_LEN", "NAMING_CONVENTION", "SHA256_LEN", "Base", "UTCDateTime"]

#: Deterministic constraint names, so later Alembic revisions can drop or alter them by name.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ID_LEN = 128  # edge_agent.common.identity allows device ids of at most 128 characters
NAME_LEN = 128
SHA256_LEN = 64
JSONType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """A ``DateTime(timezone=True)`` that only accepts and always returns aware UTC values."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Refuse naive datetimes (ambiguous), store UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass a timezone-aware value")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """SQLite returns naive values: they were stored as UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base carrying the shared ``MetaData`` (with the naming convention)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSONType, datetime: UTCDateTime()}
