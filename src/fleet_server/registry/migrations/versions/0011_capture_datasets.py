"""Capture upload: policies per model, per-device upload state, datasets with provenance.

Existing databases get empty tables: nothing is uploaded until an operator enables capture
upload for a model.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    """Create ``capture_policies``, ``capture_devices`` and ``datasets``."""
    op.create_table(
        "capture_policies",
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("selector", _json(), nullable=False),
        sa.Column("sample_ppm", sa.BigInteger(), nullable=False),
        sa.Column("bytes_per_day", sa.BigInteger(), nullable=False),
        sa.Column("chunk_bytes", sa.BigInteger(), nullable=False),
        sa.Column("drop", _json(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("model", name=op.f("pk_capture_policies")),
    )
    op.create_table(
        "capture_devices",
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("ack_sha256", sa.String(length=64), nullable=False),
        sa.Column("chunks", sa.BigInteger(), nullable=False),
        sa.Column("records", sa.BigInteger(), nullable=False),
        sa.Column("refused_chunks", sa.BigInteger(), nullable=False),
        sa.Column("refused_records", sa.BigInteger(), nullable=False),
        sa.Column("device_counts", _json(), nullable=False),
        sa.Column("last_chunk_at", _ts(), nullable=True),
        sa.PrimaryKeyConstraint("model", "device_id", name=op.f("pk_capture_devices")),
    )
    op.create_table(
        "datasets",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("records", sa.BigInteger(), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("labelled_rows", sa.BigInteger(), nullable=False),
        sa.Column("time_from", sa.Float(), nullable=False),
        sa.Column("time_to", sa.Float(), nullable=False),
        sa.Column("provenance", _json(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_datasets")),
    )
    op.create_index("ix_datasets_model", "datasets", ["model"])
    op.create_index("ix_datasets_created_at", "datasets", ["created_at"])


def downgrade() -> None:
    """Drop the three tables (dataset files stay in the state directory)."""
    op.drop_index("ix_datasets_created_at", table_name="datasets")
    op.drop_index("ix_datasets_model", table_name="datasets")
    op.drop_table("datasets")
    op.drop_table("capture_devices")
    op.drop_table("capture_policies")
