"""Telemetry wire formats: what a device publishes and what MQTT consumers read.

Owns the versioned payloads (frozen value objects with strict ``from_dict``, canonical
``to_bytes`` and size-capped ``from_bytes``): ``TelemetryReport`` (periodic window report),
``Event`` (lifecycle events), ``StatusMessage`` (retained online/offline and last will),
``Batch`` (several reports/events in one message, each with its own ``seq``) and
``TelemetryAck`` (server -> device: "stored everything up to ``upto_seq``").

The report's value types (``TelemetryReport``, ``ModelStats``, ``DriftSummary``, ``ShadowStats``,
``Resources``: ``edge_agent.wire.telemetry_report``, ``telemetry_model``, ``telemetry_drift``),
the latency buckets (``edge_agent.wire.telemetry_latency``) and ``report_from_status``
(``edge_agent.wire.telemetry_build``) are re-exported here: this module is the telemetry surface
consumers import. So are ``SCHEMA_VERSION`` and ``MAX_PAYLOAD_BYTES``, defined with the shared
readers in ``edge_agent.wire.fields``.

Reports and events share one per-device sequence (the outbox's), so one acknowledgement of the
highest contiguous ``seq`` covers both. Counters in a report are cumulative since
``started_at`` (Prometheus counter semantics): a consumer takes differences between reports
and sees a restart as a new ``started_at``.

Versioning: fields added later are optional and keep ``schema_version``; parsers ignore keys
they do not know. Removing or retyping a field, or changing a fixed table (latency bucket
edges, event kinds), bumps it. JSON Schemas: ``edge_agent/schemas/*.schema.json``.

Does not publish, store or retry anything (the outbox and the MQTT adapter do) and does no I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from edge_agent.errors import ContractError
from edge_agent.wire.compact import is_packed, unpack_message
from edge_agent.wire.fields import (
    MAX_PAYLOAD_BYTES,
    SCHEMA_VERSION,
    Wire,
    as_device_id,
    as_int,
    as_label,
    as_number,
    as_object,
    as_str,
    check_header,
    load_json,
    require,
    storable_text,
)
from edge_agent.wire.telemetry_build import report_from_status
from edge_agent.wire.telemetry_drift import DriftSummary
from edge_agent.wire.telemetry_latency import (
    LATENCY_BUCKETS_MS,
    LATENCY_FINE_BUCKETS_MS,
    coarse_from_fine,
    latency_histogram,
)
from edge_agent.wire.telemetry_model import ModelStats, ShadowStats
from edge_agent.wire.telemetry_report import Resources, TelemetryReport

__all__ = [
    "EVENT_KINDS",
    "LATENCY_BUCKETS_MS",
    "LATENCY_FINE_BUCKETS_MS",
    "MAX_BATCH_ITEMS",
    "MAX_PAYLOAD_BYTES",
    "SCHEMA_VERSION",
    "Batch",
    "DriftSummary",
    "Event",
    "ModelStats",
    "Resources",
    "ShadowStats",
    "StatusMessage",
    "TelemetryAck",
    "TelemetryReport",
    "coarse_from_fine",
    "decode_message",
    "event_from_registry",
    "latency_histogram",
    "report_from_status",
]

MAX_BATCH_ITEMS: Final = 256
#: Encodings one ack may list.
MAX_ACCEPTS: Final = 8
EVENT_KINDS: Final = (
    "installed",
    "install_failed",
    "rolled_back",
    "probation_passed",
    "probation_failed",
    "load_failed",
    "admission_refused",
    "drift_alert",
    "fallback_breaker_open",
    "fallback_breaker_closed",
    "telemetry_dropped",
    "desired_rejected",
    "transfer_started",
    "transfer_failed",
    "cert_renewed",
    "cert_renewal_failed",
)
STATES: Final = ("online", "offline")
STATUS_REASONS: Final = ("connected", "shutdown", "connection_lost")
_REGISTRY_KINDS: Final = {"rollback": "rolled_back"}


# --------------------------------------------------------------------------- events
@dataclass(frozen=True)
class Event(Wire):
    """A lifecycle event: an item of a ``Batch`` on ``.../telemetry`` (its one path; agents
    before this release also published it alone on ``.../events``, which parsers accept).

    Attributes:
        device_id: The device.
        seq: Per-device outbox sequence number, shared with reports.
        kind: One of ``EVENT_KINDS``.
        model: Model name, if the event concerns one.
        version: Model version, if the event concerns one.
        detail: Free text for humans (at most 1,024 characters); never parse it.
        at: Unix time (s) the event happened.
    """

    device_id: str
    seq: int
    kind: str
    at: float
    model: str | None = None
    version: int | None = None
    detail: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict, valid against ``event.schema.json``."""
        return {
            "schema_version": self.schema_version,
            "type": "event",
            "device_id": self.device_id,
            "seq": self.seq,
            "kind": self.kind,
            "model": self.model,
            "version": self.version,
            "detail": self.detail,
            "at": self.at,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Event:
        """Parse strictly.

        Raises:
            ContractError: wrong schema_version or type, an unknown kind, or a missing,
                mistyped or out-of-range field.
        """
        d = check_header(d, "event")
        kind = require(d, "kind", "event")
        if kind not in EVENT_KINDS:
            raise ContractError(f"event: unknown kind {kind!r}")
        model, version = d.get("model"), d.get("version")
        return cls(
            device_id=as_device_id(require(d, "device_id", "event")),
            seq=as_int(require(d, "seq", "event"), "event.seq"),
            kind=kind,
            at=as_number(require(d, "at", "event"), "event.at"),
            model=None if model is None else as_label(model, "event.model"),
            version=None if version is None else as_int(version, "event.version"),
            detail=as_str(d.get("detail", ""), "event.detail"),
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> Event:
        """Parse a payload (size-capped before parsing). Raises ContractError (invalid)."""
        return cls.from_dict(load_json(data, max_bytes))


def event_from_registry(device_id: str, seq: int, entry: Mapping[str, Any]) -> Event | None:
    """An ``Event`` from one ``Registry.events`` entry; None for kinds not on the wire.

    Raises:
        ContractError: the entry's fields have the wrong types.
    """
    raw = entry.get("event")
    kind = _REGISTRY_KINDS.get(str(raw), str(raw))
    if kind not in EVENT_KINDS:
        return None
    model = entry.get("model")
    return Event.from_dict(
        {
            "schema_version": SCHEMA_VERSION,
            "type": "event",
            "device_id": device_id,
            "seq": seq,
            "kind": kind,
            "model": model,
            "version": entry.get("version"),
            "detail": storable_text(str(entry.get("detail", ""))),
            "at": entry.get("at", 0.0),
        }
    )


# --------------------------------------------------------------------------- status
@dataclass(frozen=True)
class StatusMessage(Wire):
    """Retained ``.../status``: ``online`` on connect, ``offline`` on shutdown or as the will.

    The will is registered at connect time, so an ``offline``/``connection_lost`` status
    carries the time of that connection in ``at``, not the time it was lost.
    """

    device_id: str
    state: str
    at: float
    reason: str = "connected"
    agent_version: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict, valid against ``status.schema.json``."""
        return {
            "schema_version": self.schema_version,
            "type": "status",
            "device_id": self.device_id,
            "state": self.state,
            "reason": self.reason,
            "at": self.at,
            "agent_version": self.agent_version,
        }

    @classmethod
    def from_dict(cls, d: Any) -> StatusMessage:
        """Parse strictly. Raises ContractError (bad version, state, reason or field)."""
        d = check_header(d, "status")
        state, reason = require(d, "state", "status"), d.get("reason", "connected")
        if state not in STATES or reason not in STATUS_REASONS:
            raise ContractError(f"status: state {state!r} / reason {reason!r} not allowed")
        return cls(
            device_id=as_device_id(require(d, "device_id", "status")),
            state=state,
            at=as_number(require(d, "at", "status"), "status.at"),
            reason=reason,
            agent_version=as_str(d.get("agent_version", ""), "status.agent_version", 64),
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = 4096) -> StatusMessage:
        """Parse a payload (size-capped before parsing). Raises ContractError (invalid)."""
        return cls.from_dict(load_json(data, max_bytes))


# --------------------------------------------------------------------- batch and ack
@dataclass(frozen=True)
class Batch(Wire):
    """Several reports and events of one device in one message, in ``seq`` order."""

    device_id: str
    items: tuple[TelemetryReport | Event, ...]
    schema_version: int = SCHEMA_VERSION
    # The oldest seq the device's outbox still holds: anything below it the server lacks was
    # dropped on the device and will never come (the server counts it lost and acks past it).
    floor: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= len(self.items) <= MAX_BATCH_ITEMS:
            raise ContractError(f"batch must hold 1-{MAX_BATCH_ITEMS} items")
        if self.floor is not None and (
            isinstance(self.floor, bool) or self.floor < 1 or self.floor > self.items[0].seq
        ):
            raise ContractError("batch: floor must be a seq >= 1 and <= the first item's seq")
        seqs = [i.seq for i in self.items]
        if any(i.device_id != self.device_id for i in self.items):
            raise ContractError("batch: every item must be from the batch's device")
        if any(b <= a for a, b in itertools.pairwise(seqs)):
            raise ContractError("batch: item seq numbers must be strictly increasing")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict, valid against ``telemetry-report.schema.json`` (its batch form)."""
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "type": "batch",
            "device_id": self.device_id,
            "items": [i.to_dict() for i in self.items],
        }
        if self.floor is not None:
            out["floor"] = self.floor
        return out

    @classmethod
    def from_dict(cls, d: Any) -> Batch:
        """Parse strictly.

        Raises:
            ContractError: an invalid item, items of another device, seqs out of order, an
                empty or too-large batch.
        """
        d = check_header(d, "batch")
        items = require(d, "items", "batch")
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH_ITEMS:
            raise ContractError(f"batch: items must be a list of 1-{MAX_BATCH_ITEMS}")
        parsed: list[TelemetryReport | Event] = []
        for item in items:
            kind = as_object(item, "batch item").get("type")
            if kind == "report":
                parsed.append(TelemetryReport.from_dict(item))
            elif kind == "event":
                parsed.append(Event.from_dict(item))
            else:
                raise ContractError(f"batch: item type {kind!r} is not 'report' or 'event'")
        floor = d.get("floor")
        if floor is not None and (isinstance(floor, bool) or not isinstance(floor, int)):
            raise ContractError("batch: floor must be an integer")
        return cls(
            device_id=as_device_id(require(d, "device_id", "batch")),
            items=tuple(parsed),
            floor=floor,
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> Batch:
        """Parse a payload (size-capped before parsing). Raises ContractError (invalid)."""
        return cls.from_dict(load_json(data, max_bytes))


@dataclass(frozen=True)
class TelemetryAck(Wire):
    """Server -> device (``.../ack``): every item with ``seq <= upto_seq`` is stored."""

    device_id: str
    upto_seq: int
    schema_version: int = SCHEMA_VERSION
    # Telemetry encodings besides JSON this server reads (``compact.PACKED_ENCODING``); the
    # agent uses one only while the latest ack lists it. Absent from older servers' acks.
    accepts: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (``accepts`` only when not empty: older acks stay byte-identical)."""
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "type": "ack",
            "device_id": self.device_id,
            "upto_seq": self.upto_seq,
        }
        if self.accepts:
            out["accepts"] = list(self.accepts)
        return out

    @classmethod
    def from_dict(cls, d: Any) -> TelemetryAck:
        """Parse strictly. Raises ContractError (bad version, device id, seq or accepts)."""
        d = check_header(d, "ack")
        accepts = d.get("accepts", [])
        if not isinstance(accepts, list) or len(accepts) > MAX_ACCEPTS:
            raise ContractError(f"ack: accepts must be a list of at most {MAX_ACCEPTS} labels")
        return cls(
            device_id=as_device_id(require(d, "device_id", "ack")),
            upto_seq=as_int(require(d, "upto_seq", "ack"), "ack.upto_seq"),
            accepts=tuple(as_label(a, "ack.accepts[]") for a in accepts),
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = 4096) -> TelemetryAck:
        """Parse a payload (size-capped before parsing). Raises ContractError (invalid)."""
        return cls.from_dict(load_json(data, max_bytes))


_DECODERS: Final[dict[str, Any]] = {
    "report": TelemetryReport,
    "event": Event,
    "batch": Batch,
    "status": StatusMessage,
    "ack": TelemetryAck,
}


def decode_message(
    data: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES
) -> TelemetryReport | Event | Batch | StatusMessage | TelemetryAck:
    """Parse any telemetry payload by its ``type`` field (what an ingest worker calls); a
    payload in the packed form (``edge_agent.wire.compact``) is unpacked to its JSON first.

    Raises:
        ContractError: oversized, not JSON, an unknown type, or invalid for its type.
    """
    if is_packed(data):
        data = unpack_message(data, max_bytes=max_bytes)
    d = as_object(load_json(data, max_bytes), "payload")
    kind = d.get("type")
    decoder = _DECODERS.get(kind) if isinstance(kind, str) else None
    if decoder is None:
        raise ContractError(f"unknown payload type {d.get('type')!r}")
    out: TelemetryReport | Event | Batch | StatusMessage | TelemetryAck = decoder.from_dict(d)
    return out
