"""The fleet registry's repository: every read and write of the registry database.

Owns: the engine (SQLite by default, PostgreSQL by URL), running the Alembic migrations, and the
transactions behind each operation: devices, bundles, desired-state documents, reported state and
telemetry ingest with per-device acknowledgement. Does not own: the schema (``models``), signing
desired states (``fleet_server.desired``), parsing wire payloads (``edge_agent.telemetry``) nor any
MQTT or HTTP.

Telemetry ingest and the acknowledgement rule. A device numbers reports and events with one
``seq`` (1, 2, ...) and deletes them from its outbox when acked. ``ingest`` inserts a batch with
``INSERT ... ON CONFLICT (device_id, seq) DO NOTHING`` (replays and redeliveries are counted as
duplicates, never stored twice) and then moves ``acked_upto`` to the highest ``seq`` such that
every lower one is stored or known lost. A batch may carry ``floor``, the oldest ``seq`` the
device still holds: anything below it that the server lacks is gone for good, so it is counted in
``lost`` and the mark moves past it. If a "lost" entry shows up later after all (a delayed
redelivery), it is stored and ``lost`` goes back down by one.

Concurrency: each ingest runs in ONE transaction that first locks the device's ``device_seq``
row (``SELECT ... FOR UPDATE`` on PostgreSQL; on SQLite every write transaction is
``BEGIN IMMEDIATE``, which takes the database write lock up front), so two workers ingesting for
the same device serialise on that row and the second sees the first's committed rows: nothing is
counted twice and the mark never goes backwards. Different devices do not wait for each other on
PostgreSQL.

Durability: the server acks only after commit, and the device then deletes its copy, so SQLite
runs with ``synchronous=FULL`` (WAL) like the device outbox: an acked entry survives power loss.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, cast

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    Connection,
    Engine,
    Table,
    bindparam,
    create_engine,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from edge_agent.errors import IdentityError
from edge_agent.identity import validate_device_id
from edge_agent.telemetry import Batch, Event, TelemetryReport
from fleet_server.errors import (
    BundleExistsError,
    DeviceExistsError,
    DeviceRevokedError,
    RegistryError,
    RegistryUnavailableError,
    TelemetryRejectedError,
    UnknownDeviceError,
)
from fleet_server.registry.models import (
    Bundle,
    DesiredStateRow,
    Device,
    DeviceSeq,
    TelemetryRow,
)

__all__ = [
    "BundleRecord",
    "DesiredRecord",
    "DeviceRecord",
    "IngestResult",
    "Registry",
    "SeqState",
    "StoredTelemetry",
    "TelemetryEntry",
]

MIGRATIONS: Final = Path(__file__).resolve().parent / "migrations"
MAX_SEQ: Final = 2**63 - 1
MAX_INGEST_ITEMS: Final = 4096
_INSERT_CHUNK: Final = 500  # rows per INSERT statement (5 params each; far below SQLite's cap)
_SCAN_CHUNK: Final = 1000
_IN_CHUNK: Final = 500  # ids per IN (...) list
_WRITE: Final = "edgefleet_write"
_MIGRATION_LOCK: Final = 0x65646766  # pg advisory lock key ("edgf") serialising upgrades
_LABEL_MAX: Final = 128
_SHA256_HEX: Final = frozenset("0123456789abcdef")


_DEVICES: Final = cast(Table, Device.__table__)
_SEQ: Final = cast(Table, DeviceSeq.__table__)
_TELEMETRY: Final = cast(Table, TelemetryRow.__table__)


# --------------------------------------------------------------------------- values
@dataclass(frozen=True)
class DeviceRecord:
    """A device as stored."""

    id: str
    group: str
    tags: Mapping[str, Any]
    enrolled_at: datetime
    revoked_at: datetime | None
    cert_serial: str | None
    last_seen: datetime | None
    reported: Mapping[str, Any] | None
    reported_at: datetime | None
    epoch: int = 1

    @property
    def revoked(self) -> bool:
        """True once the device is revoked."""
        return self.revoked_at is not None


@dataclass(frozen=True)
class BundleRecord:
    """A published bundle as stored."""

    name: str
    version: int
    channel: str
    sha256: str
    length: int
    targets_sha256: str
    manifest: Mapping[str, Any]
    published_at: datetime


@dataclass(frozen=True)
class DesiredRecord:
    """One stored desired-state document (the signed wire bytes)."""

    device_id: str
    version: int
    document: bytes
    created_at: datetime


@dataclass(frozen=True)
class TelemetryEntry:
    """A telemetry entry that is not (or no longer) a parsed report or event."""

    seq: int
    kind: str
    payload: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredTelemetry:
    """A stored telemetry row; ``id`` increases with insertion (a cursor for tailing)."""

    id: int
    device_id: str
    seq: int
    kind: str
    received_at: datetime
    payload: Mapping[str, Any]
    epoch: int = 1


@dataclass(frozen=True)
class SeqState:
    """A device's acknowledgement state (see ``models.DeviceSeq``)."""

    device_id: str
    acked_upto: int
    gaps: int
    lost: int
    duplicates: int


@dataclass(frozen=True)
class IngestResult:
    """What one ``ingest`` call did.

    Attributes:
        device_id: The device.
        acked_upto: Highest contiguous ``seq`` (stored or known lost): ack this to the device.
        gaps: Seqs currently missing between ``acked_upto`` and the highest stored one.
        inserted: Entries stored by this call.
        duplicates: Entries already stored (or repeated within the call), ignored.
        lost: Seqs this call declared gone for good (from ``floor``).
        recovered: Previously lost seqs that arrived after all and were stored.
    """

    device_id: str
    acked_upto: int
    gaps: int
    inserted: int
    duplicates: int
    lost: int
    recovered: int


def _utcnow() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------- registry
class Registry:
    """The registry database: open with ``Registry.open(url)``, then ``upgrade()`` once.

    Thread-safe: every method runs in its own session and transaction.
    """

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = _utcnow) -> None:
        """Wrap an engine made by ``Registry.open`` (it installs the SQLite pragmas)."""
        self._engine = engine
        self._writer = engine.execution_options(**{_WRITE: True})
        self._clock = clock
        self._dialect = engine.dialect.name
        self._upgrade_lock = threading.Lock()

    @classmethod
    def open(
        cls, url: str | URL, *, clock: Callable[[], datetime] = _utcnow, echo: bool = False
    ) -> Registry:
        """Create the engine for ``url`` (``sqlite:///path.db`` or ``postgresql+psycopg://...``).

        Raises:
            RegistryError: the URL cannot be parsed or names an unsupported database.
            RegistryUnavailableError: the database driver is missing.
        """
        try:
            parsed = make_url(url)
        except SQLAlchemyError as exc:
            raise RegistryError(f"invalid database URL: {exc}") from exc
        backend = parsed.get_backend_name()
        if backend not in {"sqlite", "postgresql"}:
            raise RegistryError(f"unsupported database {backend!r}: use sqlite or postgresql")
        if backend == "postgresql" and parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        try:
            if backend == "sqlite":
                engine = create_engine(parsed, echo=echo, connect_args={"timeout": 30.0})
                _install_sqlite_hooks(engine)
            else:
                engine = create_engine(parsed, echo=echo, pool_pre_ping=True)
        except (SQLAlchemyError, ImportError) as exc:
            raise RegistryUnavailableError(f"cannot create the database engine: {exc}") from exc
        return cls(engine, clock=clock)

    @property
    def engine(self) -> Engine:
        """The underlying engine (for tests and diagnostics)."""
        return self._engine

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ----------------------------------------------------------------- migrations
    def upgrade(self, revision: str = "head") -> None:
        """Migrate the schema up to ``revision`` with Alembic (idempotent; safe across workers).

        Raises:
            RegistryUnavailableError: the migration failed (the transaction is rolled back).
        """
        self._migrate(command.upgrade, revision)

    def downgrade(self, revision: str) -> None:
        """Migrate the schema down to ``revision`` (``"base"`` drops every registry table).

        Raises:
            RegistryUnavailableError: the migration failed (the transaction is rolled back).
        """
        self._migrate(command.downgrade, revision)

    def _migrate(self, run: Callable[[Config, str], None], revision: str) -> None:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self._upgrade_lock, self._guard("migrating"), self._writer.begin() as conn:
            if self._dialect == "postgresql":
                # Several workers may start at once: one migrates, the others then find head.
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            run(cfg, revision)

    @staticmethod
    def head_revision() -> str:
        """The newest schema revision this code ships (what ``upgrade()`` migrates to)."""
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        head = ScriptDirectory.from_config(cfg).get_current_head()
        assert head is not None  # the package ships at least one revision
        return head

    def current_revision(self) -> str | None:
        """The schema's Alembic revision (None for an empty database).

        Raises:
            RegistryUnavailableError: the database cannot be read.
        """
        with self._guard("reading the revision"), self._engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    # ----------------------------------------------------------------- devices
    def enroll(
        self,
        device_id: str,
        *,
        group: str = "default",
        tags: Mapping[str, Any] | None = None,
        cert_serial: str | None = None,
    ) -> DeviceRecord:
        """Register a device (or re-enroll a revoked one, which clears the revocation).

        Raises:
            RegistryError: invalid device id or group.
            DeviceExistsError: the device is enrolled and not revoked.
            RegistryUnavailableError: the database failed.
        """
        _check_device_id(device_id)
        _check_label(group, "group")
        now = self._clock()
        with self._write("enrolling a device", DeviceExistsError) as s:
            row = s.get(Device, device_id, with_for_update=True)
            if row is not None and row.revoked_at is None:
                raise DeviceExistsError(f"device {device_id!r} is already enrolled")
            if row is None:
                row = Device(id=device_id, epoch=1)
                s.add(row)
            else:
                # Re-enrollment: a new sequence epoch (the device's outbox may start at 1).
                row.epoch = (row.epoch or 1) + 1
                seq_row = s.get(DeviceSeq, device_id)
                if seq_row is not None:
                    s.delete(seq_row)
            row.group = group
            row.tags = dict(tags or {})
            row.enrolled_at = now
            row.revoked_at = None
            row.cert_serial = cert_serial
            s.flush()
            return _device(row)

    def revoke(self, device_id: str) -> DeviceRecord:
        """Mark a device revoked (idempotent: the first revocation time is kept).

        Raises:
            UnknownDeviceError: no such device.
            RegistryUnavailableError: the database failed.
        """
        with self._write("revoking a device") as s:
            row = _locked_device(s, device_id)
            if row.revoked_at is None:
                row.revoked_at = self._clock()
            return _device(row)

    def get_device(self, device_id: str) -> DeviceRecord:
        """One device.

        Raises:
            UnknownDeviceError: no such device.
            RegistryUnavailableError: the database failed.
        """
        with self._read("reading a device") as s:
            row = s.get(Device, device_id)
            if row is None:
                raise UnknownDeviceError(f"device {device_id!r} is not enrolled")
            return _device(row)

    def list_devices(
        self, *, group: str | None = None, include_revoked: bool = True
    ) -> list[DeviceRecord]:
        """Devices ordered by id, optionally of one group and without revoked ones.

        Raises:
            RegistryUnavailableError: the database failed.
        """
        stmt = select(Device).order_by(Device.id)
        if group is not None:
            stmt = stmt.where(Device.group == group)
        if not include_revoked:
            stmt = stmt.where(Device.revoked_at.is_(None))
        with self._read("listing devices") as s:
            return [_device(r) for r in s.scalars(stmt)]

    def record_reported(self, device_id: str, state: Mapping[str, Any]) -> DeviceRecord:
        """Store the device's latest reported state (replacing the previous one).

        Raises:
            UnknownDeviceError: no such device.
            DeviceRevokedError: the device is revoked.
            RegistryUnavailableError: the database failed.
        """
        now = self._clock()
        with self._write("recording reported state") as s:
            row = _locked_device(s, device_id)
            if row.revoked_at is not None:
                raise DeviceRevokedError(f"device {device_id!r} is revoked")
            row.reported = dict(state)
            row.reported_at = now
            row.last_seen = now
            return _device(row)

    # ----------------------------------------------------------------- bundles
    def publish_bundle(
        self,
        name: str,
        version: int,
        *,
        channel: str,
        sha256: str,
        length: int,
        targets_sha256: str,
        manifest: Mapping[str, Any] | None = None,
    ) -> BundleRecord:
        """Record a builder-signed bundle; republishing the identical file is a no-op.

        Raises:
            RegistryError: a malformed field (name, version, digest, length).
            BundleExistsError: ``(name, version)`` is taken by a different file.
            RegistryUnavailableError: the database failed.
        """
        _check_label(name, "bundle name")
        _check_label(channel, "channel")
        _check_sha256(sha256, "sha256")
        _check_sha256(targets_sha256, "targets_sha256")
        if not 0 <= version <= MAX_SEQ or not 0 < length <= MAX_SEQ:
            raise RegistryError("bundle version must be >= 0 and length > 0")
        row = Bundle(
            name=name,
            version=version,
            channel=channel,
            sha256=sha256,
            length=length,
            targets_sha256=targets_sha256,
            manifest=dict(manifest or {}),
            published_at=self._clock(),
        )
        try:
            with self._write("publishing a bundle", BundleExistsError) as s:
                s.add(row)
                s.flush()
                return _bundle(row)
        except BundleExistsError:
            pass
        existing = self.get_bundle(name, version)
        if (existing.sha256, existing.length) != (sha256, length):
            raise BundleExistsError(
                f"bundle {name} v{version} is already published with another digest"
            )
        return existing

    def get_bundle(self, name: str, version: int) -> BundleRecord:
        """One bundle.

        Raises:
            RegistryError: no such bundle.
            RegistryUnavailableError: the database failed.
        """
        stmt = select(Bundle).where(Bundle.name == name, Bundle.version == version)
        with self._read("reading a bundle") as s:
            row = s.scalars(stmt).one_or_none()
            if row is None:
                raise RegistryError(f"bundle {name} v{version} is not published")
            return _bundle(row)

    def list_bundles(self, name: str | None = None) -> list[BundleRecord]:
        """Bundles ordered by name, then version.

        Raises:
            RegistryUnavailableError: the database failed.
        """
        stmt = select(Bundle).order_by(Bundle.name, Bundle.version)
        if name is not None:
            stmt = stmt.where(Bundle.name == name)
        with self._read("listing bundles") as s:
            return [_bundle(r) for r in s.scalars(stmt)]

    # ----------------------------------------------------------------- desired state
    def assign_desired(
        self, device_id: str, build: Callable[[int], bytes], *, at_least: int = 1
    ) -> DesiredRecord:
        """Store a new desired-state document under the device's next version, atomically.

        The version is ``max(previous + 1, at_least)``; ``build(version)`` returns the signed
        document bytes for it and runs inside the transaction, which holds the device row locked,
        so concurrent assignments get distinct, strictly increasing versions.

        Raises:
            UnknownDeviceError: no such device.
            DeviceRevokedError: the device is revoked.
            RegistryError: ``build`` returned something other than non-empty bytes.
            RegistryUnavailableError: the database failed.
            Exception: whatever ``build`` raises propagates (nothing is stored).
        """
        with self._write("assigning desired state") as s:
            dev = _locked_device(s, device_id)
            if dev.revoked_at is not None:
                raise DeviceRevokedError(f"device {device_id!r} is revoked")
            last = s.scalar(
                select(func.max(DesiredStateRow.version)).where(
                    DesiredStateRow.device_id == device_id
                )
            )
            version = max((last or 0) + 1, at_least)
            document = build(version)
            if not isinstance(document, bytes) or not document:
                raise RegistryError("desired-state builder must return non-empty bytes")
            row = DesiredStateRow(
                device_id=device_id, version=version, document=document, created_at=self._clock()
            )
            s.add(row)
            s.flush()
            return _desired(row)

    def latest_desired(self, device_id: str) -> DesiredRecord | None:
        """The device's newest desired-state document, if any.

        Raises:
            RegistryUnavailableError: the database failed.
        """
        stmt = (
            select(DesiredStateRow)
            .where(DesiredStateRow.device_id == device_id)
            .order_by(DesiredStateRow.version.desc())
            .limit(1)
        )
        with self._read("reading desired state") as s:
            row = s.scalars(stmt).one_or_none()
            return None if row is None else _desired(row)

    # ----------------------------------------------------------------- telemetry
    def ingest_batch(self, batch: Batch, *, floor: int | None = None) -> IngestResult:
        """``ingest`` for a parsed wire ``Batch``.

        Raises:
            Same as ``ingest``.
        """
        return self.ingest(batch.device_id, batch.items, floor=floor)

    def ingest(
        self,
        device_id: str,
        entries: Sequence[TelemetryReport | Event | TelemetryEntry],
        *,
        floor: int | None = None,
    ) -> IngestResult:
        """Store entries idempotently in one transaction; return the seq to acknowledge.

        Args:
            device_id: The sending device (from its certificate, not from the payload).
            entries: Reports, events or raw entries, any order; may be empty (floor only).
            floor: The device outbox's oldest held ``seq``; lower seqs the server lacks are lost.

        Raises:
            TelemetryRejectedError: too many entries, a seq outside [1, 2**63-1], an entry of
                another device, or a floor above the lowest entry's seq.
            UnknownDeviceError: the device is not enrolled.
            DeviceRevokedError: the device is revoked (nothing is stored).
            RegistryUnavailableError: the database failed (nothing was stored).
        """
        rows = _checked_rows(device_id, entries, floor)
        with self._write("ingesting telemetry") as s:
            return self._ingest_in(s, device_id, rows, floor, self._clock())

    def ingest_many(
        self,
        batches: Sequence[
            tuple[str, Sequence[TelemetryReport | Event | TelemetryEntry], int | None]
        ],
    ) -> list[IngestResult | RegistryError]:
        """Store many devices' entries in ONE transaction (the gateway's batching path).

        Each item is ``(device_id, entries, floor)`` and is handled exactly like one ``ingest``
        call, in the given order (so several items of one device are applied in order, each
        seeing the previous one's rows). An item that is structurally wrong or whose device is
        unknown or revoked gets its error in the result list and stores nothing; the other
        items are still stored.

        Args:
            batches: ``(device_id, entries, floor)`` per item.

        Returns:
            Per item, in order: its ``IngestResult`` or the ``RegistryError`` that refused it
            (``TelemetryRejectedError``, ``UnknownDeviceError`` or ``DeviceRevokedError``).

        Raises:
            RegistryUnavailableError: the database failed; nothing of any item was stored.
        """
        checked: list[list[dict[str, Any]] | RegistryError] = []
        for device_id, entries, floor in batches:
            try:
                checked.append(_checked_rows(device_id, entries, floor))
            except TelemetryRejectedError as exc:
                checked.append(exc)
        if all(isinstance(c, RegistryError) for c in checked):
            return [c for c in checked if isinstance(c, RegistryError)]
        now = self._clock()
        with self._write("ingesting telemetry") as s:
            return self._ingest_set(s.connection(), batches, checked, now)

    def _ingest_set(
        self,
        conn: Connection,
        batches: Sequence[tuple[str, Sequence[Any], int | None]],
        checked: list[list[dict[str, Any]] | RegistryError],
        now: datetime,
    ) -> list[IngestResult | RegistryError]:
        """``ingest_many``'s body, set-wise: a fixed number of statements per batch.

        Statements: the batch's devices (one select), their ``device_seq`` rows (one upsert,
        one locking select, in id order so concurrent workers lock in the same order), the
        entries (one ``INSERT ... ON CONFLICT DO NOTHING RETURNING``, batched by the driver),
        every stored seq above each device's ``acked_upto`` (one select) and the new counters
        (one executemany) plus ``last_seen`` (one update). The per-item arithmetic of
        ``_ingest_in`` then runs in Python over those seqs, item by item in batch order, so
        several items of one device give exactly what sequential ``ingest`` calls give.
        """
        wanted = sorted(
            {d for (d, _e, _f), c in zip(batches, checked, strict=True) if isinstance(c, list)}
        )
        devices: dict[str, tuple[bool, int]] = {}
        for part in _chunks(wanted, _IN_CHUNK):
            for dev_id, revoked_at, epoch in conn.execute(
                select(_DEVICES.c.id, _DEVICES.c.revoked_at, _DEVICES.c.epoch).where(
                    _DEVICES.c.id.in_(part)
                )
            ):
                devices[dev_id] = (revoked_at is not None, int(epoch or 1))
        out: list[IngestResult | RegistryError | None] = []
        for (device_id, _e, _f), rows in zip(batches, checked, strict=True):
            if isinstance(rows, RegistryError):
                out.append(rows)
            elif device_id not in devices:
                out.append(UnknownDeviceError(f"device {device_id!r} is not enrolled"))
            elif devices[device_id][0]:
                # Revocation means its data is no longer trusted, even while the broker has
                # not reloaded the CRL yet; the gateway drops and counts the message.
                out.append(DeviceRevokedError(f"device {device_id!r} is revoked"))
            else:
                out.append(None)
        live = sorted({b[0] for b, o in zip(batches, out, strict=True) if o is None})
        if not live:
            return [o for o in out if o is not None]
        # device_seq rows: create the missing ones, then lock them all for this transaction.
        zero = {"acked_upto": 0, "gaps": 0, "lost": 0, "duplicates": 0}
        conn.execute(self._seq_insert_ignore(), [{"device_id": d, **zero} for d in live])
        state: dict[str, list[int]] = {}
        for part in _chunks(live, _IN_CHUNK):
            stmt = (
                select(
                    _SEQ.c.device_id, _SEQ.c.acked_upto, _SEQ.c.gaps, _SEQ.c.lost, _SEQ.c.duplicates
                )
                .where(_SEQ.c.device_id.in_(part))
                .order_by(_SEQ.c.device_id)
                .with_for_update()
            )
            for dev_id, acked, gaps, lost, dups in conn.execute(stmt):
                state[dev_id] = [int(acked), int(gaps), int(lost), int(dups)]
        # Every entry once, first occurrence in batch order wins (as sequential calls would).
        first: dict[tuple[str, int], int] = {}  # (device, seq) -> index of the item storing it
        values: list[dict[str, Any]] = []
        for index, (rows, result) in enumerate(zip(checked, out, strict=True)):
            if result is not None or isinstance(rows, RegistryError):
                continue
            for r in rows:
                key = (r["device_id"], r["seq"])
                if key not in first:
                    first[key] = index
                    epoch = devices[r["device_id"]][1]
                    values.append({**r, "epoch": epoch, "received_at": now})
        inserted: set[tuple[str, int]] = set()
        if values:
            inserted = {
                (str(d), int(n)) for d, n in conn.execute(self._telemetry_insert_ignore(), values)
            }
        # Stored seqs above each device's mark (now including this batch's rows).
        above: dict[str, set[int]] = {d: set() for d in live}
        for part in _chunks(live, _IN_CHUNK):
            stmt = (
                select(_TELEMETRY.c.device_id, _TELEMETRY.c.seq)
                .join(_SEQ, _SEQ.c.device_id == _TELEMETRY.c.device_id)
                .join(_DEVICES, _DEVICES.c.id == _TELEMETRY.c.device_id)
                .where(
                    _TELEMETRY.c.device_id.in_(part),
                    _TELEMETRY.c.epoch == _DEVICES.c.epoch,
                    _TELEMETRY.c.seq > _SEQ.c.acked_upto,
                )
            )
            for row in conn.execute(stmt):
                above[row[0]].add(int(row[1]))
        # What was stored before this batch: the rows of later items are added item by item.
        mine: dict[int, list[int]] = {}
        for key in inserted:
            mine.setdefault(first[key], []).append(key[1])
            above[key[0]].discard(key[1])
        results: list[IngestResult | RegistryError] = []
        for index, ((device_id, _e, floor), rows, result) in enumerate(
            zip(batches, checked, out, strict=True)
        ):
            if result is not None:
                results.append(result)
                continue
            assert isinstance(rows, list)
            st, seqs = state[device_id], above[device_id]
            mark = start = st[0]
            new = mine.get(index, [])
            recovered = 0
            for q in new:
                if q <= start:
                    recovered += 1
                else:
                    seqs.add(q)
            lost = 0
            if floor is not None and floor - 1 > mark:
                below = [q for q in seqs if q < floor]
                lost = (floor - 1 - mark) - len(below)
                seqs.difference_update(below)
                mark = floor - 1
            while mark + 1 in seqs:
                mark += 1
                seqs.discard(mark)
            top = max(seqs, default=None)
            gaps = 0 if top is None else top - mark - len(seqs)
            duplicates = len(rows) - len(new)
            st[0], st[1] = mark, gaps
            st[2] += lost - recovered
            st[3] += duplicates
            results.append(
                IngestResult(
                    device_id=device_id,
                    acked_upto=mark,
                    gaps=gaps,
                    inserted=len(new),
                    duplicates=duplicates,
                    lost=lost,
                    recovered=recovered,
                )
            )
        conn.execute(
            update(_SEQ)
            .where(_SEQ.c.device_id == bindparam("b_device"))
            .values(
                acked_upto=bindparam("b_acked"),
                gaps=bindparam("b_gaps"),
                lost=bindparam("b_lost"),
                duplicates=bindparam("b_dups"),
            ),
            [
                {"b_device": d, "b_acked": a, "b_gaps": g, "b_lost": lo, "b_dups": du}
                for d, (a, g, lo, du) in sorted(state.items())
            ],
        )
        for part in _chunks(live, _IN_CHUNK):
            conn.execute(update(_DEVICES).where(_DEVICES.c.id.in_(part)).values(last_seen=now))
        return results

    def _ingest_in(
        self,
        s: Session,
        device_id: str,
        rows: list[dict[str, Any]],
        floor: int | None,
        now: datetime,
    ) -> IngestResult:
        """One device's ingest inside an open write transaction (see ``ingest``).

        Raises:
            UnknownDeviceError, DeviceRevokedError: before anything is written.
        """
        dev = s.get(Device, device_id)
        if dev is None:
            raise UnknownDeviceError(f"device {device_id!r} is not enrolled")
        if dev.revoked_at is not None:
            # Revocation means its data is no longer trusted, even while the broker has
            # not reloaded the CRL yet; the gateway drops and counts the message.
            raise DeviceRevokedError(f"device {device_id!r} is revoked")
        state = _locked_seq(s, self._dialect, device_id)
        epoch = dev.epoch
        start = state.acked_upto
        inserted: list[int] = []
        for i in range(0, len(rows), _INSERT_CHUNK):
            chunk = [{**r, "epoch": epoch, "received_at": now} for r in rows[i : i + _INSERT_CHUNK]]
            inserted.extend(s.scalars(self._insert_ignore(chunk)))
        recovered = sum(1 for q in inserted if q <= start)
        mark, lost = start, 0
        if floor is not None and floor - 1 > mark:
            have = s.scalar(
                select(func.count())
                .select_from(TelemetryRow)
                .where(
                    TelemetryRow.device_id == device_id,
                    TelemetryRow.epoch == epoch,
                    TelemetryRow.seq > mark,
                    TelemetryRow.seq < floor,
                )
            )
            lost = (floor - 1 - mark) - int(have or 0)
            mark = floor - 1
        mark = _advance(s, device_id, epoch, mark)
        top, above = s.execute(
            select(func.max(TelemetryRow.seq), func.count()).where(
                TelemetryRow.device_id == device_id,
                TelemetryRow.epoch == epoch,
                TelemetryRow.seq > mark,
            )
        ).one()
        gaps = 0 if top is None else int(top) - mark - int(above)
        duplicates = len(rows) - len(inserted)
        state.acked_upto = mark
        state.gaps = gaps
        state.lost += lost - recovered
        state.duplicates += duplicates
        dev.last_seen = now
        # Write the counters now: a later item of the same device in this transaction
        # re-reads the row (populate_existing) and must see these values.
        s.flush()
        return IngestResult(
            device_id=device_id,
            acked_upto=mark,
            gaps=gaps,
            inserted=len(inserted),
            duplicates=duplicates,
            lost=lost,
            recovered=recovered,
        )

    def seq_state(self, device_id: str) -> SeqState:
        """The device's acknowledgement state (all zero before its first ingest).

        Raises:
            UnknownDeviceError: no such device.
            RegistryUnavailableError: the database failed.
        """
        with self._read("reading seq state") as s:
            if s.get(Device, device_id) is None:
                raise UnknownDeviceError(f"device {device_id!r} is not enrolled")
            row = s.get(DeviceSeq, device_id)
            if row is None:
                return SeqState(device_id, 0, 0, 0, 0)
            return SeqState(device_id, row.acked_upto, row.gaps, row.lost, row.duplicates)

    def telemetry(
        self, *, device_id: str | None = None, after_id: int = 0, limit: int = 100
    ) -> list[StoredTelemetry]:
        """Stored entries with ``id > after_id`` in insertion order (for ``telemetry tail``).

        Raises:
            RegistryUnavailableError: the database failed.
        """
        stmt = select(TelemetryRow).where(TelemetryRow.id > after_id)
        if device_id is not None:
            stmt = stmt.where(TelemetryRow.device_id == device_id)
        stmt = stmt.order_by(TelemetryRow.id).limit(max(1, min(limit, 10_000)))
        with self._read("reading telemetry") as s:
            return [
                StoredTelemetry(r.id, r.device_id, r.seq, r.kind, r.received_at, r.payload, r.epoch)
                for r in s.scalars(stmt)
            ]

    # ----------------------------------------------------------------- internals
    def _insert_ignore(self, chunk: list[dict[str, Any]]) -> Any:
        keys = ["device_id", "epoch", "seq"]
        if self._dialect == "postgresql":
            pg = (
                postgresql.insert(TelemetryRow)
                .values(chunk)
                .on_conflict_do_nothing(index_elements=keys)
            )
            return pg.returning(TelemetryRow.seq)
        lite = sqlite.insert(TelemetryRow).values(chunk).on_conflict_do_nothing(index_elements=keys)
        return lite.returning(TelemetryRow.seq)

    def _seq_insert_ignore(self) -> Any:
        """Core ``INSERT INTO device_seq ... ON CONFLICT DO NOTHING`` (for executemany)."""
        if self._dialect == "postgresql":
            return postgresql.insert(_SEQ).on_conflict_do_nothing()
        return sqlite.insert(_SEQ).on_conflict_do_nothing()

    def _telemetry_insert_ignore(self) -> Any:
        """Core telemetry insert returning the ``(device_id, seq)`` of rows really stored.

        Executed with a list of rows, SQLAlchemy's "insertmanyvalues" batches them into
        multi-row ``VALUES`` statements compiled once (no per-row statement building).
        """
        keys = ["device_id", "epoch", "seq"]
        ins = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        return (
            ins(_TELEMETRY)
            .on_conflict_do_nothing(index_elements=keys)
            .returning(_TELEMETRY.c.device_id, _TELEMETRY.c.seq)
        )

    @contextmanager
    def _guard(
        self, doing: str, conflict: type[RegistryError] = RegistryUnavailableError
    ) -> Iterator[None]:
        """Turn SQLAlchemy errors into ours; ``conflict`` is raised for a constraint violation."""
        try:
            yield
        except IntegrityError as exc:
            raise conflict(f"conflict while {doing}: {exc.orig}") from exc
        except OperationalError as exc:
            raise RegistryUnavailableError(f"database unavailable while {doing}: {exc}") from exc
        except SQLAlchemyError as exc:
            raise RegistryUnavailableError(f"database error while {doing}: {exc}") from exc

    @contextmanager
    def _write(
        self, doing: str, conflict: type[RegistryError] = RegistryUnavailableError
    ) -> Iterator[Session]:
        with (
            self._guard(doing, conflict),
            Session(self._writer, expire_on_commit=False) as s,
            s.begin(),
        ):
            yield s

    @contextmanager
    def _read(self, doing: str) -> Iterator[Session]:
        with (
            self._guard(doing),
            Session(self._engine, expire_on_commit=False) as s,
            s.begin(),
        ):
            yield s


# --------------------------------------------------------------------------- helpers
def _install_sqlite_hooks(engine: Engine) -> None:
    """WAL, foreign keys, FULL sync; and ``BEGIN IMMEDIATE`` for write transactions.

    pysqlite's own implicit BEGIN is switched off so SQLAlchemy's ``begin`` event decides the
    mode: a deferred transaction that later writes can fail with SQLITE_BUSY instead of waiting.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _locked_device(s: Session, device_id: str) -> Device:
    row = s.get(Device, device_id, with_for_update=True)
    if row is None:
        raise UnknownDeviceError(f"device {device_id!r} is not enrolled")
    return row


def _locked_seq(s: Session, dialect: str, device_id: str) -> DeviceSeq:
    """Create the device's ``device_seq`` row if absent, then lock it for this transaction."""
    values = {"device_id": device_id, "acked_upto": 0, "gaps": 0, "lost": 0, "duplicates": 0}
    if dialect == "postgresql":
        s.execute(postgresql.insert(DeviceSeq).values(values).on_conflict_do_nothing())
    else:
        s.execute(sqlite.insert(DeviceSeq).values(values).on_conflict_do_nothing())
    row = s.get(DeviceSeq, device_id, with_for_update=True, populate_existing=True)
    if row is None:  # pragma: no cover - inserted just above in this transaction
        raise RegistryUnavailableError(f"device_seq row of {device_id!r} vanished")
    return row


def _advance(s: Session, device_id: str, epoch: int, mark: int) -> int:
    """Move ``mark`` up through stored seqs ``mark+1, mark+2, ...`` until the first hole."""
    while True:
        seqs = s.scalars(
            select(TelemetryRow.seq)
            .where(
                TelemetryRow.device_id == device_id,
                TelemetryRow.epoch == epoch,
                TelemetryRow.seq > mark,
            )
            .order_by(TelemetryRow.seq)
            .limit(_SCAN_CHUNK)
        ).all()
        for q in seqs:
            if q != mark + 1:
                return mark
            mark = q
        if len(seqs) < _SCAN_CHUNK:
            return mark


def _checked_rows(
    device_id: str,
    entries: Sequence[TelemetryReport | Event | TelemetryEntry],
    floor: int | None,
) -> list[dict[str, Any]]:
    """``_rows`` plus the floor checks (see ``Registry.ingest``). Raises TelemetryRejectedError."""
    rows = _rows(device_id, entries)
    if floor is not None:
        if isinstance(floor, bool) or not isinstance(floor, int) or not 1 <= floor <= MAX_SEQ:
            raise TelemetryRejectedError(f"floor {floor!r} is not a seq in [1, 2**63-1]")
        if rows and floor > min(r["seq"] for r in rows):
            raise TelemetryRejectedError("floor is above a seq the batch carries")
    return rows


def _rows(
    device_id: str, entries: Sequence[TelemetryReport | Event | TelemetryEntry]
) -> list[dict[str, Any]]:
    if len(entries) > MAX_INGEST_ITEMS:
        raise TelemetryRejectedError(f"more than {MAX_INGEST_ITEMS} entries in one ingest")
    out: list[dict[str, Any]] = []
    for e in entries:
        if isinstance(e, TelemetryReport | Event):
            if e.device_id != device_id:
                raise TelemetryRejectedError(
                    f"entry of device {e.device_id!r} in an ingest for {device_id!r}"
                )
            kind, payload = ("report" if isinstance(e, TelemetryReport) else "event"), e.to_dict()
        elif isinstance(e, TelemetryEntry):
            kind, payload = e.kind, dict(e.payload)
            if not isinstance(kind, str) or not 1 <= len(kind) <= 64:
                raise TelemetryRejectedError("entry kind must be a string of 1-64 characters")
        else:
            raise TelemetryRejectedError(f"cannot ingest a {type(e).__name__}")
        seq = e.seq
        if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq <= MAX_SEQ:
            raise TelemetryRejectedError(f"seq {seq!r} is not in [1, 2**63-1]")
        out.append({"device_id": device_id, "seq": seq, "kind": kind, "payload": payload})
    return out


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _check_device_id(device_id: str) -> None:
    try:
        validate_device_id(device_id)
    except IdentityError as exc:
        raise RegistryError(str(exc)) from exc


def _check_label(value: str, what: str) -> None:
    if not isinstance(value, str) or not 1 <= len(value) <= _LABEL_MAX or not value.isprintable():
        raise RegistryError(f"{what} must be 1-{_LABEL_MAX} printable characters")


def _check_sha256(value: str, what: str) -> None:
    if not isinstance(value, str) or len(value) != 64 or not set(value) <= _SHA256_HEX:
        raise RegistryError(f"{what} must be 64 lowercase hex digits")


def _device(r: Device) -> DeviceRecord:
    return DeviceRecord(
        id=r.id,
        group=r.group,
        tags=dict(r.tags),
        enrolled_at=r.enrolled_at,
        revoked_at=r.revoked_at,
        cert_serial=r.cert_serial,
        last_seen=r.last_seen,
        reported=None if r.reported is None else dict(r.reported),
        reported_at=r.reported_at,
        epoch=r.epoch,
    )


def _bundle(r: Bundle) -> BundleRecord:
    return BundleRecord(
        name=r.name,
        version=r.version,
        channel=r.channel,
        sha256=r.sha256,
        length=r.length,
        targets_sha256=r.targets_sha256,
        manifest=dict(r.manifest),
        published_at=r.published_at,
    )


def _desired(r: DesiredStateRow) -> DesiredRecord:
    return DesiredRecord(
        device_id=r.device_id, version=r.version, document=r.document, created_at=r.created_at
    )
