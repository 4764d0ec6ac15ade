"""Capture policies, per-device upload state and datasets: the queries.

Owns: ``CapturePolicy``, ``CaptureDeviceState`` and ``DatasetRecord`` (the values the rest of
the server sees) and the queries on ``capture_models``. Each function runs in one of the
``Registry``'s transactions; database failures raise ``RegistryUnavailableError``. Does not
own the dataset files (``fleet_server.capture.store``) or decide anything (``fleet_server.
capture.service``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from fleet_server.errors import UnknownDatasetError
from fleet_server.registry.store import Registry
from fleet_server.registry.tables.capture import CaptureDeviceRow, CapturePolicyRow, DatasetRow

__all__ = [
    "CaptureDeviceState",
    "CapturePolicy",
    "DatasetRecord",
    "add_dataset",
    "capture_devices",
    "capture_policies",
    "capture_policy",
    "get_dataset",
    "list_datasets",
    "put_capture_policy",
    "record_chunk",
]


@dataclass(frozen=True)
class CapturePolicy:
    """What an operator turned on for one model."""

    model: str
    enabled: bool
    selector: dict[str, Any]
    sample_ppm: int
    bytes_per_day: int
    chunk_bytes: int
    drop: tuple[str, ...]
    updated_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (the admin API's shape)."""
        return {
            "model": self.model,
            "enabled": self.enabled,
            "selector": self.selector,
            "sample_ppm": self.sample_ppm,
            "bytes_per_day": self.bytes_per_day,
            "chunk_bytes": self.chunk_bytes,
            "drop": list(self.drop),
            "updated_at": self.updated_at.isoformat(),
        }


@dataclass(frozen=True)
class CaptureDeviceState:
    """One device's upload state for one model."""

    model: str
    device_id: str
    ack_sha256: str
    chunks: int
    records: int
    refused_chunks: int
    refused_records: int
    device_counts: dict[str, int]
    last_chunk_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {
            "model": self.model,
            "device_id": self.device_id,
            "ack_sha256": self.ack_sha256,
            "chunks": self.chunks,
            "records": self.records,
            "refused_chunks": self.refused_chunks,
            "refused_records": self.refused_records,
            "device_counts": self.device_counts,
            "last_chunk_at": None if self.last_chunk_at is None else self.last_chunk_at.isoformat(),
        }


@dataclass(frozen=True)
class DatasetRecord:
    """A stored dataset and its provenance."""

    sha256: str
    model: str
    length: int
    records: int
    rows: int
    labelled_rows: int
    time_from: float
    time_to: float
    created_at: datetime
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (the admin API's shape)."""
        return {
            "sha256": self.sha256,
            "model": self.model,
            "length": self.length,
            "records": self.records,
            "rows": self.rows,
            "labelled_rows": self.labelled_rows,
            "time_from": self.time_from,
            "time_to": self.time_to,
            "created_at": self.created_at.isoformat(),
            "provenance": self.provenance,
        }


def _policy(row: CapturePolicyRow) -> CapturePolicy:
    return CapturePolicy(
        row.model,
        row.enabled,
        dict(row.selector),
        row.sample_ppm,
        row.bytes_per_day,
        row.chunk_bytes,
        tuple(row.drop.get("fields", ())),
        row.updated_at,
    )


def _device(row: CaptureDeviceRow) -> CaptureDeviceState:
    return CaptureDeviceState(
        row.model,
        row.device_id,
        row.ack_sha256,
        row.chunks,
        row.records,
        row.refused_chunks,
        row.refused_records,
        dict(row.device_counts),
        row.last_chunk_at,
    )


def _dataset(row: DatasetRow) -> DatasetRecord:
    return DatasetRecord(
        row.sha256,
        row.model,
        row.length,
        row.records,
        row.rows,
        row.labelled_rows,
        row.time_from,
        row.time_to,
        row.created_at,
        dict(row.provenance),
    )


def put_capture_policy(registry: Registry, policy: CapturePolicy) -> CapturePolicy:
    """Create or replace the policy of ``policy.model``.

    Raises:
        RegistryUnavailableError: the database failed.
    """
    with registry.write_session("saving a capture policy") as s:
        row = s.get(CapturePolicyRow, policy.model)
        if row is None:
            row = CapturePolicyRow(model=policy.model)
            s.add(row)
        row.enabled = policy.enabled
        row.selector = dict(policy.selector)
        row.sample_ppm = policy.sample_ppm
        row.bytes_per_day = policy.bytes_per_day
        row.chunk_bytes = policy.chunk_bytes
        row.drop = {"fields": list(policy.drop)}
        row.updated_at = policy.updated_at
    return policy


def capture_policy(registry: Registry, model: str) -> CapturePolicy | None:
    """The policy of ``model``, if any.

    Raises:
        RegistryUnavailableError: the database failed.
    """
    with registry.read_session("reading a capture policy") as s:
        row = s.get(CapturePolicyRow, model)
        return None if row is None else _policy(row)


def capture_policies(registry: Registry) -> list[CapturePolicy]:
    """Every policy, by model name.

    Raises:
        RegistryUnavailableError: the database failed.
    """
    with registry.read_session("listing capture policies") as s:
        return [_policy(r) for r in s.scalars(select(CapturePolicyRow).order_by("model"))]


def capture_devices(registry: Registry, model: str) -> list[CaptureDeviceState]:
    """The upload state of every device that answered for ``model``.

    Raises:
        RegistryUnavailableError: the database failed.
    """
    with registry.read_session("reading capture upload state") as s:
        stmt = (
            select(CaptureDeviceRow)
            .where(CaptureDeviceRow.model == model)
            .order_by(CaptureDeviceRow.device_id)
        )
        return [_device(r) for r in s.scalars(stmt)]


def record_chunk(
    registry: Registry,
    model: str,
    device_id: str,
    *,
    ack_sha256: str | None = None,
    records: int = 0,
    refused_records: int = 0,
    refused: bool = False,
    device_counts: dict[str, int] | None = None,
    at: datetime | None = None,
) -> CaptureDeviceState:
    """Add what one chunk (or one answer) brought to a device's upload state.

    Raises:
        RegistryUnavailableError: the database failed.
    """
    with registry.write_session("recording a capture chunk") as s:
        row = s.get(CaptureDeviceRow, (model, device_id))
        if row is None:
            row = CaptureDeviceRow(
                model=model,
                device_id=device_id,
                ack_sha256="",
                chunks=0,
                records=0,
                refused_chunks=0,
                refused_records=0,
                device_counts={},
                last_chunk_at=None,
            )
            s.add(row)
        if ack_sha256 is not None:
            row.ack_sha256 = ack_sha256
            if refused:
                row.refused_chunks += 1
            else:
                row.chunks += 1
            row.last_chunk_at = at
        row.records += records
        row.refused_records += refused_records
        if device_counts is not None:
            row.device_counts = dict(device_counts)
        s.flush()
        return _device(row)


def add_dataset(registry: Registry, record: DatasetRecord) -> tuple[DatasetRecord, bool]:
    """Store ``record``; the stored one and whether it is new (same digest: the first stays).

    Raises:
        RegistryUnavailableError: the database failed.
    """
    with registry.write_session("storing a dataset") as s:
        row = s.get(DatasetRow, record.sha256)
        if row is not None:
            return _dataset(row), False
        s.add(
            DatasetRow(
                sha256=record.sha256,
                model=record.model,
                length=record.length,
                records=record.records,
                rows=record.rows,
                labelled_rows=record.labelled_rows,
                time_from=record.time_from,
                time_to=record.time_to,
                provenance=record.provenance,
                created_at=record.created_at,
            )
        )
    return record, True


def list_datasets(
    registry: Registry, model: str | None = None, limit: int = 200
) -> list[DatasetRecord]:
    """Datasets (of ``model``, or all), newest first.

    Raises:
        RegistryUnavailableError: the database failed.
    """
    with registry.read_session("listing datasets") as s:
        stmt = select(DatasetRow).order_by(DatasetRow.created_at.desc()).limit(limit)
        if model is not None:
            stmt = stmt.where(DatasetRow.model == model)
        return [_dataset(r) for r in s.scalars(stmt)]


def datasets_in_range(
    registry: Registry, model: str, since: float, until: float, limit: int
) -> list[DatasetRecord]:
    """Datasets of ``model`` holding records between ``since`` and ``until`` (Unix seconds),
    oldest records first, at most ``limit``.

    Raises:
        RegistryUnavailableError: the database failed.
    """
    with registry.read_session("listing datasets") as s:
        stmt = (
            select(DatasetRow)
            .where(
                DatasetRow.model == model,
                DatasetRow.time_to >= since,
                DatasetRow.time_from <= until,
            )
            .order_by(DatasetRow.time_from, DatasetRow.sha256)
            .limit(limit)
        )
        return [_dataset(r) for r in s.scalars(stmt)]


def get_dataset(registry: Registry, sha256: str) -> DatasetRecord:
    """One dataset.

    Raises:
        UnknownDatasetError: no dataset with this digest.
        RegistryUnavailableError: the database failed.
    """
    with registry.read_session("reading a dataset") as s:
        row = s.get(DatasetRow, sha256)
        if row is None:
            raise UnknownDatasetError(f"no dataset {sha256[:64]!r}")
        return _dataset(row)
