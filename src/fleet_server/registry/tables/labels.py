"""The label tables: device labels by source, label groups and maintenance windows.

Owns: the schema of ``device_labels``, ``label_groups`` and ``maintenance_windows`` on the
registry's ``Base`` (``orm``; the Alembic revision ``0009_labels`` creates them). Does not own:
the queries (``registry.labels``, ``registry._labels``) nor what a label, a selector or a
window is (``edge_agent.wire.ops.labels``, ``fleet_server.rollouts.label_selector``,
``fleet_server.rollouts.windows``).

A device has at most ``MAX_LABELS`` labels per ``source`` (``operator``: set through the admin
API; ``device``: from its reported state). ``effective`` marks the label a selector sees: the
operator's wins over the device's for the same key, so exactly one row per (device, key) is
effective. ``ix_device_labels_key_value`` serves every selector requirement (a key, or a key
and its values); the query keeps ``effective`` as a filter on the few rows a key matches.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from edge_agent.wire.ops.labels import MAX_KEY_CHARS, MAX_VALUE_CHARS
from fleet_server.registry.orm import ID_LEN, Base

__all__ = ["SOURCES", "DeviceLabelRow", "LabelGroupRow", "MaintenanceWindowRow"]

#: Who set a label; the first wins (``effective``) when both set a key.
SOURCES = ("operator", "device")


class DeviceLabelRow(Base):
    """One label of one device from one source."""

    __tablename__ = "device_labels"
    __table_args__ = (Index("ix_device_labels_key_value", "key", "value"),)

    device_id: Mapped[str] = mapped_column(
        String(ID_LEN), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    source: Mapped[str] = mapped_column(String(16), primary_key=True)
    key: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), primary_key=True)
    value: Mapped[str] = mapped_column(String(MAX_VALUE_CHARS))
    effective: Mapped[bool] = mapped_column(Boolean)


class LabelGroupRow(Base):
    """A named label selector: a group whose members are whatever devices match it now."""

    __tablename__ = "label_groups"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    selector: Mapped[str] = mapped_column(String(2048))
    updated_at: Mapped[datetime] = mapped_column()


class MaintenanceWindowRow(Base):
    """A recurring maintenance window (``MaintenanceWindow.to_dict()`` in ``definition``)."""

    __tablename__ = "maintenance_windows"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    definition: Mapped[dict[str, Any]] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column()
