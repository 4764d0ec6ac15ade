"""Label statements inside a registry transaction: write a source's labels, read, select.

Owns: replacing one source's labels of a device and re-marking which row is ``effective``
(the operator's wins), reading effective labels, and turning a ``LabelSelector`` into a WHERE
clause on ``devices.id`` over the ``(key, value)`` index. Runs in a session opened by
``Registry`` (``store``); does not open transactions, check operator input
(``registry.labels``) nor parse reported documents (``edge_agent.wire.ops.labels``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from sqlalchemy import ColumnElement, delete, select
from sqlalchemy.orm import Session

from edge_agent.wire.ops.labels import parse_labels
from fleet_server.registry.tables.core import Device
from fleet_server.registry.tables.labels import DeviceLabelRow
from fleet_server.rollouts.label_selector import LabelSelector

__all__ = ["effective_in", "replace_source", "seed_from_tags", "selector_clauses", "source_in"]

_CHUNK: Final = 5000


def replace_source(s: Session, device_id: str, source: str, labels: Mapping[str, str]) -> None:
    """Make ``labels`` the device's labels from ``source`` (checked by the caller), then mark
    the effective row of every key (the operator's when both set it)."""
    rows = {
        (r.source, r.key): r
        for r in s.scalars(select(DeviceLabelRow).where(DeviceLabelRow.device_id == device_id))
    }
    current = {k: r.value for (src, k), r in rows.items() if src == source}
    if current == dict(labels):
        return
    s.execute(
        delete(DeviceLabelRow).where(
            DeviceLabelRow.device_id == device_id, DeviceLabelRow.source == source
        )
    )
    others = {k: r for (src, k), r in rows.items() if src != source}
    for key, value in labels.items():
        s.add(
            DeviceLabelRow(
                device_id=device_id,
                source=source,
                key=key,
                value=value,
                effective=source == "operator" or key not in others,
            )
        )
    for key, r in others.items():
        # The operator's row is always effective; a device's row only without one.
        r.effective = r.source == "operator" or (source != "operator" or key not in labels)
    s.flush()


def seed_from_tags(s: Session, device_id: str, tags: Mapping[str, Any] | None) -> None:
    """Copy the valid labels among enrollment ``tags`` into the operator's labels (kept
    alongside the ones already set)."""
    seeded = parse_labels(tags).labels
    if seeded:
        merged = {**source_in(s, device_id, "operator"), **seeded}
        replace_source(s, device_id, "operator", dict(list(merged.items())[:32]))


def source_in(s: Session, device_id: str, source: str) -> dict[str, str]:
    """One source's labels of a device, by key."""
    stmt = select(DeviceLabelRow.key, DeviceLabelRow.value).where(
        DeviceLabelRow.device_id == device_id, DeviceLabelRow.source == source
    )
    return {str(k): str(v) for k, v in s.execute(stmt.order_by(DeviceLabelRow.key))}


def effective_in(s: Session, device_ids: Iterable[str] | None) -> dict[str, dict[str, str]]:
    """Effective labels by device (every device when ``device_ids`` is None; devices without
    labels are absent)."""
    stmt = select(DeviceLabelRow.device_id, DeviceLabelRow.key, DeviceLabelRow.value).where(
        DeviceLabelRow.effective.is_(True)
    )
    ids = None if device_ids is None else sorted(set(device_ids))
    out: dict[str, dict[str, str]] = {}
    # Bounded IN lists (SQLite allows 32766 parameters); a few round trips for a large fleet.
    chunks = [None] if ids is None else [ids[i : i + _CHUNK] for i in range(0, len(ids), _CHUNK)]
    for chunk in chunks:
        q = stmt if chunk is None else stmt.where(DeviceLabelRow.device_id.in_(chunk))
        for d, k, v in s.execute(q):
            out.setdefault(str(d), {})[str(k)] = str(v)
    return out


def selector_clauses(selector: LabelSelector) -> list[ColumnElement[bool]]:
    """WHERE clauses on ``devices.id``, one per requirement, all to hold (Kubernetes semantics:
    ``!=``, ``notin`` and ``!k`` also match devices without the key)."""
    out: list[ColumnElement[bool]] = []
    for req in selector.requirements:
        having = select(DeviceLabelRow.device_id).where(
            DeviceLabelRow.key == req.key, DeviceLabelRow.effective.is_(True)
        )
        if req.values:
            having = having.where(DeviceLabelRow.value.in_(req.values))
        positive = req.op in ("=", "in", "exists")
        out.append(Device.id.in_(having) if positive else Device.id.not_in(having))
    return out
