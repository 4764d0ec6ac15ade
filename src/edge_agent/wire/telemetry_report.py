"""The periodic telemetry report: ``TelemetryReport``, the composition of its parts.

Owns ``TelemetryReport`` (one device's window report: frozen, strict ``from_dict``, canonical
``to_bytes``, size-capped ``from_bytes``) and the report-level parts it is made of (frozen
dataclasses following ``edge_agent.wire.fields.Part``, each owning some keys of the report
object): ``ReportWindow`` (the window and the agent's start), ``ModelTable`` (per model, a
``ModelStats``) and ``AgentState`` (agent version, agent-wide counters, the nested
``Resources``). The envelope (``schema_version``, ``type``, ``device_id``, ``seq``) is the
report's own. Does not own a model's statistics (``edge_agent.wire.telemetry_model``), building a
report from ``Agent.status()`` (``edge_agent.wire.telemetry_build``), the other payloads
(``edge_agent.wire.telemetry``, which re-exports the public names) or publishing; does no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

from edge_agent.errors import ContractError
from edge_agent.wire.fields import (
    MAX_PAYLOAD_BYTES,
    SCHEMA_VERSION,
    Part,
    Wire,
    as_counts,
    as_device_id,
    as_int,
    as_label,
    as_number,
    as_object,
    as_str,
    check_header,
    decode_parts,
    encode_parts,
    load_json,
    require,
)
from edge_agent.wire.telemetry_model import ModelStats

__all__ = [
    "MAX_MODELS",
    "REPORT_PARTS",
    "AgentState",
    "ModelTable",
    "ReportWindow",
    "Resources",
    "TelemetryReport",
]

#: Models in one report.
MAX_MODELS: Final = 32
_W: Final = "report"  # the parent object, in error messages


@dataclass(frozen=True)
class Resources:
    """Device resources at report time: bytes and seconds."""

    rss_bytes: int = 0
    cpu_seconds: float = 0.0
    model_memory_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {
            "rss_bytes": self.rss_bytes,
            "cpu_seconds": self.cpu_seconds,
            "model_memory_bytes": self.model_memory_bytes,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Resources:
        """Parse strictly. Raises ContractError (mistyped or negative field)."""
        d = as_object(d, "resources")
        return cls(
            rss_bytes=as_int(require(d, "rss_bytes", "resources"), "resources.rss_bytes"),
            cpu_seconds=as_number(require(d, "cpu_seconds", "resources"), "resources.cpu_seconds"),
            model_memory_bytes=as_int(d.get("model_memory_bytes", 0), "resources.model_memory"),
        )


@dataclass(frozen=True)
class ReportWindow:
    """The time window a report covers.

    Attributes:
        window_start: Unix time (s) the window opened (the previous report).
        window_end: Unix time (s) the report was built (not before ``window_start``).
        started_at: Unix time (s) the agent started; counters are cumulative since then.
    """

    KEYS: ClassVar[tuple[str, ...]] = ("window_start", "window_end", "started_at")

    window_start: float
    window_end: float
    started_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The three times."""
        return {
            "window_start": self.window_start,
            "window_end": self.window_end,
            "started_at": self.started_at,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReportWindow:
        """Parse strictly. Raises ContractError (a bad time, or an end before the start)."""
        start = as_number(require(d, "window_start", _W), "report.window_start")
        end = as_number(require(d, "window_end", _W), "report.window_end")
        if end < start:
            raise ContractError(f"{_W}: window_end is before window_start")
        return cls(
            window_start=start,
            window_end=end,
            started_at=as_number(d.get("started_at", 0.0), "report.started_at"),
        )


@dataclass(frozen=True)
class ModelTable:
    """The loaded models.

    Attributes:
        models: Per model name (a label), its statistics (at most ``MAX_MODELS``).
    """

    KEYS: ClassVar[tuple[str, ...]] = ("models",)

    models: Mapping[str, ModelStats] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """``models``, by name."""
        return {"models": {k: m.to_dict() for k, m in sorted(self.models.items())}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelTable:
        """Parse strictly. Raises ContractError (too many, a bad name, an invalid model)."""
        models = as_object(require(d, "models", _W), "report.models")
        if len(models) > MAX_MODELS:
            raise ContractError(f"{_W}: more than {MAX_MODELS} models")
        return cls(
            models={as_label(k, "model name"): ModelStats.from_dict(m) for k, m in models.items()}
        )


@dataclass(frozen=True)
class AgentState:
    """The agent as a whole.

    Attributes:
        agent_version: edge-agent version.
        counts: Agent-wide requests by source/outcome (``device``, ``cloud``, ``rejected``,
            ``errors``).
        resources: Device resource use.
        telemetry_dropped: Outbox entries dropped for lack of space, by kind (never silent).
        drift_blocks_dropped: Drift batches the background worker had to drop.
    """

    KEYS: ClassVar[tuple[str, ...]] = (
        "agent_version",
        "counts",
        "resources",
        "telemetry_dropped",
        "drift_blocks_dropped",
    )

    agent_version: str = ""
    counts: Mapping[str, int] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    telemetry_dropped: Mapping[str, int] = field(default_factory=dict)
    drift_blocks_dropped: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The five keys."""
        return {
            "agent_version": self.agent_version,
            "counts": dict(self.counts),
            "resources": self.resources.to_dict(),
            "telemetry_dropped": dict(self.telemetry_dropped),
            "drift_blocks_dropped": self.drift_blocks_dropped,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AgentState:
        """Parse strictly (``agent_version``, ``counts``, ``drift_blocks_dropped`` absent: empty
        or zero). Raises ContractError."""
        return cls(
            agent_version=as_str(d.get("agent_version", ""), "report.agent_version", 64),
            counts=as_counts(d.get("counts", {}), "report.counts"),
            resources=Resources.from_dict(require(d, "resources", _W)),
            telemetry_dropped=as_counts(require(d, "telemetry_dropped", _W), "report.dropped"),
            drift_blocks_dropped=as_int(d.get("drift_blocks_dropped", 0), "drift_blocks_dropped"),
        )


#: The parts of a report object after its envelope, in the order ``from_dict`` checks them.
#: With the envelope their ``KEYS`` cover every property of the schema's ``report`` (tested).
REPORT_PARTS: Final[tuple[type[Part], ...]] = (ReportWindow, ModelTable, AgentState)


@dataclass(frozen=True)
class TelemetryReport(Wire):
    """A periodic window report of one device (topic ``.../telemetry``).

    Attributes:
        device_id: The reporting device.
        seq: Per-device outbox sequence number, shared with events.
        window_start, window_end, started_at: ``ReportWindow``.
        models: ``ModelTable``.
        agent_version, counts, resources, telemetry_dropped, drift_blocks_dropped:
            ``AgentState``.
    """

    device_id: str
    seq: int
    window_start: float
    window_end: float
    started_at: float = 0.0
    agent_version: str = ""
    models: Mapping[str, ModelStats] = field(default_factory=dict)
    counts: Mapping[str, int] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    telemetry_dropped: Mapping[str, int] = field(default_factory=dict)
    drift_blocks_dropped: int = 0
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict, valid against ``telemetry-report.schema.json``."""
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "type": "report",
            "device_id": self.device_id,
            "seq": self.seq,
        }
        out.update(encode_parts(self, REPORT_PARTS))
        return out

    @classmethod
    def from_dict(cls, d: Any) -> TelemetryReport:
        """Parse strictly (unknown keys are ignored, see ``edge_agent.wire.telemetry``).

        Raises:
            ContractError: wrong schema_version or type, or a missing, mistyped or
                out-of-range field.
        """
        d = check_header(d, _W)
        return cls(
            device_id=as_device_id(require(d, "device_id", _W)),
            seq=as_int(require(d, "seq", _W), "report.seq"),
            **decode_parts(d, REPORT_PARTS),
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> TelemetryReport:
        """Parse a payload, refusing it unread if it is larger than ``max_bytes``.

        Raises:
            ContractError: oversized, not UTF-8 JSON, NaN/Infinity, duplicate keys, or invalid.
        """
        return cls.from_dict(load_json(data, max_bytes))
