"""The agent's ``status()`` snapshot: what ``edge-agent status`` prints and telemetry is built from.

Owns: why an installed model does not serve (``not_ready``, what readiness answers), and
turning an ``Agent``'s live state (loaded models and their pipeline counters, latency,
drift, shadow and A/B stats, per-model answer sources, registry events, the cloud fallback's
and its transport's counters) into one JSON-safe dict. Reads only; changes nothing.

Does not own the state it reads (``edge_agent.serving.agent.Agent``, whose ``status`` delegates
here),
building a telemetry report from the snapshot (``edge_agent.wire.telemetry_build``) or Prometheus
metrics (``edge_agent.serving.metrics``). Not on the request path.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from edge_agent import __version__
from edge_agent.errors import EdgefleetError

if TYPE_CHECKING:
    from edge_agent.serving.agent import Agent
    from edge_agent.serving.registry import Loaded

__all__ = ["not_ready", "status_snapshot", "transport_counts", "why_not_serving"]


def status_snapshot(agent: Agent) -> dict[str, Any]:
    """A JSON-safe snapshot of ``agent`` for ``edge-agent status`` and telemetry."""
    models = {}
    for key in agent.registry.loaded_keys():
        entry = agent.registry.get(key)
        if entry is None:
            continue
        models[key] = _model_status(agent, key, entry)
    return {
        "version": __version__,
        "uptime_s": round(time.time() - agent.started_at, 1),
        "started_at": agent.started_at,
        "ready": agent.ready(),
        "models": models,
        # Installed models that do not serve, and why (a down record survives restarts).
        "not_ready": agent.not_ready(),
        "counts": {**dict(agent.counts), **transport_counts(agent._transport)},
        "rollbacks": agent.registry.rollbacks,
        "events": agent.registry.events[-20:],
        "memory_used_bytes": agent.registry.memory_used(),
        "drift_blocks_dropped": agent.worker.dropped if agent.worker else 0,
        "fallback": agent.cloud.stats() if agent.cloud else None,
    }


def _model_status(agent: Agent, key: str, entry: Loaded) -> dict[str, Any]:
    """One loaded model (``name`` or pinned ``name@version``) in the snapshot."""
    p = entry.pipeline
    last = {
        name: s.last.to_dict() for name, s in p.monitor.snapshot().items() if s.last is not None
    }
    return {
        "version": p.version,
        "on_probation": entry.on_probation,
        "memory_bytes": entry.memory_bytes,
        "requests": p.requests,
        "rows": p.rows,
        "errors": p.errors,
        "rejects_by_reason": dict(p.rejects_by_reason),
        "dropped_rows_by_reason": dict(p.dropped_rows_by_reason),
        "latency": p.latency_quantiles(),
        "latency_buckets": p.latency_histogram(),
        "latency_fine": p.latency_histogram_fine(),
        "sources": dict(agent._sources.get(key.split("@", 1)[0], {})),
        "drift": last,
        "kll": p.kll_summary() if p.kll else None,
        "shadow": agent._shadows[key].stats() if key in agent._shadows else None,
        "ab": agent._routers[key].counts() if key in agent._routers else None,
    }


def not_ready(agent: Agent) -> dict[str, str]:
    """Installed models that do not serve, each with why (the store's down record first)."""
    return {
        name: why_not_serving(agent, name)
        for name in agent.store.names()
        if agent.registry.get(name) is None
    }


def why_not_serving(agent: Agent, name: str) -> str:
    """Why the installed model ``name`` does not serve: the persisted down record, else the
    last load failure or admission refusal this process saw. Never raises."""
    try:
        state = agent.store.state(name)
    except EdgefleetError as exc:
        return f"state unreadable: {exc}"
    if state.down is not None:
        return f"v{state.down.version} down since {state.down.at}: {state.down.reason}"
    if state.active is None:
        return "no active version"
    for event in reversed(agent.registry.events):
        if event.get("model") == name and event.get("event") in (
            "load_failed",
            "admission_refused",
        ):
            return f"v{state.active} not loaded: {event.get('detail')}"
    return f"v{state.active} not loaded yet"


def transport_counts(transport: object) -> dict[str, int]:
    """The cloud transport's own counters (disagreements, timeouts), when it keeps any.

    Never raises: a transport without ``telemetry_counts``, or one whose counters cannot be
    read, gives an empty dict (a reporting aid must never break status).
    """
    counts = getattr(transport, "telemetry_counts", None)
    if not callable(counts):
        return {}
    try:
        return {str(k): int(v) for k, v in counts().items()}
    except Exception:
        return {}
