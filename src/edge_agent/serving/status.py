"""The agent's ``status()`` snapshot: what ``edge-agent status`` prints and telemetry is built from.

Owns: ``AgentSnapshot``, the read-only view of an agent that status and metrics read (the
agent's own counters copied at one moment, plus the registry and store it serves from, read
through their public methods); why an installed model does not serve (``not_ready``, what
readiness answers); and turning a snapshot (loaded models and their pipeline counters,
latency, drift, shadow and A/B stats, per-model answer sources, registry events, the cloud
fallback's and its transport's counters) into one JSON-safe dict. Reads only; changes nothing.

Does not own the state it reads (``edge_agent.serving.agent.Agent`` builds the snapshot with
``Agent.snapshot`` and its ``status`` delegates here; this module never imports the agent),
building a telemetry report from the dict (``edge_agent.wire.telemetry_build``) or Prometheus
metrics (``edge_agent.serving.metrics``). Not on the request path.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edge_agent import __version__
from edge_agent.errors import EdgefleetError
from edge_agent.serving.registry import Loaded, Registry
from edge_agent.store import ModelStore

__all__ = [
    "AgentSnapshot",
    "not_ready",
    "status_snapshot",
    "transport_counts",
    "why_not_serving",
]


@dataclass(frozen=True)
class AgentSnapshot:
    """An agent at one moment, for reading only.

    ``counts``: answers by source and failures (``device``, ``cloud``, ``rejected``,
    ``errors``); ``transport_counts``: the cloud transport's own counters
    (``transport_counts``); ``sources``: answers per model name by source; ``shadow`` and
    ``ab``: ``ShadowRunner.stats`` and ``ABRouter.counts`` per loaded key that has one;
    ``fallback``: ``CloudFallback.stats`` (None without a cloud fallback).
    """

    store: ModelStore
    registry: Registry
    started_at: float
    counts: Mapping[str, int]
    transport_counts: Mapping[str, int]
    sources: Mapping[str, Mapping[str, int]]
    shadow: Mapping[str, Mapping[str, Any]]
    ab: Mapping[str, Mapping[str, int]]
    drift_blocks_dropped: int
    fallback: Mapping[str, Any] | None


def status_snapshot(view: AgentSnapshot) -> dict[str, Any]:
    """A JSON-safe dict of ``view`` for ``edge-agent status`` and telemetry."""
    models = {}
    for key in view.registry.loaded_keys():
        entry = view.registry.get(key)
        if entry is None:
            continue
        models[key] = _model_status(view, key, entry)
    down = not_ready(view.store, view.registry)
    return {
        "version": __version__,
        "uptime_s": round(time.time() - view.started_at, 1),
        "started_at": view.started_at,
        "ready": bool(view.store.names()) and not down,
        "models": models,
        # Installed models that do not serve, and why (a down record survives restarts).
        "not_ready": down,
        "counts": {**dict(view.counts), **view.transport_counts},
        "rollbacks": view.registry.rollbacks,
        "events": view.registry.events[-20:],
        "memory_used_bytes": view.registry.memory_used(),
        "drift_blocks_dropped": view.drift_blocks_dropped,
        "fallback": None if view.fallback is None else dict(view.fallback),
    }


def _model_status(view: AgentSnapshot, key: str, entry: Loaded) -> dict[str, Any]:
    """One loaded model (``name`` or pinned ``name@version``) in the snapshot."""
    p = entry.pipeline
    last = {
        name: s.last.to_dict() for name, s in p.monitor.snapshot().items() if s.last is not None
    }
    shadow = view.shadow.get(key)
    ab = view.ab.get(key)
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
        "sources": dict(view.sources.get(key.split("@", 1)[0], {})),
        "drift": last,
        "kll": p.kll_summary() if p.kll else None,
        "shadow": None if shadow is None else dict(shadow),
        "ab": None if ab is None else dict(ab),
    }


def not_ready(store: ModelStore, registry: Registry) -> dict[str, str]:
    """Installed models that do not serve, each with why (the store's down record first)."""
    return {
        name: why_not_serving(store, registry, name)
        for name in store.names()
        if registry.get(name) is None
    }


def why_not_serving(store: ModelStore, registry: Registry, name: str) -> str:
    """Why the installed model ``name`` does not serve: the persisted down record, else the
    last load failure or admission refusal this process saw. Never raises."""
    try:
        state = store.state(name)
    except EdgefleetError as exc:
        return f"state unreadable: {exc}"
    if state.down is not None:
        return f"v{state.down.version} down since {state.down.at}: {state.down.reason}"
    if state.active is None:
        return "no active version"
    for event in reversed(registry.events):
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
