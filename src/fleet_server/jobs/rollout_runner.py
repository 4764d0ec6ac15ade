"""The rollout orchestrator: registry and service in, ``rollout.decide`` in the middle.

``RolloutRunner`` creates rollouts (of a model, or of an agent release: ``create_agent``;
its members are sent the release with ``service.assign_agent`` and judged by
``gates.AGENT_GATES``), and on every ``step`` loads the active ones, reads each
targeted device's ``DeviceObservation`` and the shadow phase's inputs through a
``RolloutReader`` (``fleet_server.jobs.rollout_reader``, which owns those reads: the telemetry
window, the members' windows from before they switched, the shadowed canaries' evidence),
reads what holding needs (labels, maintenance windows), calls the pure ``decide`` and applies
the decision: ``service.assign`` for new wave members
(``to_version``) and for devices sent back (``from_version``), a quarantine entry when a
version keeps failing, the new state and an event log entry. Operator commands (approve,
pause, resume, abort) go through the same lock as steps. ``start()`` runs ``step``
every ``interval`` seconds in a daemon thread (``fleet_server.jobs.periodic.PeriodicJob``),
``close()`` stops it.

Exactly one engine may run across several server workers: each step first asks an
``EngineLock`` (default: this process only; ``fleet_server.jobs.leader.leader_lock`` fits), and asks
again before each rollout, so a step that outlives the lock stops writing. Commands may arrive
at any worker: every save is a compare-and-set on the state it was computed from
(``registry.rollouts.save_rollout(read=...)``), so a stale decision is neither sent nor saved and
a command re-reads and retries.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

from edge_agent.errors import EdgefleetError
from fleet_server.errors import (
    ModelNotPublishedError,
    RegistryError,
    RegistryUnavailableError,
    RolloutConflictError,
)
from fleet_server.jobs.periodic import PeriodicJob
from fleet_server.jobs.rollout_reader import (
    RolloutReader,
    common_agent_release,
    common_version,
)
from fleet_server.registry import rollouts as store
from fleet_server.registry.ops import agent_releases
from fleet_server.registry.store import Registry
from fleet_server.rollouts.admission import Override, admit
from fleet_server.rollouts.engine import abort as abort_rollout
from fleet_server.rollouts.engine import approve as approve_rollout
from fleet_server.rollouts.engine import decide
from fleet_server.rollouts.engine import pause as pause_rollout
from fleet_server.rollouts.engine import resume as resume_rollout
from fleet_server.rollouts.gates import AGENT_GATES, GATES
from fleet_server.rollouts.metrics import DeviceObservation
from fleet_server.rollouts.policy import RolloutPolicy, Selector
from fleet_server.rollouts.shadow_evidence import ShadowInputs
from fleet_server.rollouts.state import (
    ACTIVE_STATES,
    AGENT_ROLLOUT,
    Decision,
    OfflineCheck,
    Rollout,
)

__all__ = [
    "AgentSendResult",
    "AssignPort",
    "EngineLock",
    "LocalLock",
    "OfflinePort",
    "RolloutRunner",
]

#: A command re-reads and retries this many times when a concurrent save won.
_COMMAND_ATTEMPTS = 3

log = logging.getLogger(__name__)


class AssignPort(Protocol):
    """What the runner needs of ``FleetService`` (fakes implement this)."""

    def assign(
        self, target: str, name: str, version: int, *, group: bool = False
    ) -> Sequence[object]: ...

    def assign_shadow(
        self, device_id: str, name: str, version: int, shadow: int, fraction_ppm: int
    ) -> object: ...

    def assign_agent(
        self, target: str, release: int, *, group: bool = False
    ) -> Sequence[AgentSendResult]: ...


class AgentSendResult(Protocol):
    """What ``assign_agent`` says per device (``service.AssignResult`` has this shape)."""

    @property
    def published(self) -> bool: ...

    @property
    def error(self) -> str | None: ...


class OfflinePort(Protocol):
    """The offline comparison before a rollout (``fleet_server.evalsets.offline``'s shape)."""

    def check(
        self,
        model: str,
        from_version: int | None,
        to_version: int,
        policy: RolloutPolicy,
        *,
        override: str = "",
    ) -> tuple[OfflineCheck, Override | None]: ...


class EngineLock(Protocol):
    """Who may run the engine (``fleet_server.jobs.leader.LeaderLock`` has this shape).

    ``try_acquire`` never blocks or raises and returns True while this worker holds the lock;
    it is asked before every step and before each rollout in it. ``release`` gives it up (on
    ``close``).
    """

    def try_acquire(self) -> bool: ...

    def release(self) -> None: ...


class LocalLock:
    """The single-process ``EngineLock``: always this process."""

    def try_acquire(self) -> bool:
        """Always True."""
        return True

    def release(self) -> None:
        """Nothing to release."""


class RolloutRunner:
    """Runs rollouts against a registry and a service (see the module docstring)."""

    def __init__(
        self,
        registry: Registry,
        service: AssignPort,
        clock: Callable[[], datetime],
        *,
        interval: float = 5.0,
        lock: EngineLock | None = None,
        new_id: Callable[[], str] | None = None,
        offline: OfflinePort | None = None,
    ) -> None:
        """Prepare a runner; nothing runs until ``step`` or ``start``.

        ``offline`` compares the candidate with the version it replaces before a rollout is
        created; without it rollouts are created unchecked (their ``offline`` stays None).
        """
        self._registry = registry
        self._reader = RolloutReader(registry)
        self._offline = offline
        self._service = service
        self._clock = clock
        self._engine_lock: EngineLock = lock or LocalLock()
        self._new_id = new_id or (lambda: f"ro-{uuid.uuid4().hex[:12]}")
        self._mutex = threading.RLock()
        # No lock for the job: ``step`` asks the engine lock itself (also before each rollout).
        self._job = PeriodicJob(
            "rollouts", self.step, interval=interval, what="rollout step", logger=log
        )

    @property
    def registry(self) -> Registry:
        """The registry the runner reads and writes."""
        return self._registry

    # ----------------------------------------------------------------- commands
    def create(
        self,
        model: str,
        version: int,
        *,
        selector: Selector,
        policy: RolloutPolicy,
        from_version: int | None = None,
        override_quarantine: str = "",
        override_aborted: str = "",
        override_offline: str = "",
    ) -> Rollout:
        """Create a pending rollout of ``model`` v``version`` (the next ``step`` starts it).

        ``from_version`` defaults to the version most targeted devices report as active. A
        quarantined version, or one a rollout already aborted, needs the operator's reason
        (``override_quarantine`` / ``override_aborted``); the rollout records it. Then the
        offline comparison (when the runner has one) runs both versions on the model's
        evaluation set: a regression beyond the policy's offline limits, or a comparison that
        cannot run, needs ``override_offline``; its result is kept as ``Rollout.offline``.

        Raises:
            ModelNotPublishedError: the version is not published.
            QuarantinedVersionError: the version is quarantined and not overridden.
            AbortedVersionError: a rollout of the version was aborted and it is not overridden.
            OfflineRegressionError: the candidate regressed on the evaluation set, no override.
            OfflineCheckError: the offline comparison cannot run, no override.
            RolloutPolicyError: an override reason is unprintable or too long.
            RegistryUnavailableError: the database failed.
        """
        try:
            self._registry.get_bundle(model, version)
        except RegistryUnavailableError:
            raise
        except RegistryError as exc:
            raise ModelNotPublishedError(str(exc)) from exc
        overrides = self._admit(model, version, override_quarantine, override_aborted)
        if from_version is None:
            from_version = common_version(model, version, self._reader.targeted(selector))
        offline: OfflineCheck | None = None
        if self._offline is not None:
            offline, used = self._offline.check(
                model, from_version, version, policy, override=override_offline
            )
            overrides = (*overrides, used) if used is not None else overrides
        return self._store_new(
            model, from_version, version, selector, policy, overrides, offline=offline
        )

    def create_agent(
        self,
        release: int,
        *,
        selector: Selector,
        policy: RolloutPolicy,
        from_release: int | None = None,
        override_quarantine: str = "",
        override_aborted: str = "",
    ) -> Rollout:
        """Create a pending rollout of agent ``release`` (``Rollout.agent``), in the waves and
        under the gates, holds and memory of failure of a model's (``gates.AGENT_GATES``; no
        offline comparison, no shadow phase).

        ``from_release`` defaults to the release most targeted devices run (None: the base
        install). Only devices that report the ``agent-update`` capability are targeted.

        Raises:
            ModelNotPublishedError: the release is not published.
            QuarantinedVersionError: the release is quarantined and not overridden.
            AbortedVersionError: a rollout of the release was aborted and it is not overridden.
            RolloutPolicyError: an override reason is unprintable or too long.
            RegistryUnavailableError: the database failed.
        """
        agent_releases.agent_release(self._registry, release)
        overrides = self._admit(AGENT_ROLLOUT, release, override_quarantine, override_aborted)
        if from_release is None:
            targets = self._reader.targeted(selector, agent=True)
            from_release = common_agent_release(release, targets)
        return self._store_new(AGENT_ROLLOUT, from_release, release, selector, policy, overrides)

    def _admit(
        self, model: str, version: int, override_quarantine: str, override_aborted: str
    ) -> tuple[Override, ...]:
        """The memory of failure's answer for ``model`` v``version`` (``admission.admit``)."""
        return admit(
            model,
            version,
            quarantine_reason=store.quarantine_reason(self._registry, model, version),
            aborts=store.abort_count(self._registry, model, version),
            override_quarantine=override_quarantine,
            override_aborted=override_aborted,
        )

    def _store_new(
        self,
        model: str,
        from_version: int | None,
        version: int,
        selector: Selector,
        policy: RolloutPolicy,
        overrides: tuple[Override, ...],
        *,
        offline: OfflineCheck | None = None,
    ) -> Rollout:
        """Store a new pending rollout."""
        now = self._clock()
        r = Rollout(
            id=self._new_id(),
            model=model,
            from_version=from_version,
            to_version=version,
            selector=selector,
            policy=policy,
            created_at=now,
            updated_at=now,
            overrides=overrides,
            offline=offline,
        )
        with self._mutex:
            return store.create_rollout(self._registry, r, now)

    def get(self, rollout_id: str) -> Rollout:
        """One rollout. Raises: UnknownRolloutError, RegistryUnavailableError."""
        return store.get_rollout(self._registry, rollout_id)

    def rollouts(self, *, active_only: bool = False) -> list[Rollout]:
        """Rollouts, newest first. Raises: RegistryUnavailableError."""
        states = sorted(ACTIVE_STATES | {"paused"}) if active_only else None
        return store.list_rollouts(self._registry, states=states)

    def approve(self, rollout_id: str) -> Rollout:
        """Approve the next wave. Raises: UnknownRolloutError, RolloutStateError."""
        return self._command(rollout_id, "approved", approve_rollout)

    def pause(self, rollout_id: str) -> Rollout:
        """Pause. Raises: UnknownRolloutError, RolloutStateError."""
        return self._command(rollout_id, "paused", pause_rollout)

    def resume(self, rollout_id: str) -> Rollout:
        """Resume a paused rollout. Raises: UnknownRolloutError, RolloutStateError."""
        return self._command(rollout_id, "resumed", resume_rollout)

    def abort(self, rollout_id: str) -> Rollout:
        """Abort (members go back per policy). Raises: UnknownRolloutError, RolloutStateError."""
        for attempt in range(_COMMAND_ATTEMPTS):
            with self._mutex:
                r = store.get_rollout(self._registry, rollout_id)
                now = self._clock()
                try:
                    previous = store.abort_count(self._registry, r.model, r.to_version)
                    decision = abort_rollout(r, now, previous_aborts=previous)
                    return self._apply(decision, now, kind="aborted", old=r)
                except RolloutConflictError:
                    if attempt == _COMMAND_ATTEMPTS - 1:
                        raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _command(
        self, rollout_id: str, kind: str, run: Callable[[Rollout, datetime], Rollout]
    ) -> Rollout:
        # Any worker takes commands; the leader may be saving a step meanwhile. The save is a
        # compare-and-set on the state read, so a command re-reads and retries rather than
        # overwriting the leader's decision (or being overwritten by it).
        for attempt in range(_COMMAND_ATTEMPTS):
            with self._mutex:
                r = store.get_rollout(self._registry, rollout_id)
                now = self._clock()
                new = run(r, now)
                try:
                    store.save_rollout(
                        self._registry, new, now, [(kind, {"state": new.state})], read=r
                    )
                except RolloutConflictError:
                    if attempt == _COMMAND_ATTEMPTS - 1:
                        raise
                    continue
                return new
        raise AssertionError("unreachable")  # pragma: no cover

    # ----------------------------------------------------------------- engine
    def step(self, now: datetime | None = None) -> list[Decision]:
        """Advance every active rollout once; returns the decisions applied.

        The engine lock is asked first and again before each rollout: once it is lost the step
        stops (the rollouts left are the new leader's). A rollout whose step fails is logged
        and retried on the next step.

        Raises:
            RegistryUnavailableError: the active rollouts cannot be listed.
        """
        if not self._engine_lock.try_acquire():
            return []
        out: list[Decision] = []
        with self._mutex:
            now = now or self._clock()
            for r in store.list_rollouts(self._registry, states=sorted(ACTIVE_STATES)):
                # A long step can outlive the lock (lost connection, another worker took over):
                # ask again before each rollout so a deposed leader stops writing.
                if not self._engine_lock.try_acquire():
                    log.warning("lost the engine lock mid-step; stopping before rollout %s", r.id)
                    break
                try:
                    out.append(self._step_one(r, now))
                except EdgefleetError as exc:
                    log.warning("rollout %s: step failed: %s", r.id, exc)
        return out

    def observations(self, r: Rollout, now: datetime) -> list[DeviceObservation]:
        """Every targeted device's observation for ``r`` (``RolloutReader.observations``).

        Raises:
            RegistryUnavailableError: the database failed.
        """
        return self._reader.observations(r, now)

    def device_states(self, r: Rollout) -> dict[str, str]:
        """Per targeted device: ``control``, ``shadow``, ``assigned``, ``installed``,
        ``failed``, ``rolled_back`` or ``reverted`` (``RolloutReader.device_states``).

        Raises:
            RegistryUnavailableError: the database failed.
        """
        return self._reader.device_states(r)

    def holds(self, r: Rollout, now: datetime | None = None) -> dict[str, dict[str, str | None]]:
        """Held members of ``r``: why (``window`` or ``budget``) and, for a window, when it
        next opens (ISO 8601, UTC) at ``now`` (default: the runner's clock).

        Raises:
            RegistryUnavailableError: the database failed.
        """
        if not r.held:
            return {}
        inputs = self._reader.hold_inputs(r, now or self._clock())
        opens = inputs.opens_at if inputs is not None else {}
        return {
            d: {"reason": why, "opens_at": opens[d].isoformat() if d in opens else None}
            for d, why in sorted(r.held.items())
        }

    def shadow_inputs(self, r: Rollout) -> ShadowInputs | None:
        """What the shadow phase needs (``RolloutReader.shadow_inputs``).

        Raises:
            RegistryUnavailableError: the database failed.
        """
        return self._reader.shadow_inputs(r)

    def _step_one(self, r: Rollout, now: datetime) -> Decision:
        previous = store.abort_count(self._registry, r.model, r.to_version)
        decision = decide(
            r,
            self.observations(r, now),
            now,
            previous_aborts=previous,
            gates=AGENT_GATES if r.agent else GATES,
            shadow=self.shadow_inputs(r),
            holds=self._reader.hold_inputs(r, now),
        )
        self._apply(decision, now, kind="decision", old=r)
        return decision

    def _apply(
        self, decision: Decision, now: datetime, *, kind: str, old: Rollout | None = None
    ) -> Rollout:
        r = decision.rollout
        # Do not send assignments for a decision computed from a state another worker has
        # changed meanwhile (an operator's pause or abort); the save below checks it too.
        sends = bool(decision.assign or decision.revert or decision.shadow)
        if old is not None and sends and store.get_rollout(self._registry, r.id) != old:
            raise RolloutConflictError(f"rollout {r.id} changed since it was read")
        errors: dict[str, str] = {}
        ppm = round((r.policy.shadow_fraction or 0.0) * 1_000_000)
        for device_id in decision.shadow:
            if r.from_version is None:
                continue
            try:
                sent = self._service.assign_shadow(
                    device_id, r.model, r.from_version, r.to_version, max(1, ppm)
                )
                if sent is None:
                    errors[device_id] = "shadow_unsupported: the device takes no shadow"
            except EdgefleetError as exc:
                errors[device_id] = f"{exc.code}: {exc}"
                log.warning("rollout %s: shadow to %s failed: %s", r.id, device_id, exc)
        for ids, version in ((decision.assign, r.to_version), (decision.revert, r.from_version)):
            for device_id in ids:
                if version is None:
                    continue
                try:
                    if r.agent:
                        for sent in self._service.assign_agent(device_id, version):
                            if not sent.published:
                                errors[device_id] = f"not sent: {sent.error}"
                    else:
                        self._service.assign(device_id, r.model, version)
                except EdgefleetError as exc:
                    # The rollout still counts it; the operator sees why in the event log.
                    errors[device_id] = f"{exc.code}: {exc}"
                    log.warning("rollout %s: assigning %s failed: %s", r.id, device_id, exc)
        if decision.quarantine:
            store.quarantine_version(
                self._registry, r.model, r.to_version, "; ".join(decision.reasons), now
            )
        changed = (
            old is None
            or old.state != r.state
            or old.wave != r.wave
            or decision.assign
            or decision.revert
            or decision.shadow
            or old.failed != r.failed
            or old.rolled_back != r.rolled_back
        )
        events: list[tuple[str, dict[str, Any]]] = []
        if changed:
            detail: dict[str, Any] = {
                "state": r.state,
                "wave": r.wave,
                "reasons": list(decision.reasons),
                "assign": list(decision.assign),
                "revert": list(decision.revert),
                **({"shadow": list(decision.shadow)} if decision.shadow else {}),
                "gates": [g.to_dict() for g in r.gates],
            }
            if errors:
                detail["errors"] = errors
            if decision.quarantine:
                detail["quarantined"] = True
            events.append((kind, detail))
        store.save_rollout(self._registry, r, now, events, read=old)
        return r

    # ----------------------------------------------------------------- thread
    def start(self) -> None:
        """Run ``step`` every ``interval`` seconds in a daemon thread."""
        self._job.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread (after its current step), wait for it, release the engine lock."""
        self._job.close(timeout)
        self._engine_lock.release()
