"""The fleet registry's device, bundle and telemetry tables, as SQLAlchemy 2 typed ORM classes,
and the operator tables (accounts, their API tokens and console sessions).

Owns: those tables (keys, constraints, indexes) that ``migrations/`` creates and that ``store``
(devices, bundles, telemetry) and ``fleet_server.accounts.store`` (operators) read and write.
Operator secrets are never stored: an account keeps an argon2id hash of its password, a token
and a session the SHA-256 of their random secret. Does not own: the ORM base and shared column
types (``orm``), the rollout tables (``rollout_models``), the complete schema Alembic compares
against (``schema``), any query or transaction (``store`` and ``fleet_server.accounts.store``
do that) nor the schema's history (Alembic revisions under ``migrations/versions`` do; a
change here needs a new revision there).

Timestamps are timezone-aware UTC everywhere: ``UTCDateTime`` normalises on the way in and,
because SQLite keeps no zone, re-attaches UTC on the way out. JSON columns are ``JSONB`` on
PostgreSQL and JSON text on SQLite.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from fleet_server.registry.orm import ID_LEN, NAME_LEN, SHA256_LEN, Base

__all__ = [
    "ACCOUNT_NAME_LEN",
    "CLIENT_LEN",
    "CREDENTIAL_ID_LEN",
    "HASH_LEN",
    "LABEL_LEN",
    "ROLE_LEN",
    "AccountRow",
    "ApiTokenRow",
    "Bundle",
    "DesiredStateRow",
    "Device",
    "DeviceSeq",
    "RollupState",
    "SessionRow",
    "TelemetryKey",
    "TelemetryRollup",
    "TelemetryRow",
]


class Device(Base):
    """An enrolled device: identity, grouping, certificate and what it last reported."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    group: Mapped[str] = mapped_column(String(NAME_LEN), index=True)
    tags: Mapped[dict[str, Any]] = mapped_column()
    enrolled_at: Mapped[datetime] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()
    cert_serial: Mapped[str | None] = mapped_column(String(64))
    # Incremented by every re-enrollment: a replaced device starts its outbox seqs at 1 again,
    # so telemetry is keyed by (device, epoch, seq) and the seq state restarts with the epoch.
    epoch: Mapped[int] = mapped_column(BigInteger, default=1, server_default="1")
    last_seen: Mapped[datetime | None] = mapped_column()
    reported: Mapped[dict[str, Any] | None] = mapped_column()
    reported_at: Mapped[datetime | None] = mapped_column()


class Bundle(Base):
    """A builder-signed bundle the server can assign; ``(name, version)`` is unique."""

    __tablename__ = "bundles"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN))
    version: Mapped[int] = mapped_column(BigInteger)
    channel: Mapped[str] = mapped_column(String(NAME_LEN))
    sha256: Mapped[str] = mapped_column(String(SHA256_LEN))
    length: Mapped[int] = mapped_column(BigInteger)
    targets_sha256: Mapped[str] = mapped_column(String(SHA256_LEN))
    manifest: Mapped[dict[str, Any]] = mapped_column()
    published_at: Mapped[datetime] = mapped_column()


class DesiredStateRow(Base):
    """One signed desired-state document; ``version`` grows strictly per device."""

    __tablename__ = "desired_states"

    device_id: Mapped[str] = mapped_column(
        String(ID_LEN), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    document: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column()


class TelemetryRow(Base):
    """One stored telemetry entry (report or event), written once per new ``TelemetryKey``.

    On PostgreSQL the table is range-partitioned by ``received_at`` (daily partitions named
    ``telemetry_pYYYYMMDD`` plus ``telemetry_default``, migration ``0006``; created and dropped
    by ``fleet_server.history.retention``) and its primary key there is ``(id, received_at)``,
    as PostgreSQL requires of a partitioned table; ``id`` still comes from one sequence, so it
    is unique and grows in insertion order (``telemetry tail`` pages by it). The table has no
    unique key on ``(device_id, epoch, seq)``: deduplication is ``TelemetryKey``'s.
    """

    __tablename__ = "telemetry"
    __table_args__ = (
        Index("ix_telemetry_received_at", "received_at"),
        # The history queries' index: "this device's rows in a time range" and "its last report
        # before t" (an index seek, not a scan of the device's whole history).
        Index("ix_telemetry_device_id_received_at", "device_id", "received_at"),
    )

    # BIGINT on PostgreSQL; plain INTEGER on SQLite so it is the rowid and autoincrements.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    device_id: Mapped[str] = mapped_column(
        String(ID_LEN), ForeignKey("devices.id", ondelete="CASCADE")
    )
    epoch: Mapped[int] = mapped_column(BigInteger, default=1, server_default="1")
    seq: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column()
    payload: Mapped[dict[str, Any]] = mapped_column()


class TelemetryKey(Base):
    """The deduplication key of every stored entry: ``(device_id, epoch, seq)``, once.

    Ingest inserts the keys first (``ON CONFLICT DO NOTHING RETURNING``) and stores in
    ``telemetry`` only the entries whose key was new, in the same transaction; the per-device
    seq scans of the acknowledgement rule read this table (its primary key index). Retention
    prunes a key only when it is older than the raw cut and at or below the device's
    ``acked_upto`` (or of an older epoch), raising ``DeviceSeq.pruned_upto`` past it, so a
    redelivery is a duplicate either way (``fleet_server.history.retention``).
    """

    __tablename__ = "telemetry_keys"
    __table_args__ = (Index("ix_telemetry_keys_received_at", "received_at"),)

    device_id: Mapped[str] = mapped_column(
        String(ID_LEN), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    epoch: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    received_at: Mapped[datetime] = mapped_column()


class DeviceSeq(Base):
    """Per-device acknowledgement state of the telemetry sequence.

    ``acked_upto``: every ``seq <= acked_upto`` is stored or known lost (the ack sent back).
    ``gaps``: seqs above ``acked_upto`` and below the highest stored one that are missing now.
    ``lost``: seqs declared gone for good by a batch floor and never received (cumulative).
    ``duplicates``: entries received again and ignored (cumulative).
    ``pruned_upto``: retention pruned keys of this epoch up to here; an entry with a lower or
    equal ``seq`` is a duplicate without a key lookup (it is at or below ``acked_upto``).
    """

    __tablename__ = "device_seq"

    device_id: Mapped[str] = mapped_column(
        String(ID_LEN), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    acked_upto: Mapped[int] = mapped_column(BigInteger, default=0)
    gaps: Mapped[int] = mapped_column(BigInteger, default=0)
    lost: Mapped[int] = mapped_column(BigInteger, default=0)
    duplicates: Mapped[int] = mapped_column(BigInteger, default=0)
    pruned_upto: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class TelemetryRollup(Base):
    """Exact, mergeable totals of one device on one model version over one time bucket.

        ``bucket_seconds`` is the level (``history.FINE_SECONDS`` folded from raw rows, 3600 folded
        from fine rows); ``bucket_start`` is server receive time (``received_at``), floored.
        ``metrics`` holds the counter differences (``rollout_metrics.WindowMetrics`` fields plus
        ``rejects`` and ``events`` by kind); ``drift`` lists the merged tier-A parts per tensor and
    role (windows, edges digest, shape, integer width) and ``drift_arrays`` holds their arrays
    (``history.cells.DriftPart.to_bytes``).
        Written only by ``fleet_server.history``; no foreign key, so a rollup outlives nothing it
        depends on and retention can drop it independently.
    """

    __tablename__ = "telemetry_rollups"

    bucket_seconds: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    bucket_start: Mapped[datetime] = mapped_column(primary_key=True)
    device_id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    model: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    device_group: Mapped[str] = mapped_column(String(NAME_LEN))
    reports: Mapped[int] = mapped_column(BigInteger)
    requests: Mapped[int] = mapped_column(BigInteger)
    max_psi: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column()
    drift: Mapped[dict[str, Any]] = mapped_column()
    drift_arrays: Mapped[bytes] = mapped_column(LargeBinary)


class RollupState(Base):
    """How far each rollup level is folded: every bucket before ``folded_until`` is final."""

    __tablename__ = "rollup_state"

    level: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    folded_until: Mapped[datetime] = mapped_column()


# ----------------------------------------------------------------- operators
ACCOUNT_NAME_LEN: Final = 64
ROLE_LEN: Final = 32
HASH_LEN: Final = 256
CREDENTIAL_ID_LEN: Final = 32
LABEL_LEN: Final = 200
CLIENT_LEN: Final = 64


class AccountRow(Base):
    """One operator account (``password_hash`` ``None``: no password login, tokens only)."""

    __tablename__ = "accounts"

    name: Mapped[str] = mapped_column(String(ACCOUNT_NAME_LEN), primary_key=True)
    role: Mapped[str] = mapped_column(String(ROLE_LEN))
    password_hash: Mapped[str | None] = mapped_column(String(HASH_LEN), nullable=True)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column()
    changed_at: Mapped[datetime] = mapped_column()
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(nullable=True)
    last_login_at: Mapped[datetime | None] = mapped_column(nullable=True)


class ApiTokenRow(Base):
    """One API token of an account: its public id, role, expiry and the SHA-256 of its secret."""

    __tablename__ = "api_tokens"
    __table_args__ = (Index("ix_api_tokens_account", "account"),)

    id: Mapped[str] = mapped_column(String(CREDENTIAL_ID_LEN), primary_key=True)
    account: Mapped[str] = mapped_column(
        String(ACCOUNT_NAME_LEN), ForeignKey("accounts.name", ondelete="CASCADE")
    )
    role: Mapped[str] = mapped_column(String(ROLE_LEN))
    label: Mapped[str] = mapped_column(String(LABEL_LEN))
    secret_sha256: Mapped[str] = mapped_column(String(SHA256_LEN))
    created_at: Mapped[datetime] = mapped_column()
    expires_at: Mapped[datetime] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(nullable=True)


class SessionRow(Base):
    """One console session: its public id, account, timeouts and the SHA-256 of its secret."""

    __tablename__ = "sessions"
    __table_args__ = (Index("ix_sessions_account", "account"),)

    id: Mapped[str] = mapped_column(String(CREDENTIAL_ID_LEN), primary_key=True)
    account: Mapped[str] = mapped_column(
        String(ACCOUNT_NAME_LEN), ForeignKey("accounts.name", ondelete="CASCADE")
    )
    secret_sha256: Mapped[str] = mapped_column(String(SHA256_LEN))
    client: Mapped[str] = mapped_column(String(CLIENT_LEN))
    created_at: Mapped[datetime] = mapped_column()
    last_seen_at: Mapped[datetime] = mapped_column()
    expires_at: Mapped[datetime] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column(nullable=True)
