"""A device's observation for a rollout of an agent release, from its reported state and reports.

Owns ``observe_agent``: one device's ``DeviceObservation`` of agent release ``release`` (the
rollout's target for members, its source for the control group). The outcome comes from the
reported state's ``agent`` part (``edge_agent.wire.reported.AgentReport``): a release its
launcher took back (``rolled_back``, or listed in ``failed`` after a trial) is a device
rollback, one that could not be downloaded or installed (``failed``) an install failure. The
metrics are the requests of *every* model the device serves, summed over the intervals between
consecutive reports of the agent process now running, only while that process is the observed
release: an agent release changes the whole daemon, so the error rate and latency of each model
are its evidence, and a new release always starts a new process (a new ``started_at``), so no
interval mixes two releases. A member that has not switched yet, or whose launcher went back,
has no interval on the release and is not ``reporting`` (``gates.agent_reporting``, the
heartbeat after the switch, waits for it); nor is a member whose launcher has not confirmed
the release yet (``trying``): the trial may still end in a return. The intervals before
``since`` (a member's assignment: the agent it ran before) are its ``metrics_before``, the
p99 latency gate's second reference, which judges the last wave when no control is left.

Does not own the per-interval arithmetic (``fleet_server.rollouts.observation.interval_metrics``)
nor the reads (``fleet_server.jobs.rollout_reader``). Pure: no database, clock or network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from itertools import pairwise
from typing import Any

from fleet_server.rollouts.metrics import DeviceObservation, TelemetryRowLike, WindowMetrics
from fleet_server.rollouts.observation import interval_metrics

__all__ = ["agent_report", "observe_agent"]


def agent_report(reported: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The ``agent`` part of a stored reported state ({} when absent or malformed)."""
    agent = (reported or {}).get("agent")
    return agent if isinstance(agent, Mapping) else {}


def _opt_int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def observe_agent(
    device_id: str,
    release: int | None,
    since: datetime,
    reported: Mapping[str, Any] | None,
    rows: Sequence[TelemetryRowLike],
    *,
    member: bool = False,
) -> DeviceObservation:
    """Build a device's observation of agent ``release`` from ``since`` on.

    Args:
        device_id: The device.
        release: The agent release observed (None: the base install, no release).
        since: Start of the window (server time): intervals ending before it are not counted.
        reported: The device's stored reported-state document, if any.
        rows: Its newest stored report rows (any order; other kinds are ignored).
        member: The device was assigned ``release`` at ``since``: only a process whose first
            report arrived after ``since`` is the new agent (the old one keeps reporting while
            the new release downloads, and the launcher confirms the new one when it connects,
            before its first report).

    Returns:
        The observation (``active_version``: the release the device runs, None for the base
        install); malformed rows and documents are skipped, never raised.
    """
    agent = agent_report(reported)
    active, assigned = _opt_int(agent.get("release")), _opt_int(agent.get("assigned"))
    outcome = agent.get("outcome") if isinstance(agent.get("outcome"), str) else None
    reason = agent.get("reason") if isinstance(agent.get("reason"), str) else ""
    failed_list = agent.get("failed")
    # A release the launcher took back after its trial is listed in ``failed`` for good.
    in_failed = isinstance(failed_list, list) and release in failed_list
    tried = release is not None and (in_failed or assigned == release)
    install_failed = tried and outcome == "failed"
    rolled_back = tried and not install_failed and (in_failed or outcome == "rolled_back")
    # A release on trial (``trying``) may still be taken back by its launcher: it reports on
    # the release only once confirmed (``installed``).
    confirmed = release is None or assigned != release or outcome == "installed"
    metrics, before = WindowMetrics(), WindowMetrics()
    reports = sorted((r for r in rows if r.kind == "report"), key=lambda r: r.seq)
    # Before ``since`` (a member's assignment) the device ran the agent it ran before: the
    # latency gate's second reference (``metrics_before``), from the rows given.
    for a, b in pairwise(reports):
        if b.received_at < since:
            before = before.merge(_all_models(a.payload, b.payload, counted=True))
    newest = reports[-1].payload.get("started_at") if reports else None
    first_seen = min(
        (r.received_at for r in reports if r.payload.get("started_at") == newest), default=None
    )
    # Server time only (device clocks may be off): the process reporting now was already
    # reporting before the assignment, so it is the old agent whatever the state document says.
    old_process = member and (first_seen is None or first_seen < since)
    if active == release and confirmed and not rolled_back and not old_process:
        prev: Mapping[str, Any] | None = None
        for row in reports:
            p = row.payload
            if p.get("started_at") != newest:
                prev = None
                continue
            if prev is not None and row.received_at >= since:
                metrics = metrics.merge(_all_models(prev, p))
            prev = p
    return DeviceObservation(
        device_id=device_id,
        active_version=active,
        assigned_version=assigned,
        outcome=outcome,
        reason=str(reason)[:200],
        install_failed=install_failed,
        rolled_back=rolled_back,
        metrics=metrics,
        metrics_before=before,
    )


def _all_models(
    prev: Mapping[str, Any], cur: Mapping[str, Any], *, counted: bool = False
) -> WindowMetrics:
    """One interval's counts over every model both reports carry on the same version; the
    interval counts as one report even when no model served in it (the agent reported), unless
    ``counted`` (then only an interval with a model's difference counts: one across a restart
    is no interval)."""
    out = WindowMetrics()
    models = cur.get("models")
    for name, m in models.items() if isinstance(models, Mapping) else ():
        version = _opt_int(m.get("version")) if isinstance(m, Mapping) else None
        delta = interval_metrics(prev, cur, str(name), version)
        if delta is not None:
            out = out.merge(delta)
    return replace(out, reports=min(out.reports, 1) if counted else 1)
