"""The reported-state document: what a device says it runs (retained ``.../reported``).

Owns the wire format of the device half of the desired/reported pair (like a device shadow's
``reported`` section): the last desired-state version the device accepted, per model the active
and kept versions, the transfer in progress and the outcome of the last assignment (installed,
rolled back, failed and why), the shadow a rollout assigned (``ShadowReport``), the agent's
own release and update outcome (``AgentReport``) and the device's ``capabilities`` (what
newer desired-state forms it understands: ``"shadow"``, ``"agent-update"``).
Frozen value objects with strict ``from_dict``, canonical ``to_bytes`` and a size-capped
``from_bytes``; JSON Schema:
``edge_agent/schemas/reported.schema.json``.

Pure: does not publish (the sync loop does) and does no I/O. Unknown keys are ignored, as in
every telemetry payload, so fields can be added without a version bump.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from edge_agent.errors import ContractError
from edge_agent.wire.fields import (
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
)
from edge_agent.wire.ops.labels import parse_labels

__all__ = [
    "AGENT_OUTCOMES",
    "MAX_REPORTED_BYTES",
    "OUTCOMES",
    "AgentReport",
    "ModelReport",
    "ReportedState",
    "ShadowReport",
    "TransferReport",
]

#: Refused before parsing.
MAX_REPORTED_BYTES: Final = 64 * 1024
#: Outcome of the last assignment of a model.
OUTCOMES: Final = ("pending", "downloading", "installed", "rolled_back", "failed")
#: Outcome of the agent release the desired state assigns (``trying``: on trial right now).
AGENT_OUTCOMES: Final = (*OUTCOMES, "trying")
_MAX_MODELS: Final = 32
_MAX_FAILED: Final = 32
_MAX_KEPT: Final = 16
_MAX_CAPABILITIES: Final = 16


@dataclass(frozen=True)
class TransferReport:
    """A bundle download in progress.

    Attributes:
        version: the model version being downloaded.
        received_blocks: blocks on disk (resumed ones included).
        total_blocks: blocks in the bundle.
        bytes_total: the bundle's signed length.
    """

    version: int
    received_blocks: int
    total_blocks: int
    bytes_total: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "received_blocks": self.received_blocks,
            "total_blocks": self.total_blocks,
            "bytes_total": self.bytes_total,
        }

    @classmethod
    def from_dict(cls, d: Any) -> TransferReport:
        """Parse strictly. Raises ContractError."""
        m = as_object(d, "transfer")
        out = cls(
            version=as_int(require(m, "version", "transfer"), "transfer.version"),
            received_blocks=as_int(require(m, "received_blocks", "transfer"), "transfer.received"),
            total_blocks=as_int(require(m, "total_blocks", "transfer"), "transfer.total_blocks", 1),
            bytes_total=as_int(require(m, "bytes_total", "transfer"), "transfer.bytes_total", 1),
        )
        if out.received_blocks > out.total_blocks:
            raise ContractError("transfer: received_blocks exceeds total_blocks")
        return out


@dataclass(frozen=True)
class ShadowReport:
    """The shadow the accepted desired state assigns to a model (a rollout's shadow phase).

    Attributes:
        version: the shadow version assigned.
        outcome: ``downloading``, ``installed`` (installed and running as the shadow, never
            serving) or ``failed`` (one of ``OUTCOMES``).
        reason: why it failed ("" otherwise).
    """

    version: int
    outcome: str = "pending"
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "outcome": self.outcome, "reason": self.reason}

    @classmethod
    def from_dict(cls, d: Any) -> ShadowReport:
        """Parse strictly. Raises ContractError."""
        m = as_object(d, "shadow report")
        outcome = require(m, "outcome", "shadow report")
        if outcome not in OUTCOMES:
            raise ContractError(f"shadow report: outcome {outcome!r} not in {OUTCOMES}")
        return cls(
            version=as_int(require(m, "version", "shadow report"), "shadow.version"),
            outcome=outcome,
            reason=as_str(m.get("reason", ""), "shadow.reason"),
        )


@dataclass(frozen=True)
class ModelReport:
    """One model on the device.

    Attributes:
        active: the version being served (None before the first install).
        kept: versions kept on disk for rollback, newest first.
        assigned: the version the accepted desired state names (None if not assigned).
        outcome: what happened to ``assigned``: one of ``OUTCOMES``.
        reason: why it failed or was rolled back ("" otherwise).
        transfer: the download in progress, if any.
        shadow: the shadow assigned and what became of it (the key is absent when None).
    """

    active: int | None
    kept: tuple[int, ...] = ()
    assigned: int | None = None
    outcome: str = "pending"
    reason: str = ""
    transfer: TransferReport | None = None
    shadow: ShadowReport | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "active": self.active,
            "kept": list(self.kept),
            "assigned": self.assigned,
            "outcome": self.outcome,
            "reason": self.reason,
            "transfer": None if self.transfer is None else self.transfer.to_dict(),
        }
        if self.shadow is not None:
            out["shadow"] = self.shadow.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Any) -> ModelReport:
        """Parse strictly. Raises ContractError."""
        m = as_object(d, "model report")
        outcome = require(m, "outcome", "model report")
        if outcome not in OUTCOMES:
            raise ContractError(f"model report: outcome {outcome!r} not in {OUTCOMES}")
        kept = m.get("kept", [])
        if not isinstance(kept, list) or len(kept) > _MAX_KEPT:
            raise ContractError(f"model report: kept must be a list of at most {_MAX_KEPT}")
        active, assigned, transfer = m.get("active"), m.get("assigned"), m.get("transfer")
        shadow = m.get("shadow")
        return cls(
            active=None if active is None else as_int(active, "model.active"),
            kept=tuple(as_int(v, "model.kept") for v in kept),
            assigned=None if assigned is None else as_int(assigned, "model.assigned"),
            outcome=outcome,
            reason=as_str(m.get("reason", ""), "model.reason"),
            transfer=None if transfer is None else TransferReport.from_dict(transfer),
            shadow=None if shadow is None else ShadowReport.from_dict(shadow),
        )


@dataclass(frozen=True)
class AgentReport:
    """The agent's own software on the device (issue 15: the agent updates itself).

    Attributes:
        release: the agent release running (None: the base install, no release).
        assigned: the release the accepted desired state names (None: none assigned).
        outcome: what happened to ``assigned``: one of ``AGENT_OUTCOMES``.
        reason: why it failed or rolled back ("" otherwise).
        failed: releases that failed their trial on this device (never tried again).
        transfer: the package download in progress, if any.
    """

    release: int | None
    assigned: int | None = None
    outcome: str = "pending"
    reason: str = ""
    failed: tuple[int, ...] = ()
    transfer: TransferReport | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "release": self.release,
            "assigned": self.assigned,
            "outcome": self.outcome,
            "reason": self.reason,
            "failed": list(self.failed),
            "transfer": None if self.transfer is None else self.transfer.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Any) -> AgentReport:
        """Parse strictly. Raises ContractError."""
        m = as_object(d, "agent report")
        outcome = require(m, "outcome", "agent report")
        if outcome not in AGENT_OUTCOMES:
            raise ContractError(f"agent report: outcome {outcome!r} not in {AGENT_OUTCOMES}")
        failed = m.get("failed", [])
        if not isinstance(failed, list) or len(failed) > _MAX_FAILED:
            raise ContractError(f"agent report: failed must be a list of at most {_MAX_FAILED}")
        release, assigned, transfer = m.get("release"), m.get("assigned"), m.get("transfer")
        return cls(
            release=None if release is None else as_int(release, "agent.release"),
            assigned=None if assigned is None else as_int(assigned, "agent.assigned"),
            outcome=outcome,
            reason=as_str(m.get("reason", ""), "agent.reason"),
            failed=tuple(as_int(v, "agent.failed") for v in failed),
            transfer=None if transfer is None else TransferReport.from_dict(transfer),
        )


@dataclass(frozen=True)
class ReportedState(Wire):
    """The device's retained reported state.

    Attributes:
        device_id: the device.
        at: Unix time (s) the document was built.
        agent_version: edge-agent version.
        desired_version: version of the last desired-state document accepted (0: none).
        models: per model name, its ``ModelReport``.
        capabilities: newer desired-state forms the device understands (``"shadow"``: shadow
            assignments, ``"agent-update"``: agent assignments); the server sends those only
            to devices listing them.
        agent: the agent's own release and update outcome (absent: not run by a launcher).
        labels: what the device says about itself (``[labels]`` of its configuration and
            detected facts such as ``hardware`` and ``os``; ``edge_agent.wire.ops.labels`` rules).
            Hostile input to the server: parsing keeps the valid ones and never fails the
            document for a bad one.
        labels_refused: entries of the received ``labels`` that parsing dropped (0 when
            built, not parsed; never read from the document).
    """

    device_id: str
    at: float
    agent_version: str = ""
    desired_version: int = 0
    models: Mapping[str, ModelReport] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    capabilities: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    labels_refused: int = 0
    agent: AgentReport | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict, valid against ``reported.schema.json``."""
        return {
            "schema_version": self.schema_version,
            "type": "reported",
            "device_id": self.device_id,
            "at": self.at,
            "agent_version": self.agent_version,
            "desired_version": self.desired_version,
            "models": {k: v.to_dict() for k, v in sorted(self.models.items())},
            **({"capabilities": list(self.capabilities)} if self.capabilities else {}),
            **({"labels": dict(sorted(self.labels.items()))} if self.labels else {}),
            **({"labels_refused": self.labels_refused} if self.labels_refused else {}),
            **({"agent": self.agent.to_dict()} if self.agent is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: Any) -> ReportedState:
        """Parse strictly. Raises ContractError (bad version, type, device id or field)."""
        m = check_header(d, "reported")
        models = as_object(require(m, "models", "reported"), "reported.models")
        if len(models) > _MAX_MODELS:
            raise ContractError(f"reported: at most {_MAX_MODELS} models")
        caps = m.get("capabilities", [])
        if not isinstance(caps, list) or len(caps) > _MAX_CAPABILITIES:
            raise ContractError(f"reported: capabilities: a list of at most {_MAX_CAPABILITIES}")
        labels = parse_labels(m.get("labels"))
        return cls(
            device_id=as_device_id(require(m, "device_id", "reported")),
            at=as_number(require(m, "at", "reported"), "reported.at"),
            agent_version=as_str(m.get("agent_version", ""), "reported.agent_version", 64),
            desired_version=as_int(m.get("desired_version", 0), "reported.desired_version"),
            models={as_label(k, "model name"): ModelReport.from_dict(v) for k, v in models.items()},
            capabilities=tuple(as_label(c, "reported.capabilities") for c in caps),
            labels=labels.labels,
            labels_refused=labels.refused_total,
            agent=None if m.get("agent") is None else AgentReport.from_dict(m["agent"]),
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = MAX_REPORTED_BYTES) -> ReportedState:
        """Parse a payload (size-capped before parsing). Raises ContractError."""
        return cls.from_dict(load_json(data, max_bytes))
