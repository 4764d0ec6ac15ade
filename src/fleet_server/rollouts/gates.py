"""Rollout gates: the safety and quality verdicts ``decide`` acts on (pure).

Each gate returns a ``GateResult`` carrying the measured value, the threshold and a sentence
with the numbers; ``status`` is ``ok``, ``breach``, ``waiting`` (too little data) or ``skipped``.

* safety gates (``safety_gates``), judged at every step: install failure rate and
  device-initiated rollback rate among the wave's members. A rollback reported by a device counts
  at once. A gate trips when the Wilson lower bound of the rate exceeds the threshold (at least
  ``min_devices`` finished) or when the failures alone already put the wave's final rate above it
  and are at least two (or every member): one device among several does not halt a wave.
* quality gates (``quality_gates``), judged after the dwell time with at least ``min_devices``
  reporting devices on each side: reject-rate and fallback-rate increase of the canary over the
  control group (devices still on ``from_version``) by a one-sided two-proportion test, share of
  output drift windows alerting (Wilson lower bound), shadow agreement (Wilson upper bound) and
  the p99 latency from the merged latency histograms (fine ones when both sides have them for
  every request, else coarse; at least ``min_requests`` requests per side). That one trips
  only when the canary's p99 is both more than ``max_p99_latency_ratio`` times and more than
  ``min_p99_latency_delta_ms`` above the control's, and the share of canary requests above
  that allowed p99 is above 1 % with confidence (a binomial test of the quantile).

Owns the gate verdicts and how they use ``fleet_server.rollouts.metrics``' statistics. Does not
own the policy, the rollout state or what a breach leads to (pause, abort, quarantine): those are
``fleet_server.rollouts.engine``'s, which also re-exports ``GateResult``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_agent.wire.telemetry import LATENCY_BUCKETS_MS, LATENCY_FINE_BUCKETS_MS
from fleet_server.rollouts.metrics import (
    DeviceObservation,
    WindowMetrics,
    one_sided_increase,
    wilson_bounds,
)

if TYPE_CHECKING:
    from fleet_server.rollouts.engine import Rollout, RolloutPolicy, Thresholds

__all__ = [
    "GateResult",
    "histogram_quantile_ms",
    "latency_histograms",
    "quality_gates",
    "safety_gates",
]


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict: ``ok``, ``breach``, ``waiting`` (too little data) or ``skipped``."""

    name: str
    status: str
    measured: float | None
    threshold: float | None
    detail: str

    def to_dict(self) -> dict[str, object]:
        """JSON-safe dict."""
        return {k: getattr(self, k) for k in ("name", "status", "measured", "threshold", "detail")}


def safety_gates(r: Rollout, by_id: Mapping[str, DeviceObservation]) -> tuple[GateResult, ...]:
    ack = set(r.acknowledged)
    counted = [d for d in r.members if d not in ack]
    bad_all = {*r.failed, *r.rolled_back} - ack
    # Finished: failed, rolled back, or serving the new version; the rest may still install.
    finished = sum(
        1
        for d in counted
        if d in bad_all or (d in by_id and by_id[d].active_version == r.to_version)
    )
    out = []
    for name, bad, limit in (
        ("install_failures", set(r.failed), r.policy.thresholds.max_install_failure_rate),
        ("device_rollbacks", set(r.rolled_back), r.policy.thresholds.max_rollback_rate),
    ):
        k, n = len(bad - ack), len(counted)
        lo, _ = wilson_bounds(k, finished, r.policy.z)
        # Certain: above the limit even if every other member succeeds. One device of several
        # fails for its own reasons now and then (disk, power, a flaky link) and alone never
        # halts a wave (bench/bench_false_halts.py): it takes two, or every member.
        certain = n > 0 and k / n > limit and (k >= 2 or k == n)
        confident = finished >= r.policy.min_devices and lo > limit
        rate = k / n if n else 0.0
        detail = f"{k}/{n} members ({rate:.1%}; {finished} finished) vs max {limit:.1%}"
        status = "breach" if certain or confident else "ok"
        out.append(GateResult(name, status, rate, limit, detail))
    return tuple(out)


def quality_gates(
    r: Rollout, by_id: Mapping[str, DeviceObservation], order: Sequence[str]
) -> tuple[GateResult, ...]:
    t, p = r.policy.thresholds, r.policy
    excluded = {*r.failed, *r.rolled_back, *r.acknowledged}
    canary = [by_id[d] for d in r.members if d in by_id and d not in excluded]
    control = [by_id[d] for d in order if d not in r.members]
    control = [o for o in control if o.active_version == r.from_version]
    # A wave smaller than min_devices (tiny fleets, members that failed) needs all of it.
    need = max(1, min(p.min_devices, len(canary)))
    c_rep = [o for o in canary if o.reporting]
    k_rep = [o for o in control if o.reporting]
    if len(c_rep) < need:
        msg = f"{len(c_rep)}/{need} canary devices reporting on v{r.to_version}"
        return (GateResult("reporting", "waiting", len(c_rep), need, msg),)
    need = min(p.min_devices, len(order))
    cm = WindowMetrics.total(o.metrics for o in c_rep)
    km = WindowMetrics.total(o.metrics for o in k_rep)
    has_control = len(control) >= need
    if has_control and len(k_rep) < need:
        msg = f"{len(k_rep)}/{need} control devices reporting on v{r.from_version}"
        return (GateResult("reporting", "waiting", len(k_rep), need, msg),)
    return (
        _increase("reject_rate", cm.rejected, cm.requests, km.rejected, km.requests,
                  t.max_reject_rate_increase, p, has_control),
        _increase("fallback_rate", cm.cloud_answers, cm.cloud_answers + cm.device_answers,
                  km.cloud_answers, km.cloud_answers + km.device_answers,
                  t.max_fallback_rate_increase, p, has_control),
        _drift(cm, t.max_drift_alert_share, p),
        _shadow(cm, t.min_shadow_agreement, p),
        _latency(cm, km, t, p, has_control),
    )  # fmt: skip


def _increase(
    name: str,
    x1: int,
    n1: int,
    x2: int,
    n2: int,
    limit: float | None,
    p: RolloutPolicy,
    has_control: bool,
) -> GateResult:
    if limit is None:
        return GateResult(name, "skipped", None, None, "disabled")
    if not has_control:
        return GateResult(name, "skipped", None, limit, "no control group left")
    if min(n1, n2) < p.min_requests:
        msg = f"{name}: {n1}/{n2} requests (canary/control), need {p.min_requests} each"
        return GateResult(name, "waiting", None, limit, msg)
    r1, r2 = x1 / n1, x2 / n2
    breach = one_sided_increase(x1, n1, x2, n2, limit, p.z)
    detail = (
        f"{r1:.2%} on canary (n={n1}) vs {r2:.2%} on control (n={n2}): "
        f"{(r1 - r2) * 100:+.2f} points, max +{limit * 100:.2f}"
    )
    return GateResult(name, "breach" if breach else "ok", r1 - r2, limit, detail)


def _drift(m: WindowMetrics, limit: float | None, p: RolloutPolicy) -> GateResult:
    name = "prediction_drift"
    if limit is None:
        return GateResult(name, "skipped", None, None, "disabled")
    if m.drift_windows == 0:
        return GateResult(name, "skipped", None, limit, "no output drift windows reported")
    share = m.drift_alerts / m.drift_windows
    lo, _ = wilson_bounds(m.drift_alerts, m.drift_windows, p.z)
    psi = "-" if m.max_psi is None else f"{m.max_psi:.3f}"
    detail = (
        f"{m.drift_alerts}/{m.drift_windows} output windows alerting ({share:.1%}, lower bound "
        f"{lo:.1%}; max PSI {psi}) vs max {limit:.1%}"
    )
    return GateResult(name, "breach" if lo > limit else "ok", share, limit, detail)


def _shadow(m: WindowMetrics, limit: float | None, p: RolloutPolicy) -> GateResult:
    name = "shadow_agreement"
    if limit is None:
        return GateResult(name, "skipped", None, None, "disabled")
    if m.shadow_compared == 0:
        return GateResult(name, "skipped", None, limit, "no shadow comparisons reported")
    share = m.shadow_agree / m.shadow_compared
    _, hi = wilson_bounds(m.shadow_agree, m.shadow_compared, p.z)
    detail = (
        f"{m.shadow_agree}/{m.shadow_compared} rows agree ({share:.1%}, upper bound {hi:.1%}) "
        f"vs min {limit:.1%}"
    )
    return GateResult(name, "breach" if hi < limit else "ok", share, limit, detail)


def _latency(
    c: WindowMetrics, k: WindowMetrics, t: Thresholds, p: RolloutPolicy, has_control: bool
) -> GateResult:
    name, limit, floor = "p99_latency", t.max_p99_latency_ratio, t.min_p99_latency_delta_ms
    if limit is None:
        return GateResult(name, "skipped", None, None, "disabled")
    if not has_control:
        return GateResult(name, "skipped", None, limit, "no control group left")
    b1, b2, edges, resolution = latency_histograms(c, k)
    n1, n2 = sum(b1), sum(b2)
    if min(n1, n2) < p.min_requests:
        msg = f"p99_latency: {n1}/{n2} timed requests (canary/control), need {p.min_requests}"
        return GateResult(name, "waiting", None, limit, msg)
    q1, q2 = histogram_quantile_ms(b1, edges, 0.99), histogram_quantile_ms(b2, edges, 0.99)
    assert q1 is not None
    assert q2 is not None
    ratio, delta = q1 / max(q2, 1e-9), q1 - q2
    # The canary may be up to ``limit`` times AND ``floor`` ms slower than the control at p99:
    # a ratio on sub-millisecond numbers is scheduling noise, and so is a few ms on a slow model.
    allowed = max(limit * q2, q2 + floor)
    # A p99 near the knee of a heavy tail (a busy machine's stalls) jumps by tens of ms when the
    # tail's share crosses 1 %, so the point estimate is not the verdict: the share of canary
    # requests slower than ``allowed`` must be above 1 % with confidence (a binomial test of
    # the quantile).
    above = _count_above(b1, edges, allowed)
    lo, _ = wilson_bounds(round(above), n1, p.z)
    breach = lo > 0.01 and q1 > allowed
    detail = (
        f"p99 {q1:.3g} ms on canary vs {q2:.3g} ms on control ({resolution} buckets): "
        f"x{ratio:.2f}, max x{limit:.2f}; {delta:+.2f} ms, min +{floor:.2f} ms; "
        f"{above / n1:.2%} of canary requests above {allowed:.3g} ms (lower bound {lo:.2%}, "
        f"max 1%)"
    )
    return GateResult(name, "breach" if breach else "ok", ratio, limit, detail)


def _count_above(buckets: Sequence[int], edges: Sequence[float], ms: float) -> float:
    """Requests slower than ``ms``, interpolated inside its bucket as ``histogram_quantile_ms``."""
    out = 0.0
    for i, count in enumerate(buckets):
        lo = 0.0 if i == 0 else edges[i - 1]
        hi = edges[i] if i < len(edges) else math.inf
        if not count or hi <= ms:
            continue
        if lo >= ms or math.isinf(hi):
            out += count
        elif i == 0:
            out += count * (hi - ms) / hi
        else:
            out += count * math.log(hi / ms) / math.log(hi / lo)
    return out


def latency_histograms(
    c: WindowMetrics, k: WindowMetrics
) -> tuple[Sequence[int], Sequence[int], Sequence[float], str]:
    """The canary's and control's latency histograms to compare, their edges and their name.

    Like with like: the fine histograms when they cover every timed request of both sides
    (every agent reported them, no window came from a rollup that predates them), else the
    coarse ones, which every agent reports (a fine histogram sums exactly onto them).
    """
    if all(sum(m.latency_fine) == sum(m.latency_buckets) for m in (c, k)):
        return c.latency_fine, k.latency_fine, LATENCY_FINE_BUCKETS_MS, "fine"
    return c.latency_buckets, k.latency_buckets, LATENCY_BUCKETS_MS, "coarse"


def histogram_quantile_ms(buckets: Sequence[int], edges: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile of a latency histogram with upper ``edges`` (plus overflow), in ms.

    Interpolated inside the bucket holding the rank: linearly in the first bucket (from 0),
    geometrically in the others (the edges are log-spaced, and so is latency's tail). The
    overflow bucket is reported at the last edge (a lower bound). None for an empty histogram.
    """
    total = sum(buckets)
    if total <= 0:
        return None
    rank, seen = q * total, 0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            if i >= len(edges):
                break
            frac = (rank - seen) / count
            if i == 0:
                return edges[0] * frac
            lo, hi = edges[i - 1], edges[i]
            return float(lo * (hi / lo) ** frac)
        seen += count
    return float(edges[-1])
