"""Ground truth on the server: confusion counts out of reports, merged, and judged per cohort.

Devices report, per model, cumulative confusion counts per answering version (the
``ground_truth`` part of a telemetry report, ``edge_agent.wire.telemetry_ground_truth``). This
module takes the difference of one version's counts between two consecutive reports
(``confusion_delta``, used by ``rollouts.metrics`` so rollout windows and history rollups fold
it like every other counter), merges counts (``merge_confusion``) and summarises them as
accuracy with a Wilson interval (``AccuracySummary``), which the ``ground_truth`` gate, the
admin API and ``fleet-server models accuracy`` show.

Only the version the model serves in both reports is counted for an interval (as every counter
of ``WindowMetrics``): labels that arrive after a device switched versions count for the new
cell's key but under their own version's matrix, which the interval does not read.

Pure: values in, values out; owns no storage. The matrix itself is ``edge_agent.quality``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import ContractError
from edge_agent.quality.confusion import Confusion, wilson_interval

__all__ = ["AccuracySummary", "confusion_delta", "merge_confusion", "reported_confusion"]


def reported_confusion(model: Mapping[str, Any], version: int) -> Confusion | None:
    """The cumulative counts of ``version`` in a report's model object (None: none, or bad)."""
    truth = model.get("ground_truth")
    versions = truth.get("versions") if isinstance(truth, Mapping) else None
    for entry in versions if isinstance(versions, list) else ():
        if isinstance(entry, Mapping) and entry.get("version") == version:
            try:
                return Confusion.from_dict({"counts": entry.get("counts")})
            except ContractError:
                return None
    return None


def confusion_delta(prev: Mapping[str, Any], cur: Mapping[str, Any]) -> Confusion | None:
    """Counts of the version ``cur`` serves added between two reports of one agent run.

    ``prev`` without counts for it counts as zero (counters start at zero with the run); None
    when ``cur`` has none, the classes differ or a count went backwards.
    """
    version = cur.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        return None
    after = reported_confusion(cur, version)
    if after is None:
        return None
    before = reported_confusion(prev, version) or Confusion.zero(after.n_classes)
    if before.n_classes != after.n_classes:
        return None
    rows = tuple(
        tuple(a - b for a, b in zip(ra, rb, strict=True))
        for ra, rb in zip(after.counts, before.counts, strict=True)
    )
    if any(c < 0 for row in rows for c in row):
        return None
    delta = Confusion(rows)
    return delta if delta.n else None


def merge_confusion(a: Confusion | None, b: Confusion | None) -> Confusion | None:
    """The sum of two optional matrices; with different classes the first one is kept."""
    if a is None:
        return b
    if b is None or b.n_classes != a.n_classes:
        return a
    return a.merge(b)


@dataclass(frozen=True)
class AccuracySummary:
    """Accuracy of merged counts: labelled samples, correct ones and the Wilson interval.

    Attributes:
        n: Labelled samples.
        correct: Of those, predicted right.
        low: Lower Wilson bound at ``z``.
        high: Upper Wilson bound at ``z``.
        z: The interval's z.
    """

    n: int
    correct: int
    low: float
    high: float
    z: float

    @classmethod
    def of(cls, confusion: Confusion | None, z: float = 1.96) -> AccuracySummary:
        """The summary of ``confusion`` (no samples: n 0 and the interval (0, 1))."""
        n = 0 if confusion is None else confusion.n
        correct = 0 if confusion is None else confusion.correct
        low, high = wilson_interval(correct, n, z)
        return cls(n, correct, low, high, z)

    @property
    def accuracy(self) -> float | None:
        """``correct / n``; None without samples."""
        return None if self.n == 0 else self.correct / self.n

    def to_dict(self) -> dict[str, Any]:
        """``n``, ``correct``, ``accuracy``, ``low``, ``high``, ``z``."""
        return {
            "n": self.n,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "low": self.low,
            "high": self.high,
            "z": self.z,
        }

    def __str__(self) -> str:
        if self.accuracy is None:
            return "no labels"
        return f"{self.accuracy:.1%} of {self.n} labelled [{self.low:.1%}, {self.high:.1%}]"
