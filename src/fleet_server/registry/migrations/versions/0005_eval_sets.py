"""Evaluation sets: labelled sets registered per model name, for the offline comparison.

One row per registration of a set file (stored by its sha256 in the server's state directory)
for one model name; the same file may be registered for several names, once each. Existing
databases get an empty table: rollouts of models without a set proceed and record "no
evaluation set".

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``eval_sets``."""
    op.create_table(
        "eval_sets",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("samples", sa.BigInteger(), nullable=False),
        sa.Column("classes", sa.Integer(), nullable=False),
        sa.Column("sample_shape", sa.String(length=128), nullable=False),
        sa.Column("source", sa.String(length=512), nullable=False),
        sa.Column("note", sa.String(length=1024), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_eval_sets")),
        sa.UniqueConstraint("model", "sha256", name=op.f("uq_eval_sets_model_sha256")),
    )
    op.create_index("ix_eval_sets_model", "eval_sets", ["model"])
    op.create_index("ix_eval_sets_sha256", "eval_sets", ["sha256"])


def downgrade() -> None:
    """Drop ``eval_sets`` (the set files stay in the state directory)."""
    op.drop_index("ix_eval_sets_sha256", table_name="eval_sets")
    op.drop_index("ix_eval_sets_model", table_name="eval_sets")
    op.drop_table("eval_sets")
