"""The registry's record types: frozen values handed out by ``Registry``, and row converters.

Owns: ``DeviceRecord``, ``BundleRecord``, ``DesiredRecord``, ``TelemetryEntry``,
``StoredTelemetry``, ``SeqState`` and ``IngestResult``, plus the functions that copy an ORM row
into its record (so no session-bound object ever leaves a transaction). Does not own: the schema
(``models``) nor any query (``store`` and its helpers).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fleet_server.registry.tables.core import Bundle, DesiredStateRow, Device
from fleet_server.rollouts.label_selector import LabelSelector

__all__ = [
    "BundleRecord",
    "DesiredRecord",
    "DeviceFilter",
    "DeviceRecord",
    "IngestResult",
    "SeqState",
    "StoredTelemetry",
    "TelemetryEntry",
    "bundle_record",
    "desired_record",
    "device_record",
]


@dataclass(frozen=True)
class DeviceFilter:
    """A page of the device list: every field that is set must match.

    Attributes:
        group: the device's group.
        tag: ``(key, value)``: the device's tag ``key`` has the string value ``value``.
        revoked: True only revoked devices, False only active ones, None both.
        online_ids: only these ids (the gateway's online set); ``exclude_online``: all but them.
        model: with ``version``: devices that report ``model`` active at ``version``; alone:
            devices that report ``model`` at all.
        selector: a label selector the device's effective labels match.
        offset, limit: the page (ordered by id).
    """

    group: str | None = None
    tag: tuple[str, str] | None = None
    revoked: bool | None = None
    online_ids: frozenset[str] | None = None
    exclude_online: bool = False
    model: str | None = None
    version: int | None = None
    selector: LabelSelector | None = None
    offset: int = 0
    limit: int = 50


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


def device_record(r: Device) -> DeviceRecord:
    """Copy a ``devices`` row into a ``DeviceRecord``."""
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


def bundle_record(r: Bundle) -> BundleRecord:
    """Copy a ``bundles`` row into a ``BundleRecord``."""
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


def desired_record(r: DesiredStateRow) -> DesiredRecord:
    """Copy a ``desired_states`` row into a ``DesiredRecord``."""
    return DesiredRecord(
        device_id=r.device_id, version=r.version, document=r.document, created_at=r.created_at
    )
