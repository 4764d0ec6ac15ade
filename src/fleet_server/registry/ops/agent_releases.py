"""Agent release records: publish one, list them, read one.

Owns: ``AgentReleaseRecord`` and the queries on ``tables.agents.AgentReleaseRow``. Each function
runs in one of the ``Registry``'s transactions; database failures raise
``RegistryUnavailableError``. Does not own the files (``fleet_server.delivery.library``) nor
the verification (the library verifies a package before it is recorded).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from fleet_server.errors import BundleExistsError, ModelNotPublishedError
from fleet_server.registry.store import Registry
from fleet_server.registry.tables.agents import AgentReleaseRow

__all__ = ["AgentReleaseRecord", "agent_release", "list_agent_releases", "publish_agent_release"]


@dataclass(frozen=True)
class AgentReleaseRecord:
    """One published agent package."""

    release: int
    version: str
    python: str
    sha256: str
    length: int
    targets_sha256: str
    published_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (the admin API's shape)."""
        return {
            "release": self.release,
            "version": self.version,
            "python": self.python,
            "sha256": self.sha256,
            "length": self.length,
            "targets_sha256": self.targets_sha256,
            "published_at": self.published_at.isoformat(),
        }


def _record(row: AgentReleaseRow) -> AgentReleaseRecord:
    return AgentReleaseRecord(
        row.release,
        row.version,
        row.python,
        row.sha256,
        row.length,
        row.targets_sha256,
        row.published_at,
    )


def publish_agent_release(registry: Registry, record: AgentReleaseRecord) -> AgentReleaseRecord:
    """Record ``record``; publishing the identical file again returns the stored record.

    Raises:
        BundleExistsError: the release number is taken by another file.
        RegistryUnavailableError: the database failed.
    """
    with registry.write_session("publishing an agent release", BundleExistsError) as s:
        row = s.get(AgentReleaseRow, record.release)
        if row is not None:
            if row.sha256 != record.sha256:
                raise BundleExistsError(
                    f"agent release {record.release} is already published with another file"
                )
            return _record(row)
        s.add(
            AgentReleaseRow(
                release=record.release,
                version=record.version,
                python=record.python,
                sha256=record.sha256,
                length=record.length,
                targets_sha256=record.targets_sha256,
                published_at=record.published_at,
            )
        )
    return record


def list_agent_releases(registry: Registry) -> list[AgentReleaseRecord]:
    """Every published agent release, newest first.

    Raises:
        RegistryUnavailableError: the database failed.
    """
    with registry.read_session("listing agent releases") as s:
        stmt = select(AgentReleaseRow).order_by(AgentReleaseRow.release.desc())
        return [_record(r) for r in s.scalars(stmt)]


def agent_release(registry: Registry, release: int) -> AgentReleaseRecord:
    """One published agent release.

    Raises:
        ModelNotPublishedError: no such release.
        RegistryUnavailableError: the database failed.
    """
    with registry.read_session("reading an agent release") as s:
        row = s.get(AgentReleaseRow, release)
        if row is None:
            raise ModelNotPublishedError(f"agent release {release} is not published")
        return _record(row)
