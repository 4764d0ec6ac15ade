"""Enrollment epochs: telemetry is keyed by (device, epoch, seq).

A device re-enrolled after a revocation (typically replaced hardware with a fresh outbox)
starts its seqs at 1 again; without an epoch its new telemetry would be taken for duplicates
of the old and silently dropped. Existing rows belong to epoch 1.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("epoch", sa.BigInteger(), server_default="1", nullable=False))
    with op.batch_alter_table("telemetry") as batch:
        batch.add_column(sa.Column("epoch", sa.BigInteger(), server_default="1", nullable=False))
        batch.drop_constraint("uq_telemetry_device_id_seq", type_="unique")
        batch.create_unique_constraint(
            "uq_telemetry_device_id_epoch_seq", ["device_id", "epoch", "seq"]
        )


def downgrade() -> None:
    # Only safe while no device was re-enrolled (else (device_id, seq) is no longer unique).
    with op.batch_alter_table("telemetry") as batch:
        batch.drop_constraint("uq_telemetry_device_id_epoch_seq", type_="unique")
        batch.create_unique_constraint("uq_telemetry_device_id_seq", ["device_id", "seq"])
        batch.drop_column("epoch")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("epoch")
