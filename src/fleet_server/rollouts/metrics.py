"""What a rollout knows about one device, built from its stored telemetry and reported state.

Owns: ``WindowMetrics`` (request, reject, fallback, drift, shadow and latency counts of one
model version over an observation window), ``OutputMoments`` (the exact, mergeable per-feature
count, sum and sum of squares of the output tensors, from the tier-A output drift windows),
``DeviceObservation`` (a device's outcome for the rolled-out version plus its window metrics
and output moments), ``observe`` (builds one from the registry's rows)
and the one-sided two-proportion test the rate gates use (the gates' Wilson bounds are
``edge_agent.quality.confusion.wilson_interval``; the p99 gate's quantiles are its own,
``gates.p99_latency.histogram_quantile_ms``).

Counters in reports are cumulative since ``started_at``: a window is the sum of differences
between consecutive reports of the device on the observed model version with the same
``started_at``. The first report after an agent restart, a version switch or a counter that went
backwards is only a new baseline (it is not known which version served the requests before it),
so nothing is counted twice or attributed to the wrong version. Drift windows are not
cumulative (each report carries the windows closed since the previous one) and are summed; the
output windows' moments are taken from the same counted intervals (a report that is only a
baseline may carry windows the previous version closed).

Pure: no database, clock or network; the rollout runner passes the rows in.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Final, Protocol

from edge_agent.drift import TierAView
from edge_agent.errors import ContractError
from edge_agent.quality.confusion import Confusion
from edge_agent.wire.telemetry import LATENCY_BUCKETS_MS, LATENCY_FINE_BUCKETS_MS
from fleet_server.rollouts.truth import confusion_delta, merge_confusion

__all__ = [
    "DeviceObservation",
    "OutputMoments",
    "TelemetryRowLike",
    "TensorMoments",
    "WindowMetrics",
    "interval_metrics",
    "observe",
    "one_sided_increase",
    "reject_deltas",
    "report_outputs",
]

_N_BUCKETS: Final = len(LATENCY_BUCKETS_MS) + 1
_N_FINE: Final = len(LATENCY_FINE_BUCKETS_MS) + 1
_FAILURE_EVENTS: Final = frozenset({"install_failed", "transfer_failed", "load_failed"})
_ROLLBACK_EVENTS: Final = frozenset({"rolled_back", "probation_failed"})


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


# --------------------------------------------------------------------------- building
def observe(
    device_id: str,
    model: str,
    version: int | None,
    since: datetime,
    reported: Mapping[str, Any] | None,
    rows: Sequence[TelemetryRowLike],
    *,
    folded: WindowMetrics | None = None,
    folded_events: Iterable[str] = (),
    folded_outputs: OutputMoments | None = None,
) -> DeviceObservation:
    """Build a device's observation of ``model`` v``version`` from ``since`` on.

    Args:
        device_id: The device.
        model: Model name.
        version: The version observed (the rollout's target for members, its source for the
            control group); None observes nothing but the reported state.
        since: Start of the window (server time; rows ``received_at`` before it only serve as
            the baseline of the first difference).
        reported: The device's stored reported-state document, if any.
        rows: Its stored telemetry rows (reports and events), any order.
        folded: Metrics of this version already folded into rollups for the part of the
            window the rows do not cover (``fleet_server.history``), added as they are.
        folded_events: Event kinds of this version from those rollups.
        folded_outputs: Output moments of this version from those rollups.

    Returns:
        The observation; malformed rows and reported documents are skipped, never raised.
    """
    m = _reported_model(reported, model)
    active, assigned = _opt_int(m.get("active")), _opt_int(m.get("assigned"))
    outcome = m.get("outcome") if isinstance(m.get("outcome"), str) else None
    reason = m.get("reason") if isinstance(m.get("reason"), str) else ""
    failed = assigned == version and outcome == "failed" and version is not None
    rolled = assigned == version and outcome == "rolled_back" and version is not None
    kinds = set(folded_events) if version is not None else set()
    ordered = sorted(rows, key=lambda r: r.seq)
    for row in ordered:
        if row.kind != "event" or row.received_at < since:
            continue
        p = row.payload
        if p.get("model") != model or _opt_int(p.get("version")) != version or version is None:
            continue
        kinds.add(str(p.get("kind")))
    failed = failed or bool(kinds & _FAILURE_EVENTS)
    rolled = rolled or bool(kinds & _ROLLBACK_EVENTS)
    metrics = folded or WindowMetrics()
    outputs = folded_outputs or OutputMoments()
    prev: Mapping[str, Any] | None = None
    for row in ordered:
        if row.kind != "report":
            continue
        if prev is not None and row.received_at >= since:
            delta = interval_metrics(prev, row.payload, model, version)
            if delta is not None:
                metrics = metrics.merge(delta)
                outputs = outputs.merge(report_outputs(row.payload, model, version))
        prev = row.payload
    return DeviceObservation(
        device_id=device_id,
        active_version=active,
        assigned_version=assigned,
        outcome=outcome,
        reason=str(reason)[:200],
        install_failed=failed and not rolled,
        rolled_back=rolled,
        metrics=metrics,
        outputs=outputs,
    )


def report_outputs(payload: Mapping[str, Any], model: str, version: int | None) -> OutputMoments:
    """The moments of the output drift windows ``payload`` carries for ``model`` v``version``.

    Call it for a report whose interval counts (``interval_metrics`` gave a difference): a
    report that is only a baseline may carry windows of the previous version. Windows whose
    view does not decode are left out (the report's schema already checked them).
    """
    m = _model_stats(payload, model, version)
    out = OutputMoments()
    for w in (m or {}).get("drift") or ():
        if not isinstance(w, Mapping) or w.get("role") != "output":
            continue
        try:
            view = TierAView.from_bytes(base64.b64decode(str(w["view"]), validate=True))
        except (ContractError, KeyError, binascii.Error, ValueError):
            continue
        t = TensorMoments.of(view.count.tolist(), view.sum.tolist(), view.sumsq.tolist())
        out = out.merge(OutputMoments.of_tensor(str(w.get("tensor")), t))
    return out


def interval_metrics(
    prev: Mapping[str, Any], cur: Mapping[str, Any], model: str, version: int | None
) -> WindowMetrics | None:
    """The counts of ``model`` v``version`` between two consecutive report payloads.

    None when either report lacks the version, the agent restarted between them (another
    ``started_at``) or a counter went backwards: the later report is then only a new baseline.
    """
    started, prev_started = cur.get("started_at"), prev.get("started_at")
    if not isinstance(started, int | float) or not isinstance(prev_started, int | float):
        return None
    if float(started) != float(prev_started):
        return None
    p, c = _model_stats(prev, model, version), _model_stats(cur, model, version)
    if p is None or c is None:
        return None
    return _delta(p, c)


def reject_deltas(prev: Mapping[str, Any], cur: Mapping[str, Any], model: str) -> dict[str, int]:
    """Requests refused per reason between two consecutive reports (cumulative counters).

    Call only where ``interval_metrics`` gave a difference; reasons that went backwards count 0.
    """
    models_p, models_c = prev.get("models"), cur.get("models")
    mp = models_p.get(model) if isinstance(models_p, Mapping) else None
    mc = models_c.get(model) if isinstance(models_c, Mapping) else None
    before = _ints(mp, "rejects_by_reason") if isinstance(mp, Mapping) else {}
    after = _ints(mc, "rejects_by_reason") if isinstance(mc, Mapping) else {}
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}


def _reported_model(reported: Mapping[str, Any] | None, model: str) -> Mapping[str, Any]:
    models = (reported or {}).get("models")
    m = models.get(model) if isinstance(models, Mapping) else None
    return m if isinstance(m, Mapping) else {}


def _opt_int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _model_stats(
    payload: Mapping[str, Any], model: str, version: int | None
) -> Mapping[str, Any] | None:
    models = payload.get("models")
    m = models.get(model) if isinstance(models, Mapping) else None
    if not isinstance(m, Mapping) or version is None or _opt_int(m.get("version")) != version:
        return None
    return m


def _ints(m: Mapping[str, Any], key: str) -> Mapping[str, int]:
    v = m.get(key)
    if not isinstance(v, Mapping):
        return {}
    return {str(k): int(x) for k, x in v.items() if isinstance(x, int) and not isinstance(x, bool)}


def _shadow(m: Mapping[str, Any]) -> tuple[int, int]:
    s = m.get("shadow")
    counts = _ints(s, "counts") if isinstance(s, Mapping) else {}
    return counts.get("compared", 0), counts.get("agree_rows", 0)


def _buckets(m: Mapping[str, Any]) -> tuple[int, ...]:
    b = m.get("latency_buckets")
    if isinstance(b, list) and len(b) == _N_BUCKETS and all(isinstance(x, int) for x in b):
        return tuple(b)
    return (0,) * _N_BUCKETS


def _fine(m: Mapping[str, Any]) -> tuple[int, ...] | None:
    b = m.get("latency_fine")
    if isinstance(b, list) and len(b) == _N_FINE and all(isinstance(x, int) for x in b):
        return tuple(b)
    return None  # an agent before the fine histogram


def _delta(prev: Mapping[str, Any], cur: Mapping[str, Any]) -> WindowMetrics | None:
    """Counts between two reports; None when a counter went backwards (a silent reset) or the
    counts contradict each other (a device's reports, each valid, that no device could send)."""
    po, co = _ints(prev, "outcomes"), _ints(cur, "outcomes")
    ps, cs = _ints(prev, "sources"), _ints(cur, "sources")
    (pc, pa), (cc, ca) = _shadow(prev), _shadow(cur)
    pb, cb = _buckets(prev), _buckets(cur)
    keys = ("ok", "error", "rejected")
    diffs = [co.get(k, 0) - po.get(k, 0) for k in keys]
    src = [cs.get(k, 0) - ps.get(k, 0) for k in ("device", "cloud")]
    lat = [c - p for c, p in zip(cb, pb, strict=True)]
    pf, cf = _fine(prev), _fine(cur)
    fine = [0] * _N_FINE
    if pf is not None and cf is not None:
        fine = [c - p for c, p in zip(cf, pf, strict=True)]
    shadow = [cc - pc, ca - pa]
    if min([*diffs, *src, *lat, *shadow, *fine]) < 0:
        return None
    if shadow[1] > shadow[0]:  # more rows agreed than were compared: not a true interval
        return None
    windows = [w for w in cur.get("drift") or [] if isinstance(w, Mapping)]
    outputs = [w for w in windows if w.get("role") == "output"]
    psis = [
        float(w["max_psi"])
        for w in outputs
        if isinstance(w.get("max_psi"), int | float) and math.isfinite(float(w["max_psi"]))
    ]
    return WindowMetrics(
        reports=1,
        requests=sum(diffs),
        rejected=diffs[2],
        errors=diffs[1],
        device_answers=src[0],
        cloud_answers=src[1],
        drift_windows=len(outputs),
        drift_alerts=sum(1 for w in outputs if w.get("alert") is True),
        max_psi=max(psis) if psis else None,
        shadow_compared=shadow[0],
        shadow_agree=shadow[1],
        latency_buckets=tuple(lat),
        latency_fine=tuple(fine),
        confusion=confusion_delta(prev, cur),
    )


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
