"""Parsing one device telemetry message into what the ingest stores (pure: bytes in, values out).

Owns ``parse_telemetry`` (a message of a device's ``telemetry`` or ``events`` topic becomes an
``IngestItem`` or a stable reject reason), the refused-entry placeholder (``refused_entry``,
kind ``REFUSED_KIND``) and ``refusal_reason`` (the label of a registry refusal).

Why placeholders: acknowledgements are cumulative (``acked_upto`` is the highest contiguous
stored ``seq``), so one entry that can never be stored would hold back every later entry of its
device, and the device would resend them forever. An entry that is well addressed (its batch is
this device's, its ``seq`` is readable) but invalid or unstorable is therefore stored as a small
``refused`` row naming the reason: the device's mark moves past it, the device deletes it, the
good entries around it are stored, and the operator sees the refusal (``telemetry tail``, the
per-device counters). A message whose envelope is wrong (not JSON, another device, a bad
header) is refused whole and not acknowledged: no honest agent sends one.

Encodings: a payload is canonical JSON or, from agents that were told the server reads it
(``ACCEPTED_ENCODINGS``, listed in every ack), the packed form of the same JSON
(``edge_agent.wire.compact``). A packed payload is unpacked first, bounded by
``MAX_PAYLOAD_BYTES`` like JSON, straight to the document its JSON encodes (``unpack_document``:
no JSON text is built and read again), which is then parsed exactly as that JSON would be; one
that does not unpack (damaged, truncated, another format version, inflating beyond the cap) is
``malformed``.

Does not store, count or acknowledge anything (``fleet_server.gateway.ingest``, the gateway do).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from edge_agent.errors import ContractError
from edge_agent.wire.compact import PACKED_ENCODING, is_packed, unpack_document, unpack_message
from edge_agent.wire.fields import MAX_INT
from edge_agent.wire.telemetry import (
    MAX_BATCH_ITEMS,
    MAX_PAYLOAD_BYTES,
    SCHEMA_VERSION,
    Batch,
    Event,
    StatusMessage,
    TelemetryAck,
    TelemetryReport,
    decode_message,
)
from fleet_server.errors import DeviceRevokedError, RegistryError, UnknownDeviceError
from fleet_server.registry.values import TelemetryEntry

__all__ = [
    "ACCEPTED_ENCODINGS",
    "REFUSED_KIND",
    "IngestItem",
    "parse_telemetry",
    "refusal_reason",
    "refused_entry",
]

#: ``kind`` of the placeholder row stored for an entry that was refused (see the docstring).
REFUSED_KIND: Final = "refused"
#: Telemetry encodings besides JSON this parser reads; the gateway lists them in its acks.
ACCEPTED_ENCODINGS: Final = (PACKED_ENCODING,)
_SAFE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


@dataclass(frozen=True)
class IngestItem:
    """One received telemetry message, parsed and checked against its topic's device.

    ``refused`` counts the entries that were replaced by ``refused`` placeholders, by reason.
    """

    device_id: str
    entries: tuple[TelemetryReport | Event | TelemetryEntry, ...]
    floor: int | None = None
    refused: tuple[tuple[str, int], ...] = ()


def refused_entry(seq: int, reason: str, was: str) -> TelemetryEntry:
    """The placeholder stored instead of an entry that cannot be stored (see the docstring)."""
    if not _SAFE.fullmatch(was):  # the placeholder itself must always be storable
        was = "unknown"
    return TelemetryEntry(seq, REFUSED_KIND, {"reason": reason, "was": was})


def parse_telemetry(kind: str, device_id: str, payload: bytes) -> IngestItem | str:
    """Parse one message of a device's ``telemetry`` or ``events`` topic (pure).

    Args:
        kind: the topic kind, ``"telemetry"`` (a ``Batch`` or a single report or event) or
            ``"events"`` (a single ``Event``).
        device_id: the device named by the topic (the broker ACL ties it to the certificate).
        payload: the message bytes (JSON, or its packed form).

    Returns:
        The ``IngestItem`` to store (invalid entries of a well-formed message replaced by
        ``refused`` placeholders), or the reject reason of the whole message: ``oversized``
        (above ``MAX_PAYLOAD_BYTES``, not parsed at all), ``malformed`` (not JSON nor a packed
        form that unpacks, unknown
        schema version or type, an unreadable envelope or ``seq``), ``wrong_type`` (a valid
        payload that does not belong on this topic) or ``device_mismatch`` (a payload or item
        names another device).
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        return "oversized"
    decoded: TelemetryReport | Event | Batch | StatusMessage | TelemetryAck
    if is_packed(payload):
        try:
            doc = unpack_document(payload, max_bytes=MAX_PAYLOAD_BYTES)
        except ContractError:
            return "malformed"
        try:
            # A report or a batch (``unpack_document`` checked): no JSON text in between.
            decoded = (Batch if doc["type"] == "batch" else TelemetryReport).from_dict(doc)
        except ContractError:
            try:  # the salvage reads the JSON the packed form encodes
                payload = unpack_message(payload, max_bytes=MAX_PAYLOAD_BYTES)
            except ContractError:
                return "malformed"
            return _salvage(kind, device_id, payload)
    else:
        try:
            decoded = decode_message(payload)
        except ContractError:
            return _salvage(kind, device_id, payload)
    if isinstance(decoded, Batch) and kind == "telemetry":
        item = IngestItem(device_id, decoded.items, decoded.floor)
    elif isinstance(decoded, Event) or (
        isinstance(decoded, TelemetryReport) and kind == "telemetry"
    ):
        item = IngestItem(device_id, (decoded,))
    else:
        return "wrong_type"
    if decoded.device_id != device_id or any(
        isinstance(e, TelemetryReport | Event) and e.device_id != device_id for e in item.entries
    ):
        return "device_mismatch"
    return item


def refusal_reason(error: RegistryError) -> str:
    """The stable reject label of a per-item ingest refusal."""
    if isinstance(error, UnknownDeviceError):
        return "unknown_device"
    if isinstance(error, DeviceRevokedError):
        return "revoked_device"
    return "rejected"


# --------------------------------------------------------------------------- salvage
def _salvage(kind: str, device_id: str, payload: bytes) -> IngestItem | str:
    """The strict parse failed: keep the valid entries, placeholders for the invalid ones.

    Not ``strict_json.loads``: it refuses the whole document for a lone surrogate escape or a
    ``1e400`` anywhere, which is exactly what one bad entry may hold; here such values reach
    ``from_dict`` of their entry and only that entry becomes a placeholder. What no entry can
    be parsed past (NaN tokens, huge integers, duplicate keys, deep nesting) still refuses the
    message.
    """
    try:
        doc = json.loads(
            bytes(payload).decode("utf-8"),
            parse_constant=_no_constant,
            parse_int=_bounded_int,
            object_pairs_hook=_no_duplicates,
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "malformed"
    if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION:
        return "malformed"
    if isinstance(doc.get("schema_version"), bool):
        return "malformed"
    if doc.get("device_id") != device_id:
        return "device_mismatch" if isinstance(doc.get("device_id"), str) else "malformed"
    t = doc.get("type")
    if t == "batch" and kind == "telemetry":
        raw = doc.get("items")
        floor = doc.get("floor")
        if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_BATCH_ITEMS:
            return "malformed"
    elif t == "event" or (t == "report" and kind == "telemetry"):
        raw, floor = [doc], None
    else:
        return "wrong_type" if t in ("batch", "report") else "malformed"
    entries = _entries(device_id, raw)
    if isinstance(entries, str):
        return entries
    seqs = [e.seq for e in entries]
    if any(b <= a for a, b in itertools.pairwise(seqs)):
        return "malformed"
    if floor is not None and (
        isinstance(floor, bool) or not isinstance(floor, int) or not 1 <= floor <= seqs[0]
    ):
        return "malformed"
    refused = sum(1 for e in entries if isinstance(e, TelemetryEntry))
    return IngestItem(device_id, tuple(entries), floor, (("malformed_entry", refused),))


def _entries(
    device_id: str, raw: Sequence[Any]
) -> list[TelemetryReport | Event | TelemetryEntry] | str:
    out: list[TelemetryReport | Event | TelemetryEntry] = []
    for item in raw:
        if not isinstance(item, Mapping):
            return "malformed"
        if item.get("device_id") != device_id:
            return "device_mismatch" if isinstance(item.get("device_id"), str) else "malformed"
        seq, t = item.get("seq"), item.get("type")
        if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq <= MAX_INT:
            return "malformed"
        if t not in ("report", "event"):
            return "malformed"
        try:
            out.append(TelemetryReport.from_dict(item) if t == "report" else Event.from_dict(item))
        except ContractError:
            out.append(refused_entry(seq, "malformed", str(t)))
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate keys")
    return out


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 20:  # every seq and count fits; no quadratic int() either
        raise ValueError("integer out of range")
    return int(text)
