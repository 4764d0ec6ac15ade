"""``Confusion``: counts of (true class, predicted class) pairs, and what they say. Pure.

A confusion matrix over ``n_classes`` classes is a monoid (``zero``, ``merge``), so a device can
count the ground truth it is told about, telemetry can ship the counts, and the server can merge
them per model version and cohort exactly. It answers accuracy and per-class recall, each with a
Wilson score interval (``wilson_interval``, the one implementation of it here).

Owns the value, its strict wire form (``to_dict``/``from_dict``: a square list of lists of
non-negative integers, at most ``MAX_CLASSES`` classes) and the interval. Does not own where the
labels come from (the device's feedback API, an evaluation set) nor what a drop leads to (the
gates and ``edge_agent.quality.compare``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from edge_agent.errors import ContractError

__all__ = ["MAX_CLASSES", "MAX_COUNT", "Confusion", "wilson_interval"]

#: Classes a confusion matrix may have on the wire (a classifier's label list is capped the same).
MAX_CLASSES: Final = 1024
#: Largest count a cell may hold on the wire (2**53 - 1: exact in every JSON reader).
MAX_COUNT: Final = (1 << 53) - 1


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``successes / n`` at ``z``; (0, 1) when n == 0.

    Raises:
        ValueError: ``successes`` outside ``0..n`` or a negative ``z``.
    """
    if n < 0 or not 0 <= successes <= n or z < 0:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n and z >= 0 ({successes}, {n})")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Confusion:
    """``counts[t][p]``: how many samples of true class ``t`` were predicted as ``p``."""

    counts: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        k = len(self.counts)
        if not 1 <= k <= MAX_CLASSES:
            raise ContractError(f"a confusion matrix needs 1..{MAX_CLASSES} classes, got {k}")
        for row in self.counts:
            if len(row) != k:
                raise ContractError("a confusion matrix must be square")
            for c in row:
                if type(c) is not int or not 0 <= c <= MAX_COUNT:
                    raise ContractError(f"confusion counts must be integers 0..{MAX_COUNT}")

    # ------------------------------------------------------------------ building
    @classmethod
    def zero(cls, n_classes: int) -> Confusion:
        """No samples yet.

        Raises:
            ContractError: ``n_classes`` outside ``1..MAX_CLASSES``.
        """
        if not isinstance(n_classes, int) or not 1 <= n_classes <= MAX_CLASSES:
            raise ContractError(f"a confusion matrix needs 1..{MAX_CLASSES} classes")
        return cls(tuple((0,) * n_classes for _ in range(n_classes)))

    @classmethod
    def from_labels(
        cls,
        truth: Sequence[int] | npt.NDArray[Any],
        predicted: Sequence[int] | npt.NDArray[Any],
        n_classes: int,
    ) -> Confusion:
        """Count aligned pairs of true and predicted class indices.

        Raises:
            ContractError: different lengths, or an index outside ``0..n_classes-1``.
        """
        t = np.asarray(truth)
        p = np.asarray(predicted)
        if t.shape != p.shape or t.ndim != 1:
            raise ContractError("truth and predictions must be 1-D and of the same length")
        zero = cls.zero(n_classes)
        if t.size == 0:
            return zero
        if not (np.issubdtype(t.dtype, np.integer) and np.issubdtype(p.dtype, np.integer)):
            raise ContractError("class indices must be integers")
        if t.min() < 0 or p.min() < 0 or t.max() >= n_classes or p.max() >= n_classes:
            raise ContractError(f"class indices must be in 0..{n_classes - 1}")
        flat = np.bincount(t.astype(np.int64) * n_classes + p, minlength=n_classes * n_classes)
        grid = flat.reshape(n_classes, n_classes)
        return cls(tuple(tuple(int(c) for c in row) for row in grid))

    def add(self, truth: int, predicted: int) -> Confusion:
        """This matrix with one more sample.

        Raises:
            ContractError: an index outside the classes.
        """
        k = self.n_classes
        if not (0 <= truth < k and 0 <= predicted < k):
            raise ContractError(f"class indices must be in 0..{k - 1}")
        rows = [list(r) for r in self.counts]
        rows[truth][predicted] += 1
        return Confusion(tuple(tuple(r) for r in rows))

    def merge(self, other: Confusion) -> Confusion:
        """The exact sum of two matrices over the same classes.

        Raises:
            ContractError: different numbers of classes.
        """
        if other.n_classes != self.n_classes:
            raise ContractError(
                f"cannot merge confusion matrices of {self.n_classes} and {other.n_classes} classes"
            )
        return Confusion(
            tuple(
                tuple(a + b for a, b in zip(ra, rb, strict=True))
                for ra, rb in zip(self.counts, other.counts, strict=True)
            )
        )

    @classmethod
    def total(cls, items: Iterable[Confusion], n_classes: int) -> Confusion:
        """The sum of ``items`` (``zero(n_classes)`` when there are none)."""
        out = cls.zero(n_classes)
        for item in items:
            out = out.merge(item)
        return out

    # ------------------------------------------------------------------ reading
    @property
    def n_classes(self) -> int:
        return len(self.counts)

    @property
    def n(self) -> int:
        """Samples counted."""
        return sum(sum(r) for r in self.counts)

    @property
    def correct(self) -> int:
        """Samples whose prediction was the true class."""
        return sum(self.counts[i][i] for i in range(self.n_classes))

    def accuracy(self) -> float | None:
        """Correct share of the samples; None without samples."""
        n = self.n
        return None if n == 0 else self.correct / n

    def accuracy_interval(self, z: float = 1.96) -> tuple[float, float]:
        """Wilson interval of the accuracy at ``z``."""
        return wilson_interval(self.correct, self.n, z)

    def support(self, cls_index: int) -> int:
        """Samples whose true class is ``cls_index``."""
        return sum(self.counts[cls_index])

    def recall(self, cls_index: int) -> float | None:
        """Share of class ``cls_index``'s samples predicted as it; None without any."""
        s = self.support(cls_index)
        return None if s == 0 else self.counts[cls_index][cls_index] / s

    def flips(self, top: int = 5) -> list[tuple[int, int, int]]:
        """The largest off-diagonal cells as ``(true, predicted, count)``, largest first."""
        cells = [
            (t, p, c)
            for t, row in enumerate(self.counts)
            for p, c in enumerate(row)
            if t != p and c > 0
        ]
        cells.sort(key=lambda x: (-x[2], x[0], x[1]))
        return cells[:top]

    # ------------------------------------------------------------------ wire
    def to_dict(self) -> dict[str, Any]:
        """``{"counts": [[...], ...]}``."""
        return {"counts": [list(r) for r in self.counts]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Confusion:
        """Strict inverse of ``to_dict``.

        Raises:
            ContractError: not a square matrix of non-negative integers within the limits.
        """
        if not isinstance(data, Mapping) or set(data) - {"counts"} or "counts" not in data:
            raise ContractError("a confusion matrix is an object with only 'counts'")
        rows = data["counts"]
        if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
            raise ContractError("confusion 'counts' must be a list of lists")
        if len(rows) > MAX_CLASSES:
            raise ContractError(f"a confusion matrix has at most {MAX_CLASSES} classes")
        return cls(tuple(tuple(r) for r in rows))
