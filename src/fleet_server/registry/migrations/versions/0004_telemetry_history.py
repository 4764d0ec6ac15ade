"""Telemetry history: exact rollups per device, model version and time bucket; fold state.

Raw ``telemetry`` rows become short-lived (retention, ``fleet_server.history``); the rollups
keep the totals. Existing databases: the rollup tables start empty and the history job folds
the raw rows already stored, oldest bucket first, on its first runs (the backfill is the job
itself, resumable: ``rollup_state`` says how far it got). The new ``(device_id, received_at)``
index makes "a device's last report before t" a seek; on PostgreSQL building it takes a lock
that blocks inserts into ``telemetry`` for as long as the build runs (minutes at 10^8 rows):
schedule the upgrade of a large registry in a quiet period.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create ``telemetry_rollups``, ``rollup_state`` and the per-device time index."""
    op.create_table(
        "telemetry_rollups",
        sa.Column("bucket_seconds", sa.Integer(), nullable=False),
        sa.Column("bucket_start", _ts(), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("device_group", sa.String(length=128), nullable=False),
        sa.Column("reports", sa.BigInteger(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("max_psi", sa.Float(), nullable=True),
        sa.Column("metrics", _json(), nullable=False),
        sa.Column("drift", _json(), nullable=False),
        sa.Column("drift_arrays", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint(
            "bucket_seconds",
            "bucket_start",
            "device_id",
            "model",
            "version",
            name=op.f("pk_telemetry_rollups"),
        ),
    )
    op.create_table(
        "rollup_state",
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("folded_until", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("level", name=op.f("pk_rollup_state")),
    )
    op.create_index("ix_telemetry_device_id_received_at", "telemetry", ["device_id", "received_at"])


def downgrade() -> None:
    """Drop them again (the raw rows that retention deleted do not come back)."""
    op.drop_index("ix_telemetry_device_id_received_at", table_name="telemetry")
    op.drop_table("rollup_state")
    op.drop_table("telemetry_rollups")
