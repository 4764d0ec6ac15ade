"""The values a rollout reads about one device: window counts, output moments, observations.

Owns: ``WindowMetrics`` (request, reject, fallback, drift, shadow and latency counts of one
model version over an observation window), ``TensorMoments`` and ``OutputMoments`` (the exact,
mergeable per-feature count, sum and sum of squares of the output tensors, from the tier-A
output drift windows), ``DeviceObservation`` (a device's outcome for the rolled-out version plus
its window metrics and output moments), ``TelemetryRowLike`` (what a stored telemetry row gives
the pure code) and the one-sided two-proportion test the rate gates use (the gates' Wilson
bounds are ``edge_agent.quality.confusion.wilson_interval``; the p99 gate's quantiles are its
own, ``gates.p99_latency.histogram_quantile_ms``).

Does not own how these values are built from stored reports (the interval arithmetic over
cumulative counters and ``observe``: ``fleet_server.rollouts.observation``) nor what the gates
conclude from them (``fleet_server.rollouts.gates``).

Pure: no database, clock or network.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Final, Protocol

from edge_agent.quality.confusion import Confusion
from edge_agent.wire.telemetry import LATENCY_BUCKETS_MS, LATENCY_FINE_BUCKETS_MS
from fleet_server.rollouts.truth import merge_confusion

__all__ = [
    "DeviceObservation",
    "OutputMoments",
    "TelemetryRowLike",
    "TensorMoments",
    "WindowMetrics",
    "one_sided_increase",
]

_N_BUCKETS: Final = len(LATENCY_BUCKETS_MS) + 1
_N_FINE: Final = len(LATENCY_FINE_BUCKETS_MS) + 1


class TelemetryRowLike(Protocol):
    """A stored telemetry row (``fleet_server.registry.values.StoredTelemetry`` satisfies this)."""

    @property
    def seq(self) -> int: ...

    @property
    def kind(self) -> str: ...

    @property
    def received_at(self) -> datetime: ...

    @property
    def payload(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class WindowMetrics:
    """Counts of one model version on one or more devices over a window (a monoid).

    Attributes:
        reports: Report intervals counted (a device with 0 has not reported on the version).
        requests: Requests answered or refused (``ok + error + rejected``).
        rejected: Requests refused by input validation.
        errors: Requests that failed.
        device_answers: Requests answered on the device.
        cloud_answers: Requests answered by cloud fallback.
        drift_windows: Closed output-drift windows.
        drift_alerts: Of those, windows whose calibrated verdict alerted.
        max_psi: Largest output PSI seen (None if none was scorable).
        shadow_compared: Rows compared in shadow.
        shadow_agree: Of those, rows that agreed.
        latency_buckets: Requests per ``LATENCY_BUCKETS_MS`` bucket (plus overflow).
        latency_fine: Requests per ``LATENCY_FINE_BUCKETS_MS`` bucket (plus overflow), from the
            intervals whose reports carry it (others add zeros): it covers every timed request
            exactly when its sum equals ``latency_buckets``' sum.
        confusion: Ground-truth counts (true x predicted class) of the version, from the
            intervals whose reports carry them (``fleet_server.rollouts.truth``); None: none.
    """

    reports: int = 0
    requests: int = 0
    rejected: int = 0
    errors: int = 0
    device_answers: int = 0
    cloud_answers: int = 0
    drift_windows: int = 0
    drift_alerts: int = 0
    max_psi: float | None = None
    shadow_compared: int = 0
    shadow_agree: int = 0
    latency_buckets: tuple[int, ...] = (0,) * _N_BUCKETS
    latency_fine: tuple[int, ...] = (0,) * _N_FINE
    confusion: Confusion | None = None

    def merge(self, other: WindowMetrics) -> WindowMetrics:
        """The element-wise sum (max for ``max_psi``)."""
        psis = [p for p in (self.max_psi, other.max_psi) if p is not None]
        return WindowMetrics(
            reports=self.reports + other.reports,
            requests=self.requests + other.requests,
            rejected=self.rejected + other.rejected,
            errors=self.errors + other.errors,
            device_answers=self.device_answers + other.device_answers,
            cloud_answers=self.cloud_answers + other.cloud_answers,
            drift_windows=self.drift_windows + other.drift_windows,
            drift_alerts=self.drift_alerts + other.drift_alerts,
            max_psi=max(psis) if psis else None,
            shadow_compared=self.shadow_compared + other.shadow_compared,
            shadow_agree=self.shadow_agree + other.shadow_agree,
            latency_buckets=tuple(
                a + b for a, b in zip(self.latency_buckets, other.latency_buckets, strict=True)
            ),
            latency_fine=tuple(
                a + b for a, b in zip(self.latency_fine, other.latency_fine, strict=True)
            ),
            confusion=merge_confusion(self.confusion, other.confusion),
        )

    @classmethod
    def total(cls, items: Iterable[WindowMetrics]) -> WindowMetrics:
        """The sum of ``items`` (zero for none)."""
        out = cls()
        for item in items:
            out = out.merge(item)
        return out


@dataclass(frozen=True)
class TensorMoments:
    """Per-feature moments of one output tensor over some windows (a monoid, exact for counts).

    Attributes:
        count: Finite values seen per feature (the tier-A views' ``count``).
        sum: Their float64 sum per feature.
        sumsq: Their float64 sum of squares per feature.
        windows: Drift windows merged.
    """

    count: tuple[int, ...]
    sum: tuple[float, ...]
    sumsq: tuple[float, ...]
    windows: int = 1

    @property
    def rows(self) -> int:
        """Values of the best-covered feature (the rows behind the moments)."""
        return max(self.count, default=0)

    def merge(self, other: TensorMoments) -> TensorMoments | None:
        """The element-wise sum; None when the feature counts differ (not the same tensor)."""
        if len(other.count) != len(self.count):
            return None
        return TensorMoments(
            tuple(a + b for a, b in zip(self.count, other.count, strict=True)),
            tuple(a + b for a, b in zip(self.sum, other.sum, strict=True)),
            tuple(a + b for a, b in zip(self.sumsq, other.sumsq, strict=True)),
            self.windows + other.windows,
        )

    @classmethod
    def of(cls, count: Iterable[int], s: Iterable[float], sumsq: Iterable[float], windows: int = 1
           ) -> TensorMoments:  # fmt: skip
        """Moments from a tier-A view's (or a rollup part's) ``count``, ``sum``, ``sumsq``."""
        return cls(
            tuple(int(x) for x in count),
            tuple(float(x) for x in s),
            tuple(float(x) for x in sumsq),
            windows,
        )


@dataclass(frozen=True)
class OutputMoments:
    """The output tensors' moments of one version on some devices over a window (a monoid).

    Built from the tier-A output drift windows the devices report (their ``count``, ``sum``
    and ``sumsq`` arrays, which do not depend on the bin edges, so the candidate's and the
    live version's windows compare although their baselines differ) or from the rollups'
    merged parts. Merging adds; a tensor whose feature count differs is not merged and its
    windows are counted in ``mismatched``.

    Attributes:
        tensors: Moments per output tensor name.
        mismatched: Windows left out because their feature count differed.
    """

    tensors: Mapping[str, TensorMoments] = field(default_factory=dict)
    mismatched: int = 0

    @property
    def rows(self) -> int:
        """Rows behind the best-covered tensor (0 when no output window was seen)."""
        return max((t.rows for t in self.tensors.values()), default=0)

    def merge(self, other: OutputMoments) -> OutputMoments:
        """Both together (tensors by name)."""
        out = dict(self.tensors)
        bad = self.mismatched + other.mismatched
        for name, t in other.tensors.items():
            mine = out.get(name)
            merged = t if mine is None else mine.merge(t)
            if merged is None:
                bad += t.windows
            else:
                out[name] = merged
        return OutputMoments(out, bad)

    @classmethod
    def total(cls, items: Iterable[OutputMoments]) -> OutputMoments:
        """The sum of ``items`` (zero for none)."""
        out = cls()
        for item in items:
            out = out.merge(item)
        return out

    @classmethod
    def of_tensor(cls, name: str, moments: TensorMoments) -> OutputMoments:
        """One tensor's moments."""
        return cls({name: moments})


@dataclass(frozen=True)
class DeviceObservation:
    """One device as the rollout engine sees it, for one model.

    Attributes:
        device_id: The device.
        active_version: Version it serves (reported), None if unknown.
        assigned_version: Version its accepted desired state names (reported).
        outcome: Reported outcome of ``assigned_version`` (``installed``, ``failed`` ...).
        reason: Reported reason of a failure or rollback.
        install_failed: It failed to install the observed version.
        rolled_back: It installed the observed version and went back on its own.
        metrics: Window metrics on the observed version.
        outputs: Output moments on the observed version, over the same window.
        outputs_before: Output moments of the rollout's ``from_version`` on this device before
            it switched (filled by the runner for members).
        metrics_before: Window metrics of ``from_version`` on this device over the same range
            before it switched (the latency gate's second reference; filled for members).
    """

    device_id: str
    active_version: int | None = None
    assigned_version: int | None = None
    outcome: str | None = None
    reason: str = ""
    install_failed: bool = False
    rolled_back: bool = False
    metrics: WindowMetrics = field(default_factory=WindowMetrics)
    outputs: OutputMoments = field(default_factory=OutputMoments)
    outputs_before: OutputMoments = field(default_factory=OutputMoments)
    metrics_before: WindowMetrics = field(default_factory=WindowMetrics)

    @property
    def reporting(self) -> bool:
        """At least one counted report interval on the observed version."""
        return self.metrics.reports > 0


# --------------------------------------------------------------------------- statistics
def one_sided_increase(x1: int, n1: int, x2: int, n2: int, margin: float, z: float) -> bool:
    """True when ``x1/n1 - x2/n2 > margin`` at the one-sided level ``z`` (a Wald z-test).

    With no variance at all (both rates 0 or 1) the raw difference decides.
    """
    if n1 <= 0 or n2 <= 0:
        return False
    p1, p2 = x1 / n1, x2 / n2
    se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    diff = p1 - p2 - margin
    if se == 0.0:
        return diff > 0
    return diff / se > z


def with_metrics(obs: DeviceObservation, metrics: WindowMetrics) -> DeviceObservation:
    """``obs`` with other metrics (for tests and callers composing observations)."""
    return replace(obs, metrics=metrics)
