"""Agent releases: the agent's own software packages the server publishes and assigns.

Existing databases get an empty table.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``agent_releases``."""
    op.create_table(
        "agent_releases",
        sa.Column("release", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("python", sa.String(length=16), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("targets_sha256", sa.String(length=64), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("release", name=op.f("pk_agent_releases")),
        sa.UniqueConstraint("sha256", name=op.f("uq_agent_releases_sha256")),
    )


def downgrade() -> None:
    """Drop ``agent_releases``."""
    op.drop_table("agent_releases")
