"""The agent release table: the agent's own software packages the server can assign.

Owns: the schema of ``agent_releases`` on the registry's ``Base`` (``orm``; the Alembic
revision ``0010_agent_releases`` creates it). Does not own: the queries
(``registry.agent_releases``), the files (stored by digest beside the model bundles,
``fleet_server.delivery.library``) nor what a release is (``edge_agent.trust.agent_release``).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, String
from sqlalchemy.orm import Mapped, mapped_column

from fleet_server.registry.orm import SHA256_LEN, Base

__all__ = ["VERSION_LEN", "AgentReleaseRow"]

VERSION_LEN = 64


class AgentReleaseRow(Base):
    """One published agent package; the release number is the key and only grows."""

    __tablename__ = "agent_releases"

    release: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    version: Mapped[str] = mapped_column(String(VERSION_LEN))
    python: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(SHA256_LEN), unique=True)
    length: Mapped[int] = mapped_column(BigInteger)
    targets_sha256: Mapped[str] = mapped_column(String(SHA256_LEN))
    published_at: Mapped[datetime] = mapped_column()
