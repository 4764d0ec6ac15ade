"""Argument checks of the registry: pure functions that take values and return values or raise.

Owns: the limits (``MAX_SEQ``, ``MAX_INGEST_ITEMS``), device id / label / digest checks, and
turning telemetry entries into checked insert rows (``checked_rows``). Does not own: any database
access (``store``, ``_ingest``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from edge_agent.errors import IdentityError
from edge_agent.ids import validate_device_id
from edge_agent.wire.telemetry import Event, TelemetryReport
from fleet_server.errors import RegistryError, TelemetryRejectedError
from fleet_server.registry.values import TelemetryEntry

__all__ = [
    "MAX_INGEST_ITEMS",
    "MAX_SEQ",
    "check_device_id",
    "check_label",
    "check_sha256",
    "checked_rows",
]

MAX_SEQ: Final = 2**63 - 1
MAX_INGEST_ITEMS: Final = 4096
_LABEL_MAX: Final = 128
_SHA256_HEX: Final = frozenset("0123456789abcdef")


def checked_rows(
    device_id: str,
    entries: Sequence[TelemetryReport | Event | TelemetryEntry],
    floor: int | None,
) -> list[dict[str, Any]]:
    """``_rows`` plus the floor checks (see ``Registry.ingest``).

    Raises:
        TelemetryRejectedError: too many entries, a bad entry or seq, or a bad floor.
    """
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


def check_device_id(device_id: str) -> None:
    """Check a device id with the agent's own rule.

    Raises:
        RegistryError: not a valid device id (``edge_agent.common.identity``).
    """
    try:
        validate_device_id(device_id)
    except IdentityError as exc:
        raise RegistryError(str(exc)) from exc


def check_label(value: str, what: str) -> None:
    """Check a name-like field (group, channel, bundle name); ``what`` names it in the error.

    Raises:
        RegistryError: ``value`` is not 1-128 printable characters.
    """
    if not isinstance(value, str) or not 1 <= len(value) <= _LABEL_MAX or not value.isprintable():
        raise RegistryError(f"{what} must be 1-{_LABEL_MAX} printable characters")


def check_sha256(value: str, what: str) -> None:
    """Check a SHA-256 hex digest; ``what`` names the field in the error.

    Raises:
        RegistryError: ``value`` is not 64 lowercase hex digits.
    """
    if not isinstance(value, str) or len(value) != 64 or not set(value) <= _SHA256_HEX:
        raise RegistryError(f"{what} must be 64 lowercase hex digits")
