"""The audit log: an append-only record of every state-changing admin action.

Owns: the ``audit_log`` table (on the registry's ``Base``; the Alembic revision ``0007_audit_log``
creates it, and on PostgreSQL a trigger that refuses UPDATE, DELETE and TRUNCATE), the values
(``Actor``: who; ``AuditEntry``: one row; ``AuditQuery``: a filter) and the two operations,
``append_entry`` and ``audit_entries``. There is deliberately no update or delete function: the
only way to change the table is to append. Does not own: what a request's entry holds (the admin
API's ``fleet_server.admin.audit`` builds it), nor its output formats (also there).

Each admin action is two rows sharing a ``request_id``: phase ``attempt`` (written before the
action runs; when it cannot be written the action does not run) and phase ``outcome`` (the
status and error code after it ran). An attempt without an outcome means the outcome could not
be recorded (the server log says why).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import BigInteger, Index, Integer, String, select
from sqlalchemy.orm import Mapped, mapped_column

from fleet_server.registry.orm import Base
from fleet_server.registry.store import Registry

__all__ = [
    "ACTION_LEN",
    "ACTOR_LEN",
    "CODE_LEN",
    "MAX_QUERY_LIMIT",
    "OBJECT_LEN",
    "PHASES",
    "Actor",
    "AuditEntry",
    "AuditQuery",
    "AuditRow",
    "append_entry",
    "audit_entries",
]

ACTOR_LEN: Final = 160
ACTION_LEN: Final = 160
OBJECT_LEN: Final = 300
CODE_LEN: Final = 64
ADDRESS_LEN: Final = 64
PHASES: Final = ("attempt", "outcome")
MAX_QUERY_LIMIT: Final = 10_000


class AuditRow(Base):
    """One audit entry (never updated nor deleted)."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_at", "at"),
        Index("ix_audit_log_actor", "actor"),
        Index("ix_audit_log_request_id", "request_id"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[datetime] = mapped_column()
    request_id: Mapped[str] = mapped_column(String(32))
    phase: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(ACTOR_LEN))
    client: Mapped[str] = mapped_column(String(ADDRESS_LEN))
    action: Mapped[str] = mapped_column(String(ACTION_LEN))
    object: Mapped[str] = mapped_column(String(OBJECT_LEN))
    change: Mapped[dict[str, Any]] = mapped_column()
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    code: Mapped[str] = mapped_column(String(CODE_LEN))


@dataclass(frozen=True)
class Actor:
    """Who acted, as the auth layer knows it: ``kind:name``.

    ``kind`` is how the caller authenticated (``token``: a per-account API token,
    ``session``: a console session, ``bootstrap-token``: the configured shared token) and
    ``name`` the account (``fleet_server.admin.auth.actor_of``); the column stores
    ``str(actor)``, e.g. ``token:alice``.
    """

    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"[:ACTOR_LEN]


@dataclass(frozen=True)
class AuditEntry:
    """One row of the audit log (``id`` and ``at`` are set when it is appended)."""

    request_id: str
    phase: str
    actor: str
    client: str
    action: str
    object: str
    change: dict[str, Any]
    status: int | None = None
    code: str = ""
    id: int = 0
    at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (the admin API's and the export's shape)."""
        return {
            "id": self.id,
            "at": None if self.at is None else self.at.isoformat(),
            "request_id": self.request_id,
            "phase": self.phase,
            "actor": self.actor,
            "client": self.client,
            "action": self.action,
            "object": self.object,
            "change": self.change,
            "status": self.status,
            "code": self.code,
        }


@dataclass(frozen=True)
class AuditQuery:
    """A filter on the log: every field that is set must match (``after_id``: ids above it).

    With ``after_id`` the rows come oldest first (paging forward by id); without it, newest first.
    """

    since: datetime | None = None
    until: datetime | None = None
    actor: str | None = None
    action: str | None = None
    object: str | None = None
    after_id: int | None = None
    limit: int = 100


def _entry(row: AuditRow) -> AuditEntry:
    return AuditEntry(
        row.request_id,
        row.phase,
        row.actor,
        row.client,
        row.action,
        row.object,
        dict(row.change),
        row.status,
        row.code,
        row.id,
        row.at,
    )


def append_entry(registry: Registry, entry: AuditEntry, at: datetime) -> AuditEntry:
    """Append ``entry`` at ``at`` (aware); the stored entry with its id.

    Text fields are cut to their column sizes here, so a long value never fails the write.

    Raises:
        ValueError: ``entry.phase`` is not one of ``PHASES``.
        RegistryUnavailableError: the database failed.
    """
    if entry.phase not in PHASES:
        raise ValueError(f"audit phase must be one of {PHASES}")
    row = AuditRow(
        at=at,
        request_id=entry.request_id[:32],
        phase=entry.phase,
        actor=entry.actor[:ACTOR_LEN],
        client=entry.client[:ADDRESS_LEN],
        action=entry.action[:ACTION_LEN],
        object=entry.object[:OBJECT_LEN],
        change=entry.change,
        status=entry.status,
        code=entry.code[:CODE_LEN],
    )
    with registry.write_session("recording an audit entry") as s:
        s.add(row)
        s.flush()
        return _entry(row)


def audit_entries(registry: Registry, query: AuditQuery) -> list[AuditEntry]:
    """The entries matching ``query``, at most ``query.limit`` (1..``MAX_QUERY_LIMIT``).

    Raises:
        ValueError: the limit is out of range.
        RegistryUnavailableError: the database failed.
    """
    if not 1 <= query.limit <= MAX_QUERY_LIMIT:
        raise ValueError(f"limit must be in 1..{MAX_QUERY_LIMIT}")
    stmt = select(AuditRow)
    if query.since is not None:
        stmt = stmt.where(AuditRow.at >= query.since)
    if query.until is not None:
        stmt = stmt.where(AuditRow.at < query.until)
    if query.actor is not None:
        stmt = stmt.where(AuditRow.actor == query.actor)
    if query.action is not None:
        stmt = stmt.where(AuditRow.action == query.action)
    if query.object is not None:
        stmt = stmt.where(AuditRow.object == query.object)
    if query.after_id is not None:
        stmt = stmt.where(AuditRow.id > query.after_id).order_by(AuditRow.id.asc())
    else:
        stmt = stmt.order_by(AuditRow.id.desc())
    with registry.read_session("reading the audit log") as s:
        return [_entry(r) for r in s.scalars(stmt.limit(query.limit))]
