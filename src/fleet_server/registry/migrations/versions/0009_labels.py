"""Labels: device labels (operator's and device's), label groups, maintenance windows.

``device_labels`` holds each device's labels by source with the one a selector sees marked
``effective`` (the operator's wins), indexed by ``(key, value)`` for selector queries.
Existing devices' enrollment ``tags`` that are valid labels (string values, the label rules of
``edge_agent.wire.ops.labels``) are copied into operator labels, so fleets can select on them at
once; the tags themselves stay (``--tag`` selectors keep working). Reported labels arrive with
the next reported state.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from edge_agent.wire.ops.labels import parse_labels

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the three tables and seed operator labels from valid tags."""
    op.create_table(
        "device_labels",
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("key", sa.String(length=317), nullable=False),
        sa.Column("value", sa.String(length=63), nullable=False),
        sa.Column("effective", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_device_labels_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "source", "key", name=op.f("pk_device_labels")),
    )
    op.create_index("ix_device_labels_key_value", "device_labels", ["key", "value"])
    op.create_table(
        "label_groups",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("selector", sa.String(length=2048), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_label_groups")),
    )
    op.create_table(
        "maintenance_windows",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column(
            "definition", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False
        ),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_maintenance_windows")),
    )
    conn = op.get_bind()
    devices = sa.table("devices", sa.column("id", sa.String), sa.column("tags", sa.JSON))
    labels = sa.table(
        "device_labels",
        sa.column("device_id", sa.String),
        sa.column("source", sa.String),
        sa.column("key", sa.String),
        sa.column("value", sa.String),
        sa.column("effective", sa.Boolean),
    )
    rows = []
    for device_id, tags in conn.execute(sa.select(devices.c.id, devices.c.tags)):
        for key, value in parse_labels(tags if isinstance(tags, dict) else None).labels.items():
            rows.append(
                {"device_id": device_id, "source": "operator", "key": key, "value": value}
                | {"effective": True}
            )
    if rows:
        op.bulk_insert(labels, rows)


def downgrade() -> None:
    """Drop the three tables (labels, groups and windows are lost; tags stay)."""
    op.drop_table("maintenance_windows")
    op.drop_table("label_groups")
    op.drop_index("ix_device_labels_key_value", table_name="device_labels")
    op.drop_table("device_labels")
