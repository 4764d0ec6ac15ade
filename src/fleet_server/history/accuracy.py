"""Labelled accuracy of a model's versions over the fleet: ground truth merged per cohort.

Owns ``model_accuracy``: for each published version of a model, the confusion counts the
devices reported since a time (the same window reading as a rollout: rollups where folded, raw
rows at the edges, ``history.rollouts.rollout_inputs`` and ``rollouts.observation.observe``),
merged exactly over the whole fleet and per device group, each summarised as accuracy with a
Wilson interval (``rollouts.truth.AccuracySummary``) plus the fleet's largest confusions. The
rollout's own cohorts (canary, control) are the ``ground_truth`` gate's (its detail).

Does not own the counting (devices), the statistics (``rollouts.truth``) or the HTTP/CLI
surface (``admin.accuracy``, ``cli.admin``).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from edge_agent.quality.confusion import Confusion
from fleet_server.history.rollouts import rollout_inputs
from fleet_server.registry.store import Registry
from fleet_server.rollouts.observation import observe
from fleet_server.rollouts.truth import AccuracySummary, merge_confusion

__all__ = ["model_accuracy"]


def model_accuracy(
    registry: Registry, model: str, since: datetime, *, z: float = 1.96
) -> dict[str, Any]:
    """Per published version of ``model``, labelled accuracy since ``since``, fleet and groups.

    Returns:
        ``{"model", "since", "versions": [{"version", "fleet": summary + "flips",
        "groups": {group: summary}}]}``, versions descending; a version without labels has
        ``fleet.n`` 0 and no groups.

    Raises:
        RegistryUnavailableError: the database failed.
    """
    devices = registry.list_devices(include_revoked=False)
    groups = {d.id: d.group for d in devices}
    versions = sorted({b.version for b in registry.list_bundles(model)}, reverse=True)
    out: list[dict[str, Any]] = []
    for version in versions:
        windows = dict.fromkeys(groups, (since, version))
        inputs = rollout_inputs(registry, model, windows) if windows else {}
        by_group: dict[str, Confusion | None] = {}
        for device, got in inputs.items():
            obs = observe(device, model, version, since, None, got.rows, folded=got.folded)
            group = groups[device]
            by_group[group] = merge_confusion(by_group.get(group), obs.metrics.confusion)
        out.append(_version_doc(version, by_group, z))
    return {"model": model, "since": since.isoformat(), "versions": out}


def _version_doc(
    version: int, by_group: Mapping[str, Confusion | None], z: float
) -> dict[str, Any]:
    fleet: Confusion | None = None
    for c in by_group.values():
        fleet = merge_confusion(fleet, c)
    doc = AccuracySummary.of(fleet, z).to_dict()
    doc["flips"] = [] if fleet is None else [list(f) for f in fleet.flips(5)]
    return {
        "version": version,
        "fleet": doc,
        "groups": {
            g: AccuracySummary.of(c, z).to_dict()
            for g, c in sorted(by_group.items())
            if c is not None and c.n
        },
    }
