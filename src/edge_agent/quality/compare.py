"""Champion against challenger on one labelled evaluation set, and the verdict. Pure.

``compare_models`` takes the true classes and both models' predicted classes for the same samples
and returns a ``ModelComparison``: each model's confusion matrix against the truth, and the
confusion between the two models' answers (which classes the challenger flips to which). The
builder's ``--compare-to`` and the server's check before a rollout both call it, so they report
and judge the same way.

``judge`` applies ``ComparisonLimits``. A regression refuses only when it is both larger than the
limit and not explainable by the evaluation set's own size: the answers are paired (same samples),
so the test is McNemar's on the discordant pairs (champion right and challenger wrong, and the
reverse), one-sided at ``z``. Per-class recall is judged the same way on the samples of that
class, for classes with at least ``min_class_samples`` samples.

Does not own running the models (the builder's measurement, the server's cloud models) nor what
a refusal leads to (the builder's exit, the rollout admission and its override).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from edge_agent.errors import ContractError
from edge_agent.quality.confusion import Confusion

__all__ = [
    "ComparisonLimits",
    "ComparisonVerdict",
    "ModelComparison",
    "compare_models",
    "judge",
    "mcnemar_z",
]

#: One-sided z of the regression test (about 1% false refusals of an equal model per check).
DEFAULT_Z: Final = 2.326


def mcnemar_z(champion_only: int, challenger_only: int) -> float:
    """McNemar's statistic for "the challenger is worse", as a z-score (continuity-corrected).

    ``champion_only``: samples the champion got right and the challenger wrong;
    ``challenger_only``: the reverse. 0.0 when there are no discordant pairs or the challenger is
    not worse.
    """
    b, c = champion_only, challenger_only
    if b + c == 0 or b <= c:
        return 0.0
    return (abs(b - c) - 1) / math.sqrt(b + c)


@dataclass(frozen=True)
class ModelComparison:
    """Both models on the same labelled samples."""

    champion: Confusion
    challenger: Confusion
    between: Confusion  # rows: the champion's answer, columns: the challenger's answer
    champion_only: int  # right by the champion, wrong by the challenger
    challenger_only: int
    champion_only_by_class: tuple[int, ...]
    challenger_only_by_class: tuple[int, ...]

    @property
    def n(self) -> int:
        return self.champion.n

    @property
    def accuracy_delta(self) -> float | None:
        """Challenger accuracy minus champion accuracy (negative: the challenger is worse)."""
        a, b = self.champion.accuracy(), self.challenger.accuracy()
        return None if a is None or b is None else b - a

    @property
    def disagreement(self) -> float | None:
        """Share of samples on which the two models answer differently."""
        n = self.between.n
        return None if n == 0 else 1 - self.between.correct / n

    def recall_deltas(self) -> tuple[float | None, ...]:
        """Per class: challenger recall minus champion recall (None for an absent class)."""
        out: list[float | None] = []
        for k in range(self.champion.n_classes):
            a, b = self.champion.recall(k), self.challenger.recall(k)
            out.append(None if a is None or b is None else b - a)
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary with the matrices (for reports and the rollout record)."""
        return {
            "n": self.n,
            "champion": self.champion.to_dict(),
            "challenger": self.challenger.to_dict(),
            "between": self.between.to_dict(),
            "champion_only": self.champion_only,
            "challenger_only": self.challenger_only,
            "champion_only_by_class": list(self.champion_only_by_class),
            "challenger_only_by_class": list(self.challenger_only_by_class),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelComparison:
        """Strict inverse of ``to_dict``.

        Raises:
            ContractError: a missing or malformed field, or counts that do not add up.
        """
        keys = {
            "n",
            "champion",
            "challenger",
            "between",
            "champion_only",
            "challenger_only",
            "champion_only_by_class",
            "challenger_only_by_class",
        }
        if not isinstance(data, Mapping) or set(data) != keys:
            raise ContractError(f"a model comparison has exactly the fields {sorted(keys)}")

        def ints(v: Any, what: str) -> tuple[int, ...]:
            if not isinstance(v, list) or not all(type(x) is int and x >= 0 for x in v):
                raise ContractError(f"{what} must be a list of non-negative integers")
            return tuple(v)

        def count(v: Any, what: str) -> int:
            if type(v) is not int or v < 0:
                raise ContractError(f"{what} must be a non-negative integer")
            return int(v)

        out = cls(
            Confusion.from_dict(data["champion"]),
            Confusion.from_dict(data["challenger"]),
            Confusion.from_dict(data["between"]),
            count(data["champion_only"], "champion_only"),
            count(data["challenger_only"], "challenger_only"),
            ints(data["champion_only_by_class"], "champion_only_by_class"),
            ints(data["challenger_only_by_class"], "challenger_only_by_class"),
        )
        k = out.champion.n_classes
        if (
            count(data["n"], "n") != out.n
            or {out.challenger.n_classes, out.between.n_classes} != {k}
            or {out.challenger.n, out.between.n} != {out.n}
            or len(out.champion_only_by_class) != k
            or len(out.challenger_only_by_class) != k
            or sum(out.champion_only_by_class) != out.champion_only
            or sum(out.challenger_only_by_class) != out.challenger_only
        ):
            raise ContractError("a model comparison's counts do not add up")
        return out


def compare_models(
    truth: Sequence[int] | npt.NDArray[Any],
    champion: Sequence[int] | npt.NDArray[Any],
    challenger: Sequence[int] | npt.NDArray[Any],
    n_classes: int,
) -> ModelComparison:
    """Compare two models' predicted classes on the same labelled samples.

    Raises:
        ContractError: arrays of different lengths or class indices outside ``0..n_classes-1``.
    """
    t, a, b = np.asarray(truth), np.asarray(champion), np.asarray(challenger)
    if not (t.shape == a.shape == b.shape):
        raise ContractError("truth and both models' predictions must have the same length")
    a_conf = Confusion.from_labels(t, a, n_classes)
    b_conf = Confusion.from_labels(t, b, n_classes)
    between = Confusion.from_labels(a, b, n_classes)
    a_right, b_right = a == t, b == t
    only_a = a_right & ~b_right
    only_b = b_right & ~a_right
    by_a = np.bincount(t[only_a].astype(np.int64), minlength=n_classes) if t.size else None
    by_b = np.bincount(t[only_b].astype(np.int64), minlength=n_classes) if t.size else None
    zeros = (0,) * n_classes
    return ModelComparison(
        a_conf,
        b_conf,
        between,
        int(only_a.sum()),
        int(only_b.sum()),
        zeros if by_a is None else tuple(int(x) for x in by_a),
        zeros if by_b is None else tuple(int(x) for x in by_b),
    )


@dataclass(frozen=True)
class ComparisonLimits:
    """How much worse a challenger may be on the evaluation set before it is refused."""

    max_accuracy_drop: float = 0.01
    max_recall_drop: float = 0.05
    min_class_samples: int = 20
    min_samples: int = 50
    z: float = DEFAULT_Z

    def __post_init__(self) -> None:
        if not (0 <= self.max_accuracy_drop <= 1 and 0 <= self.max_recall_drop <= 1):
            raise ContractError("comparison limits: drops must be in [0, 1]")
        if self.min_class_samples < 1 or self.min_samples < 1 or not self.z > 0:
            raise ContractError("comparison limits: sample minimums >= 1 and z > 0")


@dataclass(frozen=True)
class ComparisonVerdict:
    """``regressed`` with one line per reason; ``notes`` says what could not be judged."""

    regressed: bool
    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())


def judge(comparison: ModelComparison, limits: ComparisonLimits) -> ComparisonVerdict:
    """Is the challenger worse than the champion beyond ``limits`` on this evaluation set?"""
    if comparison.n < limits.min_samples:
        return ComparisonVerdict(
            False, (), (f"{comparison.n} labelled samples, fewer than {limits.min_samples}",)
        )
    reasons: list[str] = []
    notes: list[str] = []
    delta = comparison.accuracy_delta
    assert delta is not None  # n >= min_samples >= 1
    z = mcnemar_z(comparison.champion_only, comparison.challenger_only)
    if -delta > limits.max_accuracy_drop and z > limits.z:
        reasons.append(
            f"accuracy {comparison.champion.accuracy():.1%} -> "
            f"{comparison.challenger.accuracy():.1%} ({delta:+.1%}, limit "
            f"-{limits.max_accuracy_drop:.1%}; McNemar z={z:.1f} on "
            f"{comparison.champion_only}/{comparison.challenger_only} discordant)"
        )
    for k, d in enumerate(comparison.recall_deltas()):
        support = comparison.champion.support(k)
        if d is None or support < limits.min_class_samples:
            if support:
                notes.append(f"class {k}: {support} samples, recall not judged")
            continue
        zk = mcnemar_z(comparison.champion_only_by_class[k], comparison.challenger_only_by_class[k])
        if -d > limits.max_recall_drop and zk > limits.z:
            flips = [f for f in comparison.challenger.flips(top=100) if f[0] == k][:2]
            into = ", ".join(f"{c} as class {p}" for _, p, c in flips)
            where = f"; now predicted {into}" if into else ""
            reasons.append(
                f"class {k} recall {comparison.champion.recall(k):.1%} -> "
                f"{comparison.challenger.recall(k):.1%} ({d:+.1%}, limit "
                f"-{limits.max_recall_drop:.1%}; z={zk:.1f}){where}"
            )
    return ComparisonVerdict(bool(reasons), tuple(reasons), tuple(notes))
