"""One model in the telemetry report: ``ModelStats``, the composition of its parts.

Owns ``ModelStats`` and the parts it is made of (frozen dataclasses following
``edge_agent.wire.fields.Part``: each owns some keys of the model object, reads them strictly
with ``from_dict``, writes them with ``to_dict`` and builds them tolerantly from a model of
``Agent.status()`` with ``from_status``): ``ServingState`` (version, probation),
``RequestCounters`` (requests by outcome, source, reject reason, dropped-row reason, A/B arm)
and ``ShadowComparison`` (the nested ``ShadowStats``), here, and ``LatencyHistogram``,
``LatencyQuantiles`` (``edge_agent.wire.telemetry_latency``), ``DriftWindows``
(``edge_agent.wire.telemetry_drift``) and ``GroundTruthCounts``
(``edge_agent.wire.telemetry_ground_truth``) and ``ShadowFlips``
(``edge_agent.wire.telemetry_shadow_flips``). ``ModelStats`` keeps one flat, typed attribute per
part field; its wire object is the union of its parts' (``MODEL_PARTS``).
Does not own the report around it (``edge_agent.wire.telemetry_report``); does no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

from edge_agent.drift.monitor import DriftWindow
from edge_agent.errors import ContractError
from edge_agent.wire.fields import (
    Part,
    as_counts,
    as_int,
    as_object,
    as_opt_number,
    count_or_zero,
    decode_parts,
    encode_parts,
    finite_or_none,
    part_fields,
    require,
    tolerant_counts,
)
from edge_agent.wire.telemetry_drift import DriftSummary, DriftWindows
from edge_agent.wire.telemetry_ground_truth import GroundTruthCounts, GroundTruthStats
from edge_agent.wire.telemetry_latency import (
    LATENCY_BUCKETS_MS,
    LatencyHistogram,
    LatencyQuantiles,
)
from edge_agent.wire.telemetry_shadow_flips import ShadowFlips, ShadowFlipStats

__all__ = [
    "MODEL_PARTS",
    "ModelStats",
    "RequestCounters",
    "ServingState",
    "ShadowComparison",
    "ShadowStats",
]

_W: Final = "model"  # the parent object, in error messages
_SHADOW_INTS: Final = (
    "offered",
    "sampled",
    "dropped",
    "compared",
    "agree_rows",
    "disagree_rows",
    "candidate_errors",
)
_SHADOW_FLOATS: Final = (
    "agreement",
    "live_p50_ms",
    "live_p99_ms",
    "candidate_p50_ms",
    "candidate_p99_ms",
)


@dataclass(frozen=True)
class ServingState:
    """Which version serves, and whether it is still being judged.

    Attributes:
        version: Model version serving.
        on_probation: Freshly installed and still being judged.
    """

    KEYS: ClassVar[tuple[str, ...]] = ("version", "on_probation")

    version: int
    on_probation: bool = False

    def to_dict(self) -> dict[str, Any]:
        """``version`` and ``on_probation``."""
        return {"version": self.version, "on_probation": self.on_probation}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ServingState:
        """Parse strictly (``on_probation`` absent: False). Raises ContractError."""
        probation = d.get("on_probation", False)
        if not isinstance(probation, bool):
            raise ContractError(f"{_W}: on_probation must be a boolean")
        return cls(
            version=as_int(require(d, "version", _W), f"{_W}.version"), on_probation=probation
        )

    @classmethod
    def from_status(cls, m: Mapping[str, Any]) -> ServingState:
        """From a model of ``Agent.status()`` (tolerant)."""
        return cls(
            version=count_or_zero(m.get("version")),
            on_probation=bool(m.get("on_probation", False)),
        )


@dataclass(frozen=True)
class RequestCounters:
    """The model's request counters, cumulative since the agent started.

    Attributes:
        outcomes: Requests by outcome (``ok``, ``error``, ``rejected``).
        sources: Requests answered by source (``device``, ``cloud``), when known.
        rejects_by_reason: Requests refused by input validation, by reason.
        dropped_rows_by_reason: Rows dropped from accepted requests, by reason.
        ab: Requests per A/B arm, if traffic is split (else None).
    """

    KEYS: ClassVar[tuple[str, ...]] = (
        "outcomes",
        "sources",
        "rejects_by_reason",
        "dropped_rows_by_reason",
        "ab",
    )

    outcomes: Mapping[str, int] = field(default_factory=dict)
    sources: Mapping[str, int] = field(default_factory=dict)
    rejects_by_reason: Mapping[str, int] = field(default_factory=dict)
    dropped_rows_by_reason: Mapping[str, int] = field(default_factory=dict)
    ab: Mapping[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The five counter maps (``ab`` null when traffic is not split)."""
        return {
            "outcomes": dict(self.outcomes),
            "sources": dict(self.sources),
            "rejects_by_reason": dict(self.rejects_by_reason),
            "dropped_rows_by_reason": dict(self.dropped_rows_by_reason),
            "ab": None if self.ab is None else dict(self.ab),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RequestCounters:
        """Parse strictly (``sources`` absent: empty). Raises ContractError."""
        ab = d.get("ab")
        return cls(
            outcomes=as_counts(require(d, "outcomes", _W), f"{_W}.outcomes"),
            sources=as_counts(d.get("sources", {}), f"{_W}.sources"),
            rejects_by_reason=as_counts(require(d, "rejects_by_reason", _W), f"{_W}.rejects"),
            dropped_rows_by_reason=as_counts(
                require(d, "dropped_rows_by_reason", _W), f"{_W}.dropped"
            ),
            ab=None if ab is None else as_counts(ab, f"{_W}.ab"),
        )

    @classmethod
    def from_status(cls, m: Mapping[str, Any]) -> RequestCounters:
        """From a model of ``Agent.status()`` (tolerant: bad entries are left out)."""
        requests = count_or_zero(m.get("requests"))
        errors = count_or_zero(m.get("errors"))
        rejects = tolerant_counts(m.get("rejects_by_reason"))
        rejected = sum(rejects.values())
        ab = m.get("ab")
        return cls(
            # Row-level rejects are inside ``requests``; request-level ones are not, so ``ok``
            # is a lower bound when clients send malformed requests.
            outcomes={
                "ok": max(0, requests - errors - rejected),
                "error": errors,
                "rejected": rejected,
            },
            sources=tolerant_counts(m.get("sources")),
            rejects_by_reason=rejects,
            dropped_rows_by_reason=tolerant_counts(m.get("dropped_rows_by_reason")),
            ab=tolerant_counts(ab) if isinstance(ab, Mapping) else None,
        )


@dataclass(frozen=True)
class ShadowStats:
    """Shadow (candidate next to live) or A/B comparison counters of one model.

    ``counts`` holds ``offered``, ``sampled``, ``dropped``, ``compared``, ``agree_rows``,
    ``disagree_rows``, ``candidate_errors``; the floats are None before any comparison.
    """

    counts: Mapping[str, int] = field(default_factory=dict)
    agreement: float | None = None
    live_p50_ms: float | None = None
    live_p99_ms: float | None = None
    candidate_p50_ms: float | None = None
    candidate_p99_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        out: dict[str, Any] = {"counts": dict(self.counts)}
        out.update({k: getattr(self, k) for k in _SHADOW_FLOATS})
        return out

    @classmethod
    def from_dict(cls, d: Any) -> ShadowStats:
        """Parse strictly. Raises ContractError (missing or mistyped field)."""
        d = as_object(d, "shadow")
        floats = {k: as_opt_number(d.get(k), f"shadow.{k}") for k in _SHADOW_FLOATS}
        return cls(counts=as_counts(require(d, "counts", "shadow"), "shadow.counts"), **floats)

    @classmethod
    def from_status(cls, raw: Mapping[str, Any]) -> ShadowStats:
        """From a model's ``shadow`` in ``Agent.status()`` (tolerant)."""
        return cls(
            counts=tolerant_counts({k: raw.get(k) for k in _SHADOW_INTS}),
            **{k: finite_or_none(raw.get(k)) for k in _SHADOW_FLOATS},
        )


@dataclass(frozen=True)
class ShadowComparison:
    """The model's shadow or A/B comparison, if a candidate runs next to it.

    Attributes:
        shadow: The comparison's statistics, or None (the key is then null).
    """

    KEYS: ClassVar[tuple[str, ...]] = ("shadow",)

    shadow: ShadowStats | None = None

    def to_dict(self) -> dict[str, Any]:
        """``shadow``."""
        return {"shadow": None if self.shadow is None else self.shadow.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShadowComparison:
        """Parse strictly. Raises ContractError (an invalid ``ShadowStats``)."""
        shadow = d.get("shadow")
        return cls(shadow=None if shadow is None else ShadowStats.from_dict(shadow))

    @classmethod
    def from_status(cls, m: Mapping[str, Any]) -> ShadowComparison:
        """From a model of ``Agent.status()`` (tolerant: a non-object is no comparison)."""
        raw = m.get("shadow")
        return cls(shadow=ShadowStats.from_status(raw) if isinstance(raw, Mapping) else None)


#: The parts of a model object, in the order ``ModelStats.from_dict`` checks them. Their
#: ``KEYS`` are disjoint and cover every property of the schema's ``model`` (a test checks it).
MODEL_PARTS: Final[tuple[type[Part], ...]] = (
    ServingState,
    RequestCounters,
    LatencyHistogram,
    LatencyQuantiles,
    DriftWindows,
    ShadowComparison,
    GroundTruthCounts,
    ShadowFlips,
)


@dataclass(frozen=True)
class ModelStats:
    """One loaded model in a report. Counters are cumulative since the agent started.

    One attribute per field of its parts (``MODEL_PARTS``), where each is documented:

    Attributes:
        version, on_probation: ``ServingState``.
        outcomes, sources, rejects_by_reason, dropped_rows_by_reason, ab: ``RequestCounters``.
        latency_buckets, latency_fine: ``LatencyHistogram``.
        latency_ms: ``LatencyQuantiles``.
        drift: ``DriftWindows``.
        shadow: ``ShadowComparison``.
        ground_truth: ``GroundTruthCounts`` (``edge_agent.wire.telemetry_ground_truth``).
        shadow_flips: ``ShadowFlips`` (``edge_agent.wire.telemetry_shadow_flips``).
    """

    version: int
    on_probation: bool = False
    outcomes: Mapping[str, int] = field(default_factory=dict)
    sources: Mapping[str, int] = field(default_factory=dict)
    latency_buckets: tuple[int, ...] = (0,) * (len(LATENCY_BUCKETS_MS) + 1)
    latency_ms: Mapping[str, float] = field(default_factory=dict)
    latency_fine: tuple[int, ...] | None = None
    rejects_by_reason: Mapping[str, int] = field(default_factory=dict)
    dropped_rows_by_reason: Mapping[str, int] = field(default_factory=dict)
    drift: tuple[DriftSummary, ...] = ()
    shadow: ShadowStats | None = None
    ab: Mapping[str, int] | None = None
    ground_truth: GroundTruthStats | None = None
    shadow_flips: ShadowFlipStats | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: the union of its parts' (``latency_fine`` only when known)."""
        return encode_parts(self, MODEL_PARTS)

    @classmethod
    def from_dict(cls, d: Any) -> ModelStats:
        """Parse strictly, part by part. Raises ContractError (missing, mistyped or
        out-of-range field)."""
        return cls(**decode_parts(as_object(d, _W), MODEL_PARTS))

    @classmethod
    def from_status(cls, m: Mapping[str, Any], windows: Iterable[DriftWindow]) -> ModelStats:
        """From a model of ``Agent.status()`` and its closed drift windows (tolerant: missing
        or mistyped parts become zeros or are left out)."""
        parts = (
            ServingState.from_status(m),
            RequestCounters.from_status(m),
            LatencyHistogram.from_status(m),
            LatencyQuantiles.from_status(m),
            DriftWindows.from_windows(windows),
            ShadowComparison.from_status(m),
            GroundTruthCounts.from_status(m),
            ShadowFlips.from_status(m),
        )
        return cls(**part_fields(parts))
