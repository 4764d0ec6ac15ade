"""A rollout shadow's comparison in the telemetry report: the model's ``shadow_flips`` part.

While a rollout's shadow runs beside the live model (``edge_agent.serving.candidates``), the
device reports, per shadow version, the rows compared, the rows on which both answered the same
class, and which classes flip to which: a ``Confusion`` with rows = the live answer and columns
= the shadow's answer (its diagonal is the agreement). Counters are cumulative while the shadow
runs, like every counter of the report (a consumer differences consecutive reports; a counter
that went backwards is a new baseline). Only classifiers with at most ``MAX_CLASSES`` classes
report it.

Wire form (the key is absent without a classifying shadow, so older reports stay
byte-identical)::

    "shadow_flips": {"versions": [{"version": 7, "compared": 512, "agree": 470,
                                   "counts": [[50, 0, ...], ...]}]}

Owns ``ShadowFlipStats`` (the nested value) and ``ShadowFlips`` (the part of ``ModelStats``;
see ``edge_agent.wire.fields.Part``). Does not own the comparison (``serving.shadow``), the
matrix (``edge_agent.quality.confusion``) or the model object (``telemetry_model``); no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

from edge_agent.errors import ContractError
from edge_agent.quality.confusion import Confusion
from edge_agent.wire.fields import as_int, as_object

__all__ = ["MAX_CLASSES", "MAX_VERSIONS", "ShadowFlipStats", "ShadowFlips", "VersionFlips"]

#: Classes a reported flip matrix may have (models with more report none).
MAX_CLASSES: Final = 32
#: Shadow versions of one model reported at once.
MAX_VERSIONS: Final = 2
_W: Final = "model.shadow_flips"


@dataclass(frozen=True)
class VersionFlips:
    """One shadow version's comparison: rows compared and agreeing, and the flip matrix.

    Raises:
        ContractError: ``agree`` above ``compared``, or the matrix does not sum to ``compared``.
    """

    compared: int
    agree: int
    flips: Confusion

    def __post_init__(self) -> None:
        if not 0 <= self.agree <= self.compared:
            raise ContractError(f"{_W}: agree must be within 0..compared")
        if self.flips.n != self.compared or self.flips.correct != self.agree:
            raise ContractError(f"{_W}: the flip matrix must sum to compared, its trace to agree")
        if self.flips.n_classes > MAX_CLASSES:
            raise ContractError(f"{_W}: at most {MAX_CLASSES} classes")


@dataclass(frozen=True)
class ShadowFlipStats:
    """Per shadow version, its ``VersionFlips`` (cumulative while the shadow runs)."""

    versions: Mapping[int, VersionFlips] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.versions) > MAX_VERSIONS:
            raise ContractError(f"{_W}: at most {MAX_VERSIONS} versions")

    def to_dict(self) -> dict[str, Any]:
        """``versions`` (ascending)."""
        return {
            "versions": [
                {
                    "version": v,
                    "compared": self.versions[v].compared,
                    "agree": self.versions[v].agree,
                    "counts": [list(r) for r in self.versions[v].flips.counts],
                }
                for v in sorted(self.versions)
            ]
        }

    @classmethod
    def from_dict(cls, d: Any) -> ShadowFlipStats:
        """Parse strictly. Raises ContractError (a bad count, matrix, version or limit)."""
        d = as_object(d, _W)
        if set(d) - {"versions"}:
            raise ContractError(f"{_W}: unknown keys {sorted(set(d) - {'versions'})}")
        entries = d.get("versions")
        if not isinstance(entries, list) or len(entries) > MAX_VERSIONS:
            raise ContractError(f"{_W}.versions must be a list of at most {MAX_VERSIONS}")
        out: dict[int, VersionFlips] = {}
        for entry in entries:
            e = as_object(entry, f"{_W}.versions[]")
            v = as_int(e.get("version"), f"{_W}.versions[].version", 1)
            rows = e.get("counts")
            if isinstance(rows, list) and len(rows) > MAX_CLASSES:
                raise ContractError(f"{_W}: at most {MAX_CLASSES} classes")
            if v in out:
                raise ContractError(f"{_W}: version {v} twice")
            out[v] = VersionFlips(
                as_int(e.get("compared"), f"{_W}.versions[].compared"),
                as_int(e.get("agree"), f"{_W}.versions[].agree"),
                Confusion.from_dict({"counts": rows}),
            )
        return cls(out)

    @classmethod
    def from_status(cls, raw: Mapping[str, Any]) -> ShadowFlipStats | None:
        """From a model's ``shadow`` in ``Agent.status()`` (``ShadowRunner.stats``); None
        without a version, a flip matrix, or with one that does not parse or is too large."""
        version, rows = raw.get("version"), raw.get("flips")
        if type(version) is not int or version < 1 or not isinstance(rows, list):
            return None
        try:
            flips = Confusion.from_dict({"counts": rows})
            entry = VersionFlips(flips.n, flips.correct, flips)
        except (ContractError, TypeError, ValueError):
            return None
        return cls({version: entry})


@dataclass(frozen=True)
class ShadowFlips:
    """The model's rollout-shadow comparison, if a classifying shadow runs.

    Attributes:
        shadow_flips: The statistics, or None (the key is then absent).
    """

    KEYS: ClassVar[tuple[str, ...]] = ("shadow_flips",)

    shadow_flips: ShadowFlipStats | None = None

    def to_dict(self) -> dict[str, Any]:
        """``shadow_flips``, only when known."""
        return {} if self.shadow_flips is None else {"shadow_flips": self.shadow_flips.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShadowFlips:
        """Parse strictly (absent or null: None). Raises ContractError."""
        raw = d.get("shadow_flips")
        return cls(None if raw is None else ShadowFlipStats.from_dict(raw))

    @classmethod
    def from_status(cls, m: Mapping[str, Any]) -> ShadowFlips:
        """From a model of ``Agent.status()`` (tolerant: a non-object is none)."""
        raw = m.get("shadow")
        return cls(ShadowFlipStats.from_status(raw) if isinstance(raw, Mapping) else None)
