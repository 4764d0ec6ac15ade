"""Telemetry keys and, on PostgreSQL, a ``telemetry`` table range-partitioned by day.

Deduplication moves from ``telemetry``'s unique ``(device_id, epoch, seq)`` constraint to the
new ``telemetry_keys`` table (primary key ``(device_id, epoch, seq)``, filled here from the
stored rows), because PostgreSQL requires every unique constraint of a partitioned table to
include the partition key. ``device_seq.pruned_upto`` (0) is the watermark below which keys
were pruned. On both backends ``telemetry`` loses the unique constraint.

PostgreSQL: the existing table is converted in this one transaction. It is renamed, a new
``telemetry`` partitioned by range of ``received_at`` is created (primary key
``(id, received_at)``, same indexes and foreign key, ``id`` still drawn from the old sequence so
ids keep growing), with a default partition and one daily partition ``telemetry_pYYYYMMDD``
per UTC day that holds rows plus today and the next two days; every row is copied, the old
table dropped. Cost: the rename takes an ACCESS EXCLUSIVE lock on ``telemetry`` that ingest
waits on until commit, and the copy rewrites the table and builds its indexes again (time and
temporary disk space in proportion to the raw rows: with retention at 3 days, 3 days of them).
Upgrade a large registry in a quiet period, or shorten retention first.

SQLite: dropping the constraint copies the table (Alembic batch mode); the table stays one
table and retention stays batched deletes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_AHEAD_DAYS = 2
_COLUMNS = "id, device_id, epoch, seq, kind, received_at, payload"


def _copy(source: str) -> str:
    """Every row of ``source`` into ``telemetry``, ids kept."""
    return f"INSERT INTO telemetry ({_COLUMNS}) SELECT {_COLUMNS} FROM {source}"  # noqa: S608


def _create_keys() -> None:
    op.create_table(
        "telemetry_keys",
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("epoch", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_telemetry_keys_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "epoch", "seq", name=op.f("pk_telemetry_keys")),
    )
    op.create_index("ix_telemetry_keys_received_at", "telemetry_keys", ["received_at"])
    op.execute(
        "INSERT INTO telemetry_keys (device_id, epoch, seq, received_at) "
        "SELECT device_id, epoch, seq, received_at FROM telemetry"
    )
    with op.batch_alter_table("device_seq") as batch:
        batch.add_column(
            sa.Column("pruned_upto", sa.BigInteger(), server_default="0", nullable=False)
        )


def _day_partition(day: datetime) -> str:
    nxt = day + timedelta(days=1)
    return (
        f"CREATE TABLE telemetry_p{day:%Y%m%d} PARTITION OF telemetry "
        f"FOR VALUES FROM ('{day.isoformat()}') TO ('{nxt.isoformat()}')"
    )


def _partition_postgresql() -> None:
    conn = op.get_bind()
    op.execute("ALTER TABLE telemetry RENAME TO telemetry_unpartitioned")
    for name in (
        "pk_telemetry",
        "uq_telemetry_device_id_epoch_seq",
        "ix_telemetry_received_at",
        "ix_telemetry_device_id_received_at",
    ):
        op.execute(f"ALTER INDEX {name} RENAME TO {name}_unpartitioned")
    op.execute(
        "CREATE TABLE telemetry ("
        " id BIGINT NOT NULL DEFAULT nextval('telemetry_id_seq'::regclass),"
        " device_id VARCHAR(128) NOT NULL,"
        " epoch BIGINT NOT NULL DEFAULT 1,"
        " seq BIGINT NOT NULL,"
        " kind VARCHAR(64) NOT NULL,"
        " received_at TIMESTAMP WITH TIME ZONE NOT NULL,"
        " payload JSONB NOT NULL,"
        " CONSTRAINT pk_telemetry PRIMARY KEY (id, received_at),"
        " CONSTRAINT fk_telemetry_device_id_devices FOREIGN KEY (device_id)"
        "  REFERENCES devices (id) ON DELETE CASCADE"
        ") PARTITION BY RANGE (received_at)"
    )
    op.execute("CREATE INDEX ix_telemetry_received_at ON telemetry (received_at)")
    op.execute(
        "CREATE INDEX ix_telemetry_device_id_received_at ON telemetry (device_id, received_at)"
    )
    op.execute("CREATE TABLE telemetry_default PARTITION OF telemetry DEFAULT")
    days = {
        d.astimezone(UTC)
        for d in conn.scalars(
            sa.text(
                "SELECT DISTINCT date_trunc('day', received_at AT TIME ZONE 'UTC') "
                "AT TIME ZONE 'UTC' FROM telemetry_unpartitioned"
            )
        )
    }
    today = conn.scalar(sa.text("SELECT date_trunc('day', now() AT TIME ZONE 'UTC')"))
    assert isinstance(today, datetime)
    today = today.replace(tzinfo=UTC)
    days.update(today + timedelta(days=i) for i in range(_AHEAD_DAYS + 1))
    for day in sorted(days):
        op.execute(_day_partition(day))
    op.execute(_copy("telemetry_unpartitioned"))
    # The sequence belongs to the old table's column: move it, or DROP TABLE would take it.
    op.execute("ALTER SEQUENCE telemetry_id_seq OWNED BY telemetry.id")
    op.execute("DROP TABLE telemetry_unpartitioned")


def upgrade() -> None:
    """Add ``telemetry_keys`` and ``pruned_upto``; partition ``telemetry`` on PostgreSQL."""
    _create_keys()
    if op.get_bind().dialect.name == "postgresql":
        _partition_postgresql()
    else:
        with op.batch_alter_table("telemetry") as batch:
            batch.drop_constraint("uq_telemetry_device_id_epoch_seq", type_="unique")


def downgrade() -> None:
    """Back to one plain table with the unique constraint (copies every row on PostgreSQL).

    Fails with a unique violation if a key was pruned and its entry stored again since (it
    cannot have been: a pruned key's seq is at or below ``pruned_upto``, refused at ingest).
    """
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE telemetry RENAME TO telemetry_partitioned")
        for name in ("pk_telemetry", "ix_telemetry_received_at",
                     "ix_telemetry_device_id_received_at"):  # fmt: skip
            op.execute(f"ALTER INDEX {name} RENAME TO {name}_partitioned")
        op.execute(
            "CREATE TABLE telemetry ("
            " id BIGINT NOT NULL DEFAULT nextval('telemetry_id_seq'::regclass),"
            " device_id VARCHAR(128) NOT NULL,"
            " epoch BIGINT NOT NULL DEFAULT 1,"
            " seq BIGINT NOT NULL,"
            " kind VARCHAR(64) NOT NULL,"
            " received_at TIMESTAMP WITH TIME ZONE NOT NULL,"
            " payload JSONB NOT NULL,"
            " CONSTRAINT pk_telemetry PRIMARY KEY (id),"
            " CONSTRAINT fk_telemetry_device_id_devices FOREIGN KEY (device_id)"
            "  REFERENCES devices (id) ON DELETE CASCADE,"
            " CONSTRAINT uq_telemetry_device_id_epoch_seq UNIQUE (device_id, epoch, seq))"
        )
        op.execute(_copy("telemetry_partitioned"))
        op.execute("CREATE INDEX ix_telemetry_received_at ON telemetry (received_at)")
        op.execute(
            "CREATE INDEX ix_telemetry_device_id_received_at ON telemetry (device_id, received_at)"
        )
        op.execute("ALTER SEQUENCE telemetry_id_seq OWNED BY telemetry.id")
        op.execute("DROP TABLE telemetry_partitioned")  # and every partition
    else:
        with op.batch_alter_table("telemetry") as batch:
            batch.create_unique_constraint(
                "uq_telemetry_device_id_epoch_seq", ["device_id", "epoch", "seq"]
            )
    with op.batch_alter_table("device_seq") as batch:
        batch.drop_column("pruned_upto")
    op.drop_index("ix_telemetry_keys_received_at", table_name="telemetry_keys")
    op.drop_table("telemetry_keys")
