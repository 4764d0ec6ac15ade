"""The capture tables: upload policies per model, per-device upload state, stored datasets.

Owns: the schema of ``capture_policies``, ``capture_devices`` and ``datasets`` on the
registry's ``Base`` (``orm``; the Alembic revision ``0011_capture_datasets`` creates them).
Does not own: the queries (``registry.datasets``), the dataset files (stored by digest in the
server's state directory, ``fleet_server.capture.store``) nor the upload workflow
(``fleet_server.capture.service``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, Float, String
from sqlalchemy.orm import Mapped, mapped_column

from fleet_server.registry.orm import ID_LEN, NAME_LEN, SHA256_LEN, Base

__all__ = ["CaptureDeviceRow", "CapturePolicyRow", "DatasetRow"]


class CapturePolicyRow(Base):
    """What an operator turned on for one model: cohort (selector), sampling, budgets, drops."""

    __tablename__ = "capture_policies"

    model: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean)
    #: ``{"group": name}`` or ``{"devices": [ids]}``; a label selector is one more key.
    selector: Mapped[dict[str, Any]] = mapped_column()
    sample_ppm: Mapped[int] = mapped_column(BigInteger)
    bytes_per_day: Mapped[int] = mapped_column(BigInteger)
    chunk_bytes: Mapped[int] = mapped_column(BigInteger)
    drop: Mapped[dict[str, Any]] = mapped_column()  # {"fields": [...]}
    updated_at: Mapped[datetime] = mapped_column()


class CaptureDeviceRow(Base):
    """One device's upload state for one model: the chunk to acknowledge, what arrived."""

    __tablename__ = "capture_devices"

    model: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    ack_sha256: Mapped[str] = mapped_column(String(SHA256_LEN))
    chunks: Mapped[int] = mapped_column(BigInteger)
    records: Mapped[int] = mapped_column(BigInteger)
    refused_chunks: Mapped[int] = mapped_column(BigInteger)
    refused_records: Mapped[int] = mapped_column(BigInteger)
    #: The device's own counts from its last answer (not sampled, evicted, ...).
    device_counts: Mapped[dict[str, Any]] = mapped_column()
    last_chunk_at: Mapped[datetime | None] = mapped_column()


class DatasetRow(Base):
    """A stored dataset (one accepted chunk, cleaned), content-addressed, with provenance."""

    __tablename__ = "datasets"

    sha256: Mapped[str] = mapped_column(String(SHA256_LEN), primary_key=True)
    model: Mapped[str] = mapped_column(String(NAME_LEN), index=True)
    length: Mapped[int] = mapped_column(BigInteger)
    records: Mapped[int] = mapped_column(BigInteger)
    rows: Mapped[int] = mapped_column(BigInteger)
    labelled_rows: Mapped[int] = mapped_column(BigInteger)
    time_from: Mapped[float] = mapped_column(Float)
    time_to: Mapped[float] = mapped_column(Float)
    #: devices, versions, inputs/outputs (name -> dtype and row shape), dropped fields,
    #: counts (refused records by reason, what the device left out), the chunk's own digest.
    provenance: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(index=True)
