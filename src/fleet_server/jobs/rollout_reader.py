"""What the rollout runner reads for one rollout: devices, observations, shadow inputs.

Owns ``RolloutReader``: the devices a rollout's selector targets (``targeted``: a label
selector is one indexed query, ``registry.labels.select_devices``), what holding needs
(``hold_inputs``: the targets' labels and, against the maintenance windows, when each closed
one opens), each one's
``DeviceObservation`` for the rollout (the telemetry window through ``history.rollouts``, and
each member's metrics and output moments of ``from_version`` before it switched, the latency
and output gates' second reference), what the shadow phase needs (``ShadowInputs``: who can
take a shadow, whether the candidate classifies, each shadowed canary's evidence from its
newest reports) and the per-device status view (``device_states``); and ``common_version``
(the version most targeted devices serve, a new rollout's default source). A rollout of an
agent release (``Rollout.agent``) targets only devices that can take one (``agent_capable``),
observes them with ``rollouts.agent_observation.observe_agent`` and has no shadow phase;
``common_agent_release`` is its default source.

Does not own: deciding (``fleet_server.rollouts.engine.decide``), applying a decision, the
commands and the step loop (``fleet_server.jobs.rollout_runner``), building an observation from
rows (``fleet_server.rollouts.observation``) nor the range reads (``fleet_server.history``).
Reads only; writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from edge_agent.trust.agent_release import AGENT_UPDATE_CAPABILITY
from fleet_server.errors import RegistryError, RegistryUnavailableError
from fleet_server.history.rollouts import before_outputs, rollout_inputs
from fleet_server.registry import labels as label_store
from fleet_server.registry.store import Registry
from fleet_server.registry.values import DeviceRecord
from fleet_server.rollouts.agent_observation import agent_report, observe_agent
from fleet_server.rollouts.holds import HoldInputs
from fleet_server.rollouts.metrics import DeviceObservation
from fleet_server.rollouts.observation import observe
from fleet_server.rollouts.policy import Selector
from fleet_server.rollouts.shadow_evidence import ShadowInputs, shadow_capable, shadow_evidence
from fleet_server.rollouts.state import Rollout
from fleet_server.rollouts.windows import window_opens_at

__all__ = [
    "AGENT_REPORTS",
    "RolloutReader",
    "agent_capable",
    "common_agent_release",
    "common_version",
]

#: Newest reports read per shadowed canary (its shadow counters are cumulative).
_SHADOW_REPORTS = 50
#: Newest reports read per device of an agent release's rollout (the agent gates count only
#: the intervals of the agent process now running: ``rollouts.agent_observation``).
AGENT_REPORTS = 200
#: The longest before-switch window the last wave's output gate reads per device.
_BEFORE_MAX = timedelta(hours=24)


class RolloutReader:
    """Reads a rollout's inputs from a registry (see the module docstring)."""

    def __init__(self, registry: Registry) -> None:
        """Read from ``registry``."""
        self._registry = registry

    def targeted(self, selector: Selector, *, agent: bool = False) -> list[DeviceRecord]:
        """The unrevoked devices ``selector`` matches (``agent``: only those that report the
        ``agent-update`` capability, i.e. run under a launcher: no other can take a release).

        Raises:
            RegistryUnavailableError: the database failed.
        """
        if selector.labels is not None:
            devices = label_store.select_devices(
                self._registry, selector.labels, include_revoked=False
            )
        else:
            devices = self._registry.list_devices(group=selector.group, include_revoked=False)
            devices = [d for d in devices if selector.matches(d.group, d.tags)]
        return [d for d in devices if agent_capable(d)] if agent else devices

    def _targets(self, r: Rollout) -> list[DeviceRecord]:
        return self.targeted(r.selector, agent=r.agent)

    def hold_inputs(self, r: Rollout, now: datetime) -> HoldInputs | None:
        """The targets' labels and closed windows at ``now`` (None: no window is defined and
        the policy has no disruption budget, so nothing is held).

        Raises:
            RegistryUnavailableError: the database failed.
        """
        windows = label_store.windows(self._registry)
        if not windows and r.policy.disruption_budget is None:
            return None
        ids = [d.id for d in self._targets(r)]
        labels = label_store.labels_of(self._registry, ids)
        opens_at = {d: t for d in ids if (t := window_opens_at(windows, labels.get(d, {}), now))}
        return HoldInputs(labels={d: labels.get(d, {}) for d in ids}, opens_at=opens_at)

    def observations(self, r: Rollout, now: datetime) -> list[DeviceObservation]:
        """Every targeted device's observation for ``r`` (members on ``to_version``).

        Raises:
            RegistryUnavailableError: the database failed.
        """
        devices = self._targets(r)
        start = r.started_at or now
        since = {d.id: r.members.get(d.id, start) for d in devices}
        version = {d.id: r.to_version if d.id in r.members else r.from_version for d in devices}
        if r.agent:
            return [
                observe_agent(
                    d.id,
                    version[d.id],
                    since[d.id],
                    d.reported,
                    self._registry.telemetry(
                        device_id=d.id, after_id=None, limit=AGENT_REPORTS, kind="report"
                    ),
                    member=d.id in r.members,
                )
                for d in devices
            ]
        # Rollups for the folded part of each window, raw rows only for its edges (history).
        window = rollout_inputs(
            self._registry, r.model, {d.id: (since[d.id], version[d.id]) for d in devices}
        )
        obs = [
            observe(
                d.id,
                r.model,
                version[d.id],
                since[d.id],
                d.reported,
                window[d.id].rows,
                folded=window[d.id].folded,
                folded_events=window[d.id].events,
                folded_outputs=window[d.id].outputs,
            )
            for d in devices
        ]
        return self._with_before_outputs(r, obs, now)

    def _with_before_outputs(
        self, r: Rollout, obs: list[DeviceObservation], now: datetime
    ) -> list[DeviceObservation]:
        """Each member's ``from_version`` metrics and output moments before it switched (the
        latency and output gates' second reference): ``[joined - served, joined)``, ``served``
        being how long it has been a member (at most ``_BEFORE_MAX``)."""
        if not r.members or r.from_version is None:
            return obs
        ranges = {
            o.device_id: (
                joined - min(max(now - joined, timedelta(0)), _BEFORE_MAX),
                joined,
                r.from_version,
            )
            for o in obs
            if (joined := r.members.get(o.device_id)) is not None
        }
        before = before_outputs(self._registry, r.model, ranges)
        return [
            replace(
                o,
                outputs_before=before[o.device_id].outputs,
                metrics_before=before[o.device_id].metrics,
            )
            if o.device_id in before
            else o
            for o in obs
        ]

    def device_states(self, r: Rollout) -> dict[str, str]:
        """Per targeted device: ``control``, ``shadow`` (runs the candidate as a shadow, in
        the shadow phase), ``waiting_window`` / ``waiting_budget`` (a member whose assignment
        is held), ``assigned``, ``installed``, ``failed``, ``rolled_back`` or ``reverted``
        (for status views).

        Raises:
            RegistryUnavailableError: the database failed.
        """
        out: dict[str, str] = {}
        bad = {**dict.fromkeys(r.failed, "failed"), **dict.fromkeys(r.rolled_back, "rolled_back")}
        for d in self._targets(r):
            models = (d.reported or {}).get("models") or {}
            active = (models.get(r.model) or {}).get("active")
            if r.agent:
                active = agent_report(d.reported).get("release")
            if d.id in r.reverted:
                out[d.id] = "reverted"
            elif d.id in bad:
                out[d.id] = bad[d.id]
            elif d.id in r.held:
                out[d.id] = f"waiting_{r.held[d.id]}"
            elif d.id in r.members:
                out[d.id] = "installed" if active == r.to_version else "assigned"
            elif d.id in r.shadows and r.phase == "shadow":
                out[d.id] = "shadow"
            else:
                out[d.id] = "control"
        return out

    def shadow_inputs(self, r: Rollout) -> ShadowInputs | None:
        """What the shadow phase needs (None when ``r`` has none to start or judge): the
        targets that advertise the ``shadow`` capability, whether the candidate classifies,
        and each shadowed canary's evidence from its newest reports.

        Raises:
            RegistryUnavailableError: the database failed.
        """
        starting = r.state == "pending" and r.phase == "serving" and not r.shadows
        if r.agent or r.policy.shadow_fraction is None or not (starting or r.phase == "shadow"):
            return None
        try:
            manifest = self._registry.get_bundle(r.model, r.to_version).manifest
        except RegistryUnavailableError:
            raise
        except RegistryError:
            return None
        outputs = manifest.get("outputs")
        task = outputs.get("task") if isinstance(outputs, dict) else None
        devices = self.targeted(r.selector)
        evidence = {}
        for d in devices:
            if d.id not in r.shadows:
                continue
            # Counters are cumulative while the shadow runs: the newest reports suffice.
            rows = self._registry.telemetry(
                device_id=d.id, after_id=None, limit=_SHADOW_REPORTS, kind="report"
            )
            evidence[d.id] = shadow_evidence(
                r.model, r.to_version, r.shadows[d.id], d.reported, rows
            )
        return ShadowInputs(
            capable=frozenset(d.id for d in devices if shadow_capable(d.reported)),
            classification=task == "classification",
            devices=evidence,
        )


def agent_capable(device: DeviceRecord) -> bool:
    """The device reports the ``agent-update`` capability (a launcher runs it)."""
    caps = (device.reported or {}).get("capabilities")
    return isinstance(caps, list) and AGENT_UPDATE_CAPABILITY in caps


def common_agent_release(release: int, devices: Sequence[DeviceRecord]) -> int | None:
    """The agent release other than ``release`` most ``devices`` run (the highest on a tie);
    None when none runs another (the base install)."""
    counts: dict[int, int] = {}
    for d in devices:
        active = agent_report(d.reported).get("release")
        if isinstance(active, int) and not isinstance(active, bool) and active != release:
            counts[active] = counts.get(active, 0) + 1
    return max(counts, key=lambda v: (counts[v], v)) if counts else None


def common_version(model: str, version: int, devices: Sequence[DeviceRecord]) -> int | None:
    """The version of ``model`` other than ``version`` most ``devices`` report as active (the
    highest on a tie); None when none reports another."""
    counts: dict[int, int] = {}
    for d in devices:
        active = (((d.reported or {}).get("models") or {}).get(model) or {}).get("active")
        if isinstance(active, int) and active != version:
            counts[active] = counts.get(active, 0) + 1
    return max(counts, key=lambda v: (counts[v], v)) if counts else None
