"""The registry's statements other than telemetry ingest, for ``Registry`` to run.

Owns: what enrolling, revoking, recording reported state, publishing a bundle and assigning a
desired-state document do to the rows (given a session ``Registry`` opened, and its clock), and
the queries behind the device, bundle, desired-state, seq-state and telemetry reads. Does not
own: sessions, transactions or error mapping (``store.Registry``), nor telemetry ingest
(``_ingest``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from fleet_server.errors import (
    DeviceExistsError,
    DeviceRevokedError,
    RegistryError,
    UnknownDeviceError,
)
from fleet_server.registry._checks import MAX_SEQ, check_label, check_sha256
from fleet_server.registry._labels import selector_clauses
from fleet_server.registry.tables.core import (
    Bundle,
    DesiredStateRow,
    Device,
    DeviceSeq,
    TelemetryRow,
)
from fleet_server.registry.values import (
    DesiredRecord,
    DeviceFilter,
    DeviceRecord,
    SeqState,
    StoredTelemetry,
    desired_record,
    device_record,
)

__all__ = [
    "assign_desired_in",
    "bundle_stmt",
    "bundles_stmt",
    "device_in",
    "device_page_stmts",
    "devices_stmt",
    "enroll_in",
    "latest_desired_stmt",
    "locked_device",
    "new_bundle",
    "record_reported_in",
    "revoke_in",
    "seq_state_in",
    "stored_telemetry",
    "telemetry_stmt",
]


def locked_device(s: Session, device_id: str) -> Device:
    """The device's row, locked for this transaction.

    Raises:
        UnknownDeviceError: no such device.
    """
    row = s.get(Device, device_id, with_for_update=True)
    if row is None:
        raise UnknownDeviceError(f"device {device_id!r} is not enrolled")
    return row


def enroll_in(
    s: Session,
    device_id: str,
    group: str,
    tags: Mapping[str, Any] | None,
    cert_serial: str | None,
    now: datetime,
) -> DeviceRecord:
    """Enroll (or re-enroll a revoked) device; see ``Registry.enroll``.

    Raises:
        DeviceExistsError: the device is enrolled and not revoked.
    """
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
    return device_record(row)


def revoke_in(s: Session, device_id: str, clock: Callable[[], datetime]) -> DeviceRecord:
    """Mark the device revoked unless it already is (the clock is read only then).

    Raises:
        UnknownDeviceError: no such device.
    """
    row = locked_device(s, device_id)
    if row.revoked_at is None:
        row.revoked_at = clock()
    return device_record(row)


def record_reported_in(
    s: Session, device_id: str, state: Mapping[str, Any], now: datetime
) -> DeviceRecord:
    """Replace the device's reported state; see ``Registry.record_reported``.

    Raises:
        UnknownDeviceError: no such device.
        DeviceRevokedError: the device is revoked.
    """
    row = locked_device(s, device_id)
    if row.revoked_at is not None:
        raise DeviceRevokedError(f"device {device_id!r} is revoked")
    row.reported = dict(state)
    row.reported_at = now
    row.last_seen = now
    return device_record(row)


def new_bundle(
    name: str,
    version: int,
    *,
    channel: str,
    sha256: str,
    length: int,
    targets_sha256: str,
    manifest: Mapping[str, Any] | None,
    clock: Callable[[], datetime],
) -> Bundle:
    """Check the fields of a bundle to publish, then build its (unsaved) row.

    Raises:
        RegistryError: a malformed field (name, version, digest, length).
    """
    check_label(name, "bundle name")
    check_label(channel, "channel")
    check_sha256(sha256, "sha256")
    check_sha256(targets_sha256, "targets_sha256")
    if not 0 <= version <= MAX_SEQ or not 0 < length <= MAX_SEQ:
        raise RegistryError("bundle version must be >= 0 and length > 0")
    return Bundle(
        name=name,
        version=version,
        channel=channel,
        sha256=sha256,
        length=length,
        targets_sha256=targets_sha256,
        manifest=dict(manifest or {}),
        published_at=clock(),
    )


def assign_desired_in(
    s: Session,
    device_id: str,
    build: Callable[[int], bytes],
    at_least: int,
    clock: Callable[[], datetime],
) -> DesiredRecord:
    """Store the device's next desired-state document; see ``Registry.assign_desired``.

    Raises:
        UnknownDeviceError: no such device.
        DeviceRevokedError: the device is revoked.
        RegistryError: ``build`` returned something other than non-empty bytes.
        Exception: whatever ``build`` raises propagates.
    """
    dev = locked_device(s, device_id)
    if dev.revoked_at is not None:
        raise DeviceRevokedError(f"device {device_id!r} is revoked")
    last = s.scalar(
        select(func.max(DesiredStateRow.version)).where(DesiredStateRow.device_id == device_id)
    )
    version = max((last or 0) + 1, at_least)
    document = build(version)
    if not isinstance(document, bytes) or not document:
        raise RegistryError("desired-state builder must return non-empty bytes")
    row = DesiredStateRow(
        device_id=device_id, version=version, document=document, created_at=clock()
    )
    s.add(row)
    s.flush()
    return desired_record(row)


# --------------------------------------------------------------------------- reads
def device_in(s: Session, device_id: str) -> DeviceRecord:
    """One device, without locking it.

    Raises:
        UnknownDeviceError: no such device.
    """
    row = s.get(Device, device_id)
    if row is None:
        raise UnknownDeviceError(f"device {device_id!r} is not enrolled")
    return device_record(row)


def devices_stmt(group: str | None, include_revoked: bool) -> Select[Device]:
    """Devices ordered by id, optionally of one group and without revoked ones."""
    stmt = select(Device).order_by(Device.id)
    if group is not None:
        stmt = stmt.where(Device.group == group)
    if not include_revoked:
        stmt = stmt.where(Device.revoked_at.is_(None))
    return stmt


def device_page_stmts(f: DeviceFilter) -> tuple[Select[Device], Select[int]]:
    """The page of devices ``f`` selects (ordered by id) and the count of all that match.

    Every condition is SQL (JSON paths for tags and reported versions, on SQLite and
    PostgreSQL alike), so a page costs one indexed query whatever the fleet's size.
    """
    conds: list[Any] = []
    if f.group is not None:
        conds.append(Device.group == f.group)
    if f.tag is not None:
        conds.append(Device.tags[f.tag[0]].as_string() == f.tag[1])
    if f.revoked is not None:
        conds.append(Device.revoked_at.is_not(None) if f.revoked else Device.revoked_at.is_(None))
    if f.online_ids is not None:
        ids = sorted(f.online_ids)
        conds.append(Device.id.not_in(ids) if f.exclude_online else Device.id.in_(ids))
    if f.model is not None:
        active = Device.reported["models"][f.model]["active"]
        conds.append(
            active.as_integer() == f.version
            if f.version is not None
            else active.as_integer().is_not(None)
        )
    if f.selector is not None:
        conds.extend(selector_clauses(f.selector))
    page = select(Device).where(*conds).order_by(Device.id).offset(f.offset).limit(f.limit)
    count = select(func.count()).select_from(Device).where(*conds)
    return page, count


def bundle_stmt(name: str, version: int) -> Select[Bundle]:
    """The bundle ``name`` at ``version`` (at most one)."""
    return select(Bundle).where(Bundle.name == name, Bundle.version == version)


def bundles_stmt(name: str | None) -> Select[Bundle]:
    """Bundles ordered by name, then version, optionally of one name."""
    stmt = select(Bundle).order_by(Bundle.name, Bundle.version)
    if name is not None:
        stmt = stmt.where(Bundle.name == name)
    return stmt


def latest_desired_stmt(device_id: str) -> Select[DesiredStateRow]:
    """The device's newest desired-state row (at most one)."""
    return (
        select(DesiredStateRow)
        .where(DesiredStateRow.device_id == device_id)
        .order_by(DesiredStateRow.version.desc())
        .limit(1)
    )


def latest_desired_page_stmt(after: str, limit: int) -> Select[DesiredStateRow]:
    """The newest desired-state row of each device that is not revoked, ordered by device id,
    of the devices after ``after`` (keyset paging): one statement for ``limit`` devices."""
    newest = (
        select(DesiredStateRow.device_id, func.max(DesiredStateRow.version).label("version"))
        .join(Device, Device.id == DesiredStateRow.device_id)
        .where(Device.revoked_at.is_(None), DesiredStateRow.device_id > after)
        .group_by(DesiredStateRow.device_id)
        .order_by(DesiredStateRow.device_id)
        .limit(limit)
        .subquery()
    )
    return (
        select(DesiredStateRow)
        .join(
            newest,
            (DesiredStateRow.device_id == newest.c.device_id)
            & (DesiredStateRow.version == newest.c.version),
        )
        .order_by(DesiredStateRow.device_id)
    )


def seq_state_in(s: Session, device_id: str) -> SeqState:
    """The device's acknowledgement state (all zero before its first ingest).

    Raises:
        UnknownDeviceError: no such device.
    """
    if s.get(Device, device_id) is None:
        raise UnknownDeviceError(f"device {device_id!r} is not enrolled")
    row = s.get(DeviceSeq, device_id)
    if row is None:
        return SeqState(device_id, 0, 0, 0, 0)
    return SeqState(device_id, row.acked_upto, row.gaps, row.lost, row.duplicates)


def telemetry_stmt(
    device_id: str | None, after_id: int | None, limit: int, kind: str | None = None
) -> Select[TelemetryRow]:
    """Stored entries with ``id > after_id`` in insertion order, at most ``limit`` (1-10,000),
    optionally of one device and one kind (``report``, ``event``); ``after_id`` None: the
    NEWEST ``limit`` entries, newest first (the caller reverses them)."""
    stmt = select(TelemetryRow)
    if after_id is not None:
        stmt = stmt.where(TelemetryRow.id > after_id)
    if device_id is not None:
        stmt = stmt.where(TelemetryRow.device_id == device_id)
    if kind is not None:
        stmt = stmt.where(TelemetryRow.kind == kind)
    order = TelemetryRow.id if after_id is not None else TelemetryRow.id.desc()
    return stmt.order_by(order).limit(max(1, min(limit, 10_000)))


def stored_telemetry(r: TelemetryRow) -> StoredTelemetry:
    """Copy a ``telemetry`` row into a ``StoredTelemetry``."""
    return StoredTelemetry(r.id, r.device_id, r.seq, r.kind, r.received_at, r.payload, r.epoch)
