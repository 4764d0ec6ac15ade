"""The fleet registry's repository: every read and write of the registry database.

Owns: the ``Registry`` facade and the transactions behind each operation (which session, which
error each database failure becomes): devices, bundles, desired-state documents, reported state
and telemetry ingest with per-device acknowledgement. Its helpers own the rest: the record types
(``values``), argument checks (``_checks``), the engine and the Alembic migrations (``_engine``)
and the ingest statements (``_ingest``). Does not own: the schema (``models``), signing desired
states (``fleet_server.delivery.desired``), parsing wire payloads (``edge_agent.wire.telemetry``)
nor any MQTT or
HTTP.

Telemetry ingest and the acknowledgement rule. A device numbers reports and events with one
``seq`` (1, 2, ...) and deletes them from its outbox when acked. ``ingest`` inserts the batch's
keys with ``INSERT INTO telemetry_keys ... ON CONFLICT (device_id, epoch, seq) DO NOTHING
RETURNING`` and stores the entries whose key was new (replays and redeliveries are counted as
duplicates, never stored twice; ``_ingest`` has the details, including keys pruned by
retention) and then moves ``acked_upto`` to the highest ``seq`` such that
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
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, select
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from edge_agent.wire.ops.labels import parse_labels
from edge_agent.wire.telemetry import Batch, Event, TelemetryReport
from fleet_server.errors import (
    BundleExistsError,
    DeviceExistsError,
    RegistryError,
    RegistryUnavailableError,
)
from fleet_server.registry import _catalog, _engine, _ingest, _labels
from fleet_server.registry._checks import (
    check_device_id,
    check_label,
    checked_rows,
)
from fleet_server.registry.tables.core import Device
from fleet_server.registry.values import (
    BundleRecord,
    DesiredRecord,
    DeviceFilter,
    DeviceRecord,
    IngestResult,
    SeqState,
    StoredTelemetry,
    TelemetryEntry,
    bundle_record,
    desired_record,
    device_record,
)

__all__ = ["Registry"]


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
        self._writer = engine.execution_options(**{_engine.WRITE_OPTION: True})
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
        return cls(_engine.open_engine(url, echo=echo), clock=clock)

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
        with self._upgrade_lock, _engine.guard("migrating"), self._writer.begin() as conn:
            _engine.migrate(conn, self._dialect, run, revision)

    @staticmethod
    def head_revision() -> str:
        """The newest schema revision this code ships (what ``upgrade()`` migrates to)."""
        return _engine.head_revision()

    def current_revision(self) -> str | None:
        """The schema's Alembic revision (None for an empty database).

        Raises:
            RegistryUnavailableError: the database cannot be read.
        """
        with _engine.guard("reading the revision"), self._engine.connect() as conn:
            return _engine.current_revision(conn)

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

        Valid labels among ``tags`` (string values) also become operator labels
        (``registry.labels``): tags record the enrollment, labels are what selectors read.

        Raises:
            RegistryError: invalid device id or group.
            DeviceExistsError: the device is enrolled and not revoked.
            RegistryUnavailableError: the database failed.
        """
        check_device_id(device_id)
        check_label(group, "group")
        now = self._clock()
        with self.write_session("enrolling a device", DeviceExistsError) as s:
            record = _catalog.enroll_in(s, device_id, group, tags, cert_serial, now)
            _labels.seed_from_tags(s, device_id, tags)
            return record

    def revoke(self, device_id: str) -> DeviceRecord:
        """Mark a device revoked (idempotent: the first revocation time is kept).

        Raises:
            UnknownDeviceError: no such device.
            RegistryUnavailableError: the database failed.
        """
        with self.write_session("revoking a device") as s:
            return _catalog.revoke_in(s, device_id, self._clock)

    def get_device(self, device_id: str) -> DeviceRecord:
        """One device.

        Raises:
            UnknownDeviceError: no such device.
            RegistryUnavailableError: the database failed.
        """
        with self.read_session("reading a device") as s:
            return _catalog.device_in(s, device_id)

    def list_devices(
        self, *, group: str | None = None, include_revoked: bool = True
    ) -> list[DeviceRecord]:
        """Devices ordered by id, optionally of one group and without revoked ones.

        Raises:
            RegistryUnavailableError: the database failed.
        """
        stmt = _catalog.devices_stmt(group, include_revoked)
        with self.read_session("listing devices") as s:
            return [device_record(r) for r in s.scalars(stmt)]

    def device_page(self, query: DeviceFilter) -> tuple[list[DeviceRecord], int]:
        """One page of the devices ``query`` selects (ordered by id) and how many match in all.

        Raises:
            RegistryUnavailableError: the database failed.
        """
        page, count = _catalog.device_page_stmts(query)
        with self.read_session("listing a page of devices") as s:
            return [device_record(r) for r in s.scalars(page)], int(s.scalar(count) or 0)

    def active_versions(self) -> dict[tuple[str, int], int]:
        """How many devices (not revoked) report each ``(model, active version)``.

        Raises:
            RegistryUnavailableError: the database failed.
        """
        stmt = select(Device.reported).where(Device.revoked_at.is_(None))
        out: dict[tuple[str, int], int] = {}
        with self.read_session("counting versions in service") as s:
            for reported in s.scalars(stmt):
                models = (reported or {}).get("models")
                for name, m in (models if isinstance(models, dict) else {}).items():
                    active = m.get("active") if isinstance(m, dict) else None
                    if isinstance(active, int) and not isinstance(active, bool):
                        out[(str(name), active)] = out.get((str(name), active), 0) + 1
        return out

    def device_groups(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Every device's group and tags, by id (a column read: no reported documents).

        Raises:
            RegistryUnavailableError: the database failed.
        """
        stmt = select(Device.id, Device.group, Device.tags)
        with self.read_session("listing device groups") as s:
            return {str(i): (str(g), dict(t or {})) for i, g, t in s.execute(stmt)}

    def record_reported(self, device_id: str, state: Mapping[str, Any]) -> DeviceRecord:
        """Store the device's latest reported state (replacing the previous one).

        Its valid ``labels`` become the device's own labels (``registry.labels``; the
        operator's win on the same key); ``ReportedState`` already dropped and counted the
        invalid ones.

        Raises:
            UnknownDeviceError: no such device.
            DeviceRevokedError: the device is revoked.
            RegistryUnavailableError: the database failed.
        """
        now = self._clock()
        with self.write_session("recording reported state") as s:
            record = _catalog.record_reported_in(s, device_id, state, now)
            _labels.replace_source(s, device_id, "device", parse_labels(state.get("labels")).labels)
            return record

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
        row = _catalog.new_bundle(
            name,
            version,
            channel=channel,
            sha256=sha256,
            length=length,
            targets_sha256=targets_sha256,
            manifest=manifest,
            clock=self._clock,
        )
        try:
            with self.write_session("publishing a bundle", BundleExistsError) as s:
                s.add(row)
                s.flush()
                return bundle_record(row)
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
        stmt = _catalog.bundle_stmt(name, version)
        with self.read_session("reading a bundle") as s:
            row = s.scalars(stmt).one_or_none()
            if row is None:
                raise RegistryError(f"bundle {name} v{version} is not published")
            return bundle_record(row)

    def list_bundles(self, name: str | None = None) -> list[BundleRecord]:
        """Bundles ordered by name, then version.

        Raises:
            RegistryUnavailableError: the database failed.
        """
        stmt = _catalog.bundles_stmt(name)
        with self.read_session("listing bundles") as s:
            return [bundle_record(r) for r in s.scalars(stmt)]

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
        with self.write_session("assigning desired state") as s:
            return _catalog.assign_desired_in(s, device_id, build, at_least, self._clock)

    def latest_desired(self, device_id: str) -> DesiredRecord | None:
        """The device's newest desired-state document, if any.

        Raises:
            RegistryUnavailableError: the database failed.
        """
        stmt = _catalog.latest_desired_stmt(device_id)
        with self.read_session("reading desired state") as s:
            row = s.scalars(stmt).one_or_none()
            return None if row is None else desired_record(row)

    def latest_desired_all(self, *, page: int = 500) -> Iterator[DesiredRecord]:
        """The newest desired-state document of every device that is not revoked and has one,
        by device id: one query per ``page`` devices (not one per device), each in its own
        short read session, so a caller may stop at any time.

        Raises:
            RegistryUnavailableError: the database failed (what was yielded stands).
        """
        after = ""
        while True:
            stmt = _catalog.latest_desired_page_stmt(after, page)
            with self.read_session("reading desired states") as s:
                records = [desired_record(r) for r in s.scalars(stmt)]
            yield from records
            if len(records) < page:
                return
            after = records[-1].device_id

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
        rows = checked_rows(device_id, entries, floor)
        with self.write_session("ingesting telemetry") as s:
            return _ingest.ingest_one(s, self._dialect, device_id, rows, floor, self._clock())

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
        checked = _ingest.check_batches(batches)
        if all(isinstance(c, RegistryError) for c in checked):
            return [c for c in checked if isinstance(c, RegistryError)]
        now = self._clock()
        with self.write_session("ingesting telemetry") as s:
            return _ingest.ingest_set(s.connection(), self._dialect, batches, checked, now)

    def seq_state(self, device_id: str) -> SeqState:
        """The device's acknowledgement state (all zero before its first ingest).

        Raises:
            UnknownDeviceError: no such device.
            RegistryUnavailableError: the database failed.
        """
        with self.read_session("reading seq state") as s:
            return _catalog.seq_state_in(s, device_id)

    def telemetry(
        self,
        *,
        device_id: str | None = None,
        after_id: int | None = 0,
        limit: int = 100,
        kind: str | None = None,
    ) -> list[StoredTelemetry]:
        """Stored entries with ``id > after_id`` in insertion order (for ``telemetry tail``),
        optionally only one ``kind`` (``report`` or ``event``); ``after_id=None``: the newest
        ``limit`` entries (still oldest first in the list).

        Raises:
            RegistryUnavailableError: the database failed.
        """
        stmt = _catalog.telemetry_stmt(device_id, after_id, limit, kind)
        with self.read_session("reading telemetry") as s:
            rows = [_catalog.stored_telemetry(r) for r in s.scalars(stmt)]
        return rows if after_id is not None else rows[::-1]

    # ----------------------------------------------------------------- transactions
    # The seam for the repositories beside this one (``registry.rollouts``,
    # ``registry.version_history``, ``fleet_server.history``, ``fleet_server.jobs.history``):
    # they run their own statements in a transaction opened here.
    @contextmanager
    def write_session(
        self, doing: str, conflict: type[RegistryError] = RegistryUnavailableError
    ) -> Iterator[Session]:
        """One write transaction (``BEGIN IMMEDIATE`` on SQLite), committed on a clean exit.

        ``doing`` names the operation in the error a database failure becomes.

        Raises:
            RegistryUnavailableError: the database failed or is unreachable.
            RegistryError: ``conflict`` when the transaction breaks a uniqueness constraint.
        """
        with (
            _engine.guard(doing, conflict),
            Session(self._writer, expire_on_commit=False) as s,
            s.begin(),
        ):
            yield s

    @contextmanager
    def read_session(self, doing: str) -> Iterator[Session]:
        """One read transaction; ``doing`` names the operation in the error a failure becomes.

        Raises:
            RegistryUnavailableError: the database failed or is unreachable.
        """
        with (
            _engine.guard(doing),
            Session(self._engine, expire_on_commit=False) as s,
            s.begin(),
        ):
            yield s
