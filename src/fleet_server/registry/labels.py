"""The registry's label repository: device labels, label groups and maintenance windows.

Owns every read and write of ``tables.labels``' tables through a ``Registry``'s sessions:
the operator's labels of a device (``set_labels``), a device's labels by source
(``device_labels``), effective labels of many devices (``labels_of``), devices a selector
matches (``select_devices``: one indexed query, never a scan of reported documents), label
groups (``define_group``, ``groups``, ``group``, ``delete_group``) and maintenance windows
(``put_window``, ``windows``, ``delete_window``). The device's own labels are written with its
reported state (``Registry.record_reported``).

Precedence: a device reports labels about itself (hostile input: only valid ones are kept,
the rest counted in ``labels_refused``); the operator's label of the same key wins. Both are
shown apart (``DeviceLabels``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from sqlalchemy import delete, select

from edge_agent.errors import ContractError
from edge_agent.wire.ops.labels import MAX_LABELS, check_labels
from fleet_server.errors import LabelError, UnknownLabelGroupError, UnknownWindowError
from fleet_server.registry import _labels
from fleet_server.registry._catalog import locked_device
from fleet_server.registry.store import Registry
from fleet_server.registry.tables.core import Device
from fleet_server.registry.tables.labels import LabelGroupRow, MaintenanceWindowRow
from fleet_server.registry.values import DeviceRecord, device_record
from fleet_server.rollouts.label_selector import LabelSelector
from fleet_server.rollouts.windows import MaintenanceWindow

__all__ = [
    "DeviceLabels",
    "LabelGroup",
    "define_group",
    "delete_group",
    "delete_window",
    "device_labels",
    "group",
    "groups",
    "labels_of",
    "put_window",
    "select_device_ids",
    "select_devices",
    "set_labels",
    "windows",
]

_NAME: Final = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?")


@dataclass(frozen=True)
class DeviceLabels:
    """A device's labels: the operator's, the device's own, the effective merge (what
    selectors see) and how many entries of its last reported state were refused."""

    device_id: str
    operator: Mapping[str, str] = field(default_factory=dict)
    device: Mapping[str, str] = field(default_factory=dict)
    refused: int = 0

    @property
    def effective(self) -> dict[str, str]:
        """The device's labels overridden by the operator's."""
        return {**self.device, **self.operator}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (the admin API's form)."""
        return {
            "device_id": self.device_id,
            "operator": dict(self.operator),
            "device": dict(self.device),
            "effective": self.effective,
            "refused": self.refused,
        }


@dataclass(frozen=True)
class LabelGroup:
    """A named selector; its members are the devices it matches now."""

    name: str
    selector: LabelSelector
    updated_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {
            "name": self.name,
            "selector": str(self.selector),
            "updated_at": self.updated_at.isoformat(),
        }


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise LabelError(f"{what} name {str(name)[:80]!r} is not 1-64 of [a-z0-9._-]")
    return name


def set_labels(
    registry: Registry,
    device_id: str,
    add: Mapping[str, str],
    remove: Sequence[str] = (),
) -> DeviceLabels:
    """Set (``add``) and remove operator labels of a device; returns its labels after.

    Raises:
        LabelError: a bad key or value, or more than ``MAX_LABELS`` operator labels after.
        UnknownDeviceError: no such device.
        RegistryUnavailableError: the database failed.
    """
    try:
        add = check_labels(add, "labels")
    except ContractError as exc:
        raise LabelError(str(exc)) from exc
    with registry.write_session("setting labels") as s:
        locked_device(s, device_id)
        current = _labels.source_in(s, device_id, "operator")
        new = {k: v for k, v in {**current, **add}.items() if k not in set(remove)}
        if len(new) > MAX_LABELS:
            raise LabelError(f"a device has at most {MAX_LABELS} operator labels")
        _labels.replace_source(s, device_id, "operator", new)
    return device_labels(registry, device_id)


def device_labels(registry: Registry, device_id: str) -> DeviceLabels:
    """A device's labels by source.

    Raises:
        UnknownDeviceError: no such device.
        RegistryUnavailableError: the database failed.
    """
    with registry.read_session("reading labels") as s:
        row = s.get(Device, device_id)
        if row is None:
            locked_device(s, device_id)  # raises UnknownDeviceError
        refused = (row.reported or {}).get("labels_refused", 0) if row is not None else 0
        return DeviceLabels(
            device_id,
            _labels.source_in(s, device_id, "operator"),
            _labels.source_in(s, device_id, "device"),
            refused if isinstance(refused, int) else 0,
        )


def labels_of(registry: Registry, device_ids: Sequence[str] | None) -> dict[str, dict[str, str]]:
    """Effective labels by device id (None: every device); devices without labels are absent.

    Raises:
        RegistryUnavailableError: the database failed.
    """
    with registry.read_session("reading labels") as s:
        return _labels.effective_in(s, device_ids)


def select_devices(
    registry: Registry, selector: LabelSelector, *, include_revoked: bool = True
) -> list[DeviceRecord]:
    """Devices whose effective labels ``selector`` matches, ordered by id (one query over the
    ``(key, value)`` index).

    Raises:
        RegistryUnavailableError: the database failed.
    """
    stmt = select(Device).where(*_labels.selector_clauses(selector)).order_by(Device.id)
    if not include_revoked:
        stmt = stmt.where(Device.revoked_at.is_(None))
    with registry.read_session("selecting devices") as s:
        return [device_record(r) for r in s.scalars(stmt)]


def select_device_ids(
    registry: Registry, selector: LabelSelector, *, include_revoked: bool = True
) -> list[str]:
    """``select_devices``' ids only (no device rows built: the cheap form for counts).

    Raises:
        RegistryUnavailableError: the database failed.
    """
    stmt = select(Device.id).where(*_labels.selector_clauses(selector)).order_by(Device.id)
    if not include_revoked:
        stmt = stmt.where(Device.revoked_at.is_(None))
    with registry.read_session("selecting devices") as s:
        return [str(i) for i in s.scalars(stmt)]


# --------------------------------------------------------------------------- groups
def define_group(
    registry: Registry, name: str, selector: LabelSelector, at: datetime
) -> LabelGroup:
    """Define (or redefine) the label group ``name``.

    Raises:
        LabelError: a bad name.
        RegistryUnavailableError: the database failed.
    """
    _check_name(name, "label group")
    now = at
    with registry.write_session("defining a label group") as s:
        row = s.get(LabelGroupRow, name, with_for_update=True)
        if row is None:
            s.add(LabelGroupRow(name=name, selector=str(selector), updated_at=now))
        else:
            row.selector, row.updated_at = str(selector), now
    return LabelGroup(name, selector, now)


def group(registry: Registry, name: str) -> LabelGroup:
    """One label group.

    Raises:
        UnknownLabelGroupError: no such group.
        RegistryUnavailableError: the database failed.
    """
    with registry.read_session("reading a label group") as s:
        row = s.get(LabelGroupRow, name)
        if row is None:
            raise UnknownLabelGroupError(f"no label group {name[:64]!r}")
        return LabelGroup(row.name, LabelSelector.parse(row.selector), row.updated_at)


def groups(registry: Registry) -> list[LabelGroup]:
    """Every label group by name. Raises: RegistryUnavailableError."""
    with registry.read_session("listing label groups") as s:
        rows = s.scalars(select(LabelGroupRow).order_by(LabelGroupRow.name))
        return [LabelGroup(r.name, LabelSelector.parse(r.selector), r.updated_at) for r in rows]


def delete_group(registry: Registry, name: str) -> None:
    """Delete a label group (running rollouts keep the selector they copied).

    Raises:
        UnknownLabelGroupError: no such group.
        RegistryUnavailableError: the database failed.
    """
    with registry.write_session("deleting a label group") as s:
        if s.execute(delete(LabelGroupRow).where(LabelGroupRow.name == name)).rowcount == 0:  # type: ignore[attr-defined]
            raise UnknownLabelGroupError(f"no label group {name[:64]!r}")


# --------------------------------------------------------------------------- windows
def put_window(registry: Registry, window: MaintenanceWindow, at: datetime) -> MaintenanceWindow:
    """Define (or redefine) a maintenance window by its name.

    Raises:
        RegistryUnavailableError: the database failed.
    """
    now = at
    with registry.write_session("defining a maintenance window") as s:
        row = s.get(MaintenanceWindowRow, window.name, with_for_update=True)
        if row is None:
            s.add(
                MaintenanceWindowRow(name=window.name, definition=window.to_dict(), updated_at=now)
            )
        else:
            row.definition, row.updated_at = window.to_dict(), now
    return window


def windows(registry: Registry) -> list[MaintenanceWindow]:
    """Every maintenance window by name. Raises: RegistryUnavailableError."""
    with registry.read_session("listing maintenance windows") as s:
        rows = s.scalars(select(MaintenanceWindowRow).order_by(MaintenanceWindowRow.name))
        return [MaintenanceWindow.from_dict(r.definition) for r in rows]


def delete_window(registry: Registry, name: str) -> None:
    """Delete a maintenance window.

    Raises:
        UnknownWindowError: no such window.
        RegistryUnavailableError: the database failed.
    """
    with registry.write_session("deleting a maintenance window") as s:
        stmt = delete(MaintenanceWindowRow).where(MaintenanceWindowRow.name == name)
        if s.execute(stmt).rowcount == 0:  # type: ignore[attr-defined]
            raise UnknownWindowError(f"no maintenance window {name[:64]!r}")
