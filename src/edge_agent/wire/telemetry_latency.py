"""Latency in the telemetry report: the fixed bucket edges and the model's latency parts.

Owns ``LATENCY_BUCKETS_MS`` and ``LATENCY_FINE_BUCKETS_MS`` (fixed for schema_version 1),
``coarse_from_fine`` and ``latency_histogram`` (the histogram maths both sides share), and two
parts of ``ModelStats`` (see ``edge_agent.wire.fields.Part``): ``LatencyHistogram`` (keys
``latency_buckets`` and ``latency_fine``, which must agree) and ``LatencyQuantiles`` (key
``latency_ms``). Each reads its keys strictly (``from_dict``), writes them (``to_dict``) and
builds them tolerantly from a model of ``Agent.status()`` (``from_status``).
Does not own the model or the report (``edge_agent.wire.telemetry_model``,
``edge_agent.wire.telemetry_report``); does no I/O.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

from edge_agent.errors import ContractError
from edge_agent.wire.fields import (
    as_int,
    as_label,
    as_number,
    as_object,
    count_or_zero,
    finite_or_none,
    require,
)

__all__ = [
    "LATENCY_BUCKETS_MS",
    "LATENCY_FINE_BUCKETS_MS",
    "LatencyHistogram",
    "LatencyQuantiles",
    "coarse_from_fine",
    "latency_histogram",
]

#: Upper bucket edges (ms, inclusive); bucket ``i`` counts ``edge[i-1] < ms <= edge[i]``, the
#: last bucket counts everything above 5,000 ms. Fixed for schema_version 1.
LATENCY_BUCKETS_MS: Final = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0)
_R10: Final = (1.0, 1.25, 1.6, 2.0, 2.5, 3.15, 4.0, 5.0, 6.3, 8.0)
#: Upper edges (ms, inclusive) of the fine latency histogram (``ModelStats.latency_fine``): the
#: Renard R10 series (10 log-spaced steps a decade, about 26 % apart) from 50 us to 5 s, so
#: sub-millisecond models are resolved. Every ``LATENCY_BUCKETS_MS`` edge is one of these edges,
#: so a fine histogram collapses exactly onto the coarse one (``coarse_from_fine``).
LATENCY_FINE_BUCKETS_MS: Final = tuple(
    e for e in (round(m * 10.0**k, 6) for k in range(-2, 4) for m in _R10) if 0.05 <= e <= 5000.0
)
# Coarse bucket of each fine bucket (the last, overflow, to the coarse overflow).
_COARSE_OF_FINE: Final = tuple(
    [bisect_left(LATENCY_BUCKETS_MS, e) for e in LATENCY_FINE_BUCKETS_MS]
    + [len(LATENCY_BUCKETS_MS)]
)
_W: Final = "model"  # the parent object, in error messages


def coarse_from_fine(fine: Sequence[int]) -> tuple[int, ...]:
    """The ``LATENCY_BUCKETS_MS`` histogram of a ``LATENCY_FINE_BUCKETS_MS`` one (exact).

    Raises:
        ContractError: ``fine`` does not have one count per fine bucket plus overflow.
    """
    if len(fine) != len(_COARSE_OF_FINE):
        raise ContractError(f"latency_fine must have {len(_COARSE_OF_FINE)} counts")
    out = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    for i, n in zip(_COARSE_OF_FINE, fine, strict=True):
        out[i] += n
    return tuple(out)


def latency_histogram(latencies_ms: Iterable[float]) -> tuple[int, ...]:
    """Counts per ``LATENCY_BUCKETS_MS`` bucket (plus overflow) of some latencies in ms.

    NaN latencies are ignored.
    """
    counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    for ms in latencies_ms:
        if math.isnan(ms):
            continue
        i = next((j for j, e in enumerate(LATENCY_BUCKETS_MS) if ms <= e), len(LATENCY_BUCKETS_MS))
        counts[i] += 1
    return tuple(counts)


@dataclass(frozen=True)
class LatencyHistogram:
    """Requests by latency bucket: coarse (always) and fine (agents since 2026-12).

    Attributes:
        latency_buckets: Counts per ``LATENCY_BUCKETS_MS`` bucket plus one overflow bucket.
        latency_fine: Counts per ``LATENCY_FINE_BUCKETS_MS`` bucket plus overflow, or None
            (the key is then absent, so older reports stay byte-identical). When present,
            ``latency_buckets`` is exactly ``coarse_from_fine(latency_fine)``.
    """

    KEYS: ClassVar[tuple[str, ...]] = ("latency_buckets", "latency_fine")

    latency_buckets: tuple[int, ...] = (0,) * (len(LATENCY_BUCKETS_MS) + 1)
    latency_fine: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """``latency_buckets``, and ``latency_fine`` only when known."""
        out: dict[str, Any] = {"latency_buckets": list(self.latency_buckets)}
        if self.latency_fine is not None:
            out["latency_fine"] = list(self.latency_fine)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencyHistogram:
        """Parse strictly. Raises ContractError (wrong length, a bad count, disagreement)."""
        buckets = require(d, "latency_buckets", _W)
        if not isinstance(buckets, list) or len(buckets) != len(LATENCY_BUCKETS_MS) + 1:
            raise ContractError(f"{_W}: latency_buckets must have {len(LATENCY_BUCKETS_MS) + 1}")
        coarse = tuple(as_int(n, f"{_W}.latency_buckets[]") for n in buckets)
        fine_raw, fine = d.get("latency_fine"), None
        if fine_raw is not None:
            if not isinstance(fine_raw, list):
                raise ContractError(f"{_W}: latency_fine must be a list")
            fine = tuple(as_int(n, f"{_W}.latency_fine[]") for n in fine_raw)
            if coarse_from_fine(fine) != coarse:
                raise ContractError(f"{_W}: latency_fine does not add up to latency_buckets")
        return cls(latency_buckets=coarse, latency_fine=fine)

    @classmethod
    def from_status(cls, m: Mapping[str, Any]) -> LatencyHistogram:
        """From a model of ``Agent.status()`` (tolerant: a bad histogram becomes zeros or
        absent; with a fine one, the coarse one is derived from it so the two agree)."""
        buckets = m.get("latency_buckets")
        if not (isinstance(buckets, list | tuple) and len(buckets) == len(LATENCY_BUCKETS_MS) + 1):
            buckets = (0,) * (len(LATENCY_BUCKETS_MS) + 1)
        coarse = tuple(count_or_zero(b) for b in buckets)
        fine_raw, fine = m.get("latency_fine"), None
        if isinstance(fine_raw, list | tuple) and len(fine_raw) == len(LATENCY_FINE_BUCKETS_MS) + 1:
            fine = tuple(count_or_zero(b) for b in fine_raw)
            coarse = coarse_from_fine(fine)  # the report's two histograms always agree
        return cls(latency_buckets=coarse, latency_fine=fine)


@dataclass(frozen=True)
class LatencyQuantiles:
    """Quantiles of recent latency.

    Attributes:
        latency_ms: By quantile label (``p50``, ``p90``, ``p99``), in ms.
    """

    KEYS: ClassVar[tuple[str, ...]] = ("latency_ms",)

    latency_ms: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """``latency_ms``."""
        return {"latency_ms": dict(self.latency_ms)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencyQuantiles:
        """Parse strictly (absent: empty). Raises ContractError (a bad label or number)."""
        lat = as_object(d.get("latency_ms", {}), f"{_W}.latency_ms")
        return cls(
            latency_ms={
                as_label(k, f"{_W}.latency_ms key"): as_number(v, f"{_W}.latency_ms")
                for k, v in lat.items()
            }
        )

    @classmethod
    def from_status(cls, m: Mapping[str, Any]) -> LatencyQuantiles:
        """From a model's ``latency`` in ``Agent.status()`` (``p50_ms`` -> ``p50``; tolerant)."""
        latency = m.get("latency") if isinstance(m.get("latency"), Mapping) else {}
        return cls(
            latency_ms={
                str(k).removesuffix("_ms"): f
                for k, v in (latency or {}).items()
                if (f := finite_or_none(v)) is not None and f >= 0
            }
        )
