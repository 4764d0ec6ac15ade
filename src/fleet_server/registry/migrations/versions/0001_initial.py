"""Initial registry schema: devices, bundles, desired states, telemetry, device_seq.

Generated with ``alembic revision --autogenerate`` against an empty SQLite database, then
reviewed by hand: column types are spelled out here (not imported from ``models``) so this
revision keeps creating the same schema when the models change later.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the five registry tables."""
    op.create_table(
        "devices",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("group", sa.String(length=128), nullable=False),
        sa.Column("tags", _json(), nullable=False),
        sa.Column("enrolled_at", _ts(), nullable=False),
        sa.Column("revoked_at", _ts(), nullable=True),
        sa.Column("cert_serial", sa.String(length=64), nullable=True),
        sa.Column("last_seen", _ts(), nullable=True),
        sa.Column("reported", _json(), nullable=True),
        sa.Column("reported_at", _ts(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
    )
    op.create_index(op.f("ix_devices_group"), "devices", ["group"], unique=False)
    op.create_table(
        "bundles",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("channel", sa.String(length=128), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("targets_sha256", sa.String(length=64), nullable=False),
        sa.Column("manifest", _json(), nullable=False),
        sa.Column("published_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bundles")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_bundles_name_version")),
    )
    op.create_table(
        "desired_states",
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("version", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("document", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_desired_states_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "version", name=op.f("pk_desired_states")),
    )
    op.create_table(
        "device_seq",
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("acked_upto", sa.BigInteger(), nullable=False),
        sa.Column("gaps", sa.BigInteger(), nullable=False),
        sa.Column("lost", sa.BigInteger(), nullable=False),
        sa.Column("duplicates", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_device_seq_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_device_seq")),
    )
    op.create_table(
        "telemetry",
        # INTEGER on SQLite so the column is the rowid and autoincrements.
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("received_at", _ts(), nullable=False),
        sa.Column("payload", _json(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_telemetry_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_telemetry")),
        # The dedupe key; its index also serves every per-device seq range scan.
        sa.UniqueConstraint("device_id", "seq", name=op.f("uq_telemetry_device_id_seq")),
    )
    op.create_index("ix_telemetry_received_at", "telemetry", ["received_at"], unique=False)


def downgrade() -> None:
    """Drop everything ``upgrade`` created (children first)."""
    op.drop_index("ix_telemetry_received_at", table_name="telemetry")
    op.drop_table("telemetry")
    op.drop_table("device_seq")
    op.drop_table("desired_states")
    op.drop_table("bundles")
    op.drop_index(op.f("ix_devices_group"), table_name="devices")
    op.drop_table("devices")
