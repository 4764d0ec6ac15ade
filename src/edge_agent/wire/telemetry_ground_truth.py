"""Ground truth in the telemetry report: the model's ``ground_truth`` part.

A device that is told the right answer to earlier requests (``POST .../feedback``, counted by
``edge_agent.serving.ground_truth``) reports, per model, the feedback outcomes and one
confusion matrix per model version that answered, cumulative since the agent started like every
counter of the report (a consumer differences consecutive reports). Only classifiers report it,
with at most ``MAX_CLASSES`` classes and ``MAX_VERSIONS`` versions, so the part stays small
(a 32-class matrix of zeros is about 2 KiB).

Wire form (the key is absent when the model has had no feedback, so older reports stay
byte-identical)::

    "ground_truth": {
        "feedback": {"counted": 41, "unknown_id": 2, "expired": 0, "bad_label": 1},
        "versions": [{"version": 2, "counts": [[9, 1], [0, 31]]}]
    }

Owns ``GroundTruthStats`` (the nested value) and ``GroundTruthCounts`` (the part of
``ModelStats``; see ``edge_agent.wire.fields.Part``). Does not own the counting (the agent), the
matrix (``edge_agent.quality.confusion``) or the model object (``telemetry_model``); no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

from edge_agent.errors import ContractError
from edge_agent.quality.confusion import Confusion
from edge_agent.wire.fields import as_counts, as_int, as_object, tolerant_counts

__all__ = ["MAX_CLASSES", "MAX_VERSIONS", "GroundTruthCounts", "GroundTruthStats"]

#: Classes a reported confusion matrix may have (models with more report no ground truth).
MAX_CLASSES: Final = 32
#: Versions of one model reported at once.
MAX_VERSIONS: Final = 3
_W: Final = "model.ground_truth"


@dataclass(frozen=True)
class GroundTruthStats:
    """Feedback outcomes and confusion counts per answering version, cumulative.

    Attributes:
        feedback: Feedback items by outcome (``counted`` rows, ``unknown_id``, ``expired``,
            ``bad_label``).
        confusion: Per model version, its ``Confusion`` (true class x predicted class).
    """

    feedback: Mapping[str, int] = field(default_factory=dict)
    confusion: Mapping[int, Confusion] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.confusion) > MAX_VERSIONS:
            raise ContractError(f"{_W}: at most {MAX_VERSIONS} versions")
        if any(c.n_classes > MAX_CLASSES for c in self.confusion.values()):
            raise ContractError(f"{_W}: at most {MAX_CLASSES} classes")

    def to_dict(self) -> dict[str, Any]:
        """``feedback`` and ``versions`` (by version, ascending)."""
        return {
            "feedback": dict(self.feedback),
            "versions": [
                {"version": v, "counts": [list(r) for r in self.confusion[v].counts]}
                for v in sorted(self.confusion)
            ],
        }

    @classmethod
    def from_dict(cls, d: Any) -> GroundTruthStats:
        """Parse strictly. Raises ContractError (a bad count, matrix, version or limit)."""
        d = as_object(d, _W)
        versions = d.get("versions", [])
        if not isinstance(versions, list) or len(versions) > MAX_VERSIONS:
            raise ContractError(f"{_W}.versions must be a list of at most {MAX_VERSIONS}")
        confusion: dict[int, Confusion] = {}
        for entry in versions:
            e = as_object(entry, f"{_W}.versions[]")
            v = as_int(e.get("version"), f"{_W}.versions[].version")
            rows = e.get("counts")
            if isinstance(rows, list) and len(rows) > MAX_CLASSES:
                raise ContractError(f"{_W}: at most {MAX_CLASSES} classes")
            if v in confusion:
                raise ContractError(f"{_W}: version {v} twice")
            confusion[v] = Confusion.from_dict({"counts": rows})
        return cls(as_counts(d.get("feedback", {}), f"{_W}.feedback"), confusion)

    @classmethod
    def from_status(cls, raw: Mapping[str, Any]) -> GroundTruthStats:
        """From a model's ``ground_truth`` in ``Agent.status()`` (tolerant: matrices that do
        not parse or are too large are left out, as are versions past the newest few)."""
        confusion: dict[int, Confusion] = {}
        by_version = raw.get("confusion")
        for key, value in by_version.items() if isinstance(by_version, Mapping) else ():
            try:
                version = int(key)
                matrix = Confusion.from_dict(value)
            except (ContractError, TypeError, ValueError):
                continue
            if version >= 0 and matrix.n_classes <= MAX_CLASSES:
                confusion[version] = matrix
        newest = sorted(confusion)[-MAX_VERSIONS:]
        return cls(tolerant_counts(raw.get("feedback")), {v: confusion[v] for v in newest})


@dataclass(frozen=True)
class GroundTruthCounts:
    """The model's ground truth, if it has had feedback.

    Attributes:
        ground_truth: The statistics, or None (the key is then absent).
    """

    KEYS: ClassVar[tuple[str, ...]] = ("ground_truth",)

    ground_truth: GroundTruthStats | None = None

    def to_dict(self) -> dict[str, Any]:
        """``ground_truth``, only when known."""
        return {} if self.ground_truth is None else {"ground_truth": self.ground_truth.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GroundTruthCounts:
        """Parse strictly (absent or null: None). Raises ContractError."""
        raw = d.get("ground_truth")
        return cls(None if raw is None else GroundTruthStats.from_dict(raw))

    @classmethod
    def from_status(cls, m: Mapping[str, Any]) -> GroundTruthCounts:
        """From a model of ``Agent.status()`` (tolerant: a non-object is none)."""
        raw = m.get("ground_truth")
        return cls(GroundTruthStats.from_status(raw) if isinstance(raw, Mapping) else None)
