"""The ``p99_latency`` gate (quality): the canary's p99 latency against the control's, and
against the same devices' own latency before they switched.

Two references, like the output gate's: the control group over the same period, and the canary
members' ``from_version`` windows before their switch (``GateInputs.before``). Devices differ in
how busy they are whatever they run, so a canary of busy devices against a control of quiet
ones looks slower; the same devices before the switch do not differ in that, but in when they
were measured. A breach needs every reference with enough requests to show it; on the last
wave (no control left) the before-switch reference judges alone instead of the gate being
skipped.

Against one reference (``compare``) it compares the merged latency histograms of both sides
(``latency_histograms``: the fine ones when both sides have them for every timed request, else
the coarse ones; at least ``min_requests`` timed requests per side). Trips only when the
canary's p99 is both more than ``max_p99_latency_ratio`` times and more than
``min_p99_latency_delta_ms`` above the reference's, and the share of canary requests above that
allowed p99 is, with confidence, above 1 % (a binomial test of the quantile) and above
``TAIL_FACTOR`` times the reference's own share above it (the same two-sample question for the
tail: a canary of two busy devices stalls a little more often than a control of mostly quiet
ones, whatever it runs). Why each part is needed: docs/rollouts.md, "Latency".

Owns this gate and the histogram quantiles it uses (``histogram_quantile_ms``); does not own
the histograms' edges (``edge_agent.wire.telemetry``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Final

from edge_agent.quality.confusion import wilson_interval
from edge_agent.wire.telemetry import LATENCY_BUCKETS_MS, LATENCY_FINE_BUCKETS_MS
from fleet_server.rollouts.gates.base import Gate, GateInputs
from fleet_server.rollouts.metrics import WindowMetrics
from fleet_server.rollouts.policy import RolloutPolicy, Thresholds
from fleet_server.rollouts.state import GateResult

__all__ = ["GATE", "TAIL_FACTOR", "compare", "histogram_quantile_ms", "latency_histograms"]

#: The canary's share of requests above the allowed p99 may be this many times the control's.
TAIL_FACTOR: Final = 2.0
_NAME: Final = "p99_latency"


def verdict(i: GateInputs, tail_factor: float = TAIL_FACTOR) -> GateResult:
    """The canary's p99 against every reference with enough requests; all must agree."""
    r, p = i.rollout, i.rollout.policy
    before = f"the same devices on v{r.from_version} before the switch"
    refs = [("control", i.control)] if i.has_control else []
    timed_before = sum(i.before.latency_buckets)
    if p.thresholds.max_p99_latency_ratio is not None and not refs and not timed_before:
        limit = p.thresholds.max_p99_latency_ratio
        msg = f"no control group left, and no timed request of {before}"
        return GateResult(_NAME, "skipped", None, limit, msg)
    if timed_before >= p.min_requests or not refs:
        refs.append((before, i.before))
    results = [
        (what, compare(i.canary, m, p.thresholds, p, True, tail_factor, reference=what))
        for what, m in refs
    ]
    judged = [(what, g) for what, g in results if g.status in ("ok", "breach")]
    if not judged:
        g = results[0][1]
        if not i.has_control and g.status == "waiting":
            return replace(g, detail=f"no control group left; {g.detail}")
        return g
    status = "breach" if all(g.status == "breach" for _w, g in judged) else "ok"
    first = judged[0][1]
    detail = "; ".join(g.detail for _w, g in judged)
    return GateResult(_NAME, status, first.measured, first.threshold, detail)


def compare(
    c: WindowMetrics,
    k: WindowMetrics,
    t: Thresholds,
    p: RolloutPolicy,
    has_control: bool,
    tail_factor: float = TAIL_FACTOR,
    *,
    reference: str = "control",
) -> GateResult:
    """The verdict on the canary's ``c`` against one reference's ``k`` metrics (see the
    module; ``tail_factor`` 0 judges the canary's tail against 1 % alone, as the gate did
    before; ``reference`` names ``k`` in the message)."""
    name, limit, floor = _NAME, t.max_p99_latency_ratio, t.min_p99_latency_delta_ms
    if limit is None:
        return GateResult(name, "skipped", None, None, "disabled")
    if not has_control:
        return GateResult(name, "skipped", None, limit, "no control group left")
    b1, b2, edges, resolution = latency_histograms(c, k)
    n1, n2 = sum(b1), sum(b2)
    if min(n1, n2) < p.min_requests:
        msg = f"p99_latency: {n1}/{n2} timed requests (canary/{reference}), need {p.min_requests}"
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
    # the quantile), and above ``TAIL_FACTOR`` times the control's share above it (upper
    # bound): devices differ in how busy they are, and a small canary of busy ones would
    # otherwise be judged against a 1 % its hardware never met on either version.
    above, above_k = _count_above(b1, edges, allowed), _count_above(b2, edges, allowed)
    lo, _ = wilson_interval(round(above), n1, p.z)
    _, hi_k = wilson_interval(round(above_k), n2, p.z)
    tail_limit = max(0.01, tail_factor * hi_k)
    breach = lo > tail_limit and q1 > allowed
    detail = (
        f"p99 {q1:.3g} ms on canary vs {q2:.3g} ms on {reference} ({resolution} buckets): "
        f"x{ratio:.2f}, max x{limit:.2f}; {delta:+.2f} ms, min +{floor:.2f} ms; "
        f"{above / n1:.2%} of canary requests above {allowed:.3g} ms (lower bound {lo:.2%}) "
        f"vs {above_k / n2:.2%} of {reference}'s (upper bound {hi_k:.2%}); max "
        f"{tail_limit:.2%} (1% or x{tail_factor:g} its share)"
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


GATE: Final = Gate(
    name="p99_latency",
    phase="quality",
    reads=("latency_buckets", "latency_fine", "metrics_before"),
    statistic="p99 ratio and difference, then the share above the allowed p99 vs 1% and "
    "vs the reference's share (Wilson bounds); control and the same devices before the switch",
    thresholds=("max_p99_latency_ratio", "min_p99_latency_delta_ms"),
    verdict=verdict,
)
