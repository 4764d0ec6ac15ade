"""A device's rollout observation, built from its stored telemetry and reported state.

Owns: ``observe`` (one device's ``DeviceObservation`` of a model version from the registry's
rows), ``interval_metrics`` (the ``WindowMetrics`` between two consecutive reports),
``report_outputs`` (the ``OutputMoments`` of the output drift windows a report carries) and
``reject_deltas`` (refusals per reason between two reports). Does not own the values themselves
(``fleet_server.rollouts.metrics``) nor the reads that fetch the rows
(``fleet_server.history.rollouts``).

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
from datetime import datetime
from typing import Any, Final

from edge_agent.drift import TierAView
from edge_agent.errors import ContractError
from edge_agent.wire.telemetry import LATENCY_BUCKETS_MS, LATENCY_FINE_BUCKETS_MS
from fleet_server.rollouts.metrics import (
    DeviceObservation,
    OutputMoments,
    TelemetryRowLike,
    TensorMoments,
    WindowMetrics,
)
from fleet_server.rollouts.truth import confusion_delta

__all__ = ["interval_metrics", "observe", "reject_deltas", "report_outputs"]

_N_BUCKETS: Final = len(LATENCY_BUCKETS_MS) + 1
_N_FINE: Final = len(LATENCY_FINE_BUCKETS_MS) + 1
_FAILURE_EVENTS: Final = frozenset({"install_failed", "transfer_failed", "load_failed"})
_ROLLBACK_EVENTS: Final = frozenset({"rolled_back", "probation_failed"})


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
