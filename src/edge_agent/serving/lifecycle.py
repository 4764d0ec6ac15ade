"""Which model versions serve: activation, installs, rollbacks, reverts, probation, drift windows.

Owns the agent's control work, serialised by one lock: activating a model (through the registry,
then its routing set-up in ``Candidates``, and that of the models using it as a candidate),
installs and rollbacks requested by the CLI or the sync layer, a rollout's shadow (staged
without serving, then run beside the live model: ``stage``, ``assign_shadow``), picking up
changes another
process made to the store (installs, rollbacks, root rotations), and on ``tick`` the probation
verdicts (rollback on failure) and the drift windows closed since the last tick (kept for the
sync loop's report in ``drift_windows``, a ``DriftWindowBuffer`` bounded by ``[drift]
buffer_bytes``).

Does not own: loading, health checks and self-rollback of one version (``Registry``), the
probation rule (``edge_agent.serving.probation``), or answering requests
(``edge_agent.serving.agent.Agent``, which exposes these operations). Not on the request path.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from edge_agent.common.drift_buffer import DriftWindowBuffer
from edge_agent.config import AgentConfig
from edge_agent.errors import EdgefleetError, ModelStoreError
from edge_agent.serving.candidates import Candidates
from edge_agent.serving.probation import FAILED, PASSED, judge_probation
from edge_agent.serving.registry import Loaded, Registry
from edge_agent.store import InstallResult, ModelStore

__all__ = ["ModelLifecycle"]

# The agent's logger: these lines were the agent's before the split, and log filters name it.
log = logging.getLogger("edge_agent.serving.agent")


class ModelLifecycle:
    """The control side of the agent; every method is thread-safe (one reentrant lock)."""

    def __init__(
        self, config: AgentConfig, store: ModelStore, registry: Registry, candidates: Candidates
    ) -> None:
        self.config = config
        self.store = store
        self.registry = registry
        self.candidates = candidates
        self._control = threading.RLock()
        # Closed drift windows until a report takes them; bounded in bytes, oldest dropped.
        self.drift_windows = DriftWindowBuffer(config.drift.buffer_bytes)
        self._root_version = store.root.version

    def start(self) -> None:
        """Load every installed model (self-rolling back failed ones) and set up routing."""
        with self._control:
            for name in self.store.names():
                self._activate_safely(name)

    def _activate_safely(self, name: str) -> None:
        """Activate one model; a broken model must not keep the others from serving."""
        try:
            self._activate(name)
        except EdgefleetError as exc:
            log.error("%s not served: %s", name, exc)
            self.registry.record_event(name, None, "load_failed", str(exc))

    def _activate(self, name: str) -> Loaded | None:
        entry = self.registry.activate(name)
        self.candidates.activated(name, entry)
        return entry

    def install(self, bundle: Path, *, force: bool = False) -> InstallResult:
        """Install through the store and serve the new version (health-checked, on probation).

        Raises:
            BundleFormatError, BundleVerificationError, ModelStoreError: nothing changed.
        """
        with self._control:
            result = self.store.install(bundle, force=force)
            self._activate(result.name)
            return result

    def stage(self, bundle: Path) -> InstallResult:
        """Verify and keep a bundle without serving it (a rollout's shadow; see
        ``ModelStore.stage``).

        Raises:
            BundleFormatError, BundleVerificationError, ModelStoreError: nothing changed.
        """
        with self._control:
            return self.store.stage(bundle)

    def unstage(self, name: str, version: int) -> None:
        """Forget a staged version that is no longer assigned as a shadow (never a serving one).

        Raises:
            ModelStoreError: the store cannot be written.
        """
        with self._control:
            self.store.unstage(name, version)

    def assign_shadow(self, name: str, version: int | None, fraction: float = 0.0) -> int | None:
        """Run the staged ``version`` as ``name``'s shadow (None: stop); see
        ``Candidates.assign_shadow``.

        Returns:
            The version now running as the shadow (None: none, e.g. it failed to load; the
            cause is in ``candidates.shadow_errors``).
        """
        with self._control:
            self.candidates.assign_shadow(name, version, fraction)
            return self.candidates.rollout_shadow(name)

    def rollback(self, name: str, reason: str = "manual rollback") -> None:
        """Serve the previous good version of ``name``.

        Raises:
            ModelStoreError: no other good version.
        """
        with self._control:
            self.registry.rollback(name, reason, failed=False)
            if self._activate(name) is None:
                raise ModelStoreError(f"{name}: the version rolled back to cannot be served")

    def revert_to(self, name: str, version: int, reason: str) -> None:
        """Serve the kept ``version`` of ``name`` again (the fleet server sent it back).

        Raises:
            ModelNotFoundError: ``version`` is not installed.
            ModelStoreError: ``version`` failed here before, or cannot be served.
        """
        with self._control:
            self.registry.revert_to(name, version, reason)
            if self._activate(name) is None:
                raise ModelStoreError(f"{name} v{version} cannot be served")

    def reload_changed(self) -> list[str]:
        """Pick up installs, rollbacks and root rotations made by another process (the CLI).

        A model marked down for its active version (``ModelState.down``) is not retried here:
        nothing changed since it failed. It is retried when another version becomes active,
        when the trusted root rotated, and at start.

        Returns:
            The names now serving a different version than before.
        """
        changed = []
        with self._control:
            try:
                self.store.refresh_root()
            except EdgefleetError as exc:
                log.error("stored root not picked up: %s", exc)
            # A new root (from the CLI or the sync loop) may make a version load that failed
            # verification: models down are retried once after a rotation.
            rotated = self.store.root.version != self._root_version
            self._root_version = self.store.root.version
            for name in self.store.names():
                entry = self.registry.get(name)
                try:
                    state = self.store.state(name)
                except EdgefleetError as exc:
                    log.error("%s: unreadable state: %s", name, exc)
                    continue
                active = state.active
                if active is None or (entry is not None and entry.pipeline.version == active):
                    continue
                down = state.down is not None and state.down.version == active
                if down and not rotated:
                    continue  # known down, cause already logged and recorded
                self._activate_safely(name)
                now = self.registry.get(name)
                if now is not None and now is not entry:
                    changed.append(name)
        return changed

    def tick(self) -> None:
        """Periodic control work: probation verdicts and drift windows (not on the hot path)."""
        with self._control:
            for key in self.registry.loaded_keys():
                entry = self.registry.get(key)
                if entry is None:
                    continue
                for window in entry.pipeline.collect_windows():
                    self.drift_windows.append((key, entry.pipeline.version, window))
                if entry.on_probation:
                    try:
                        self._judge(key, entry)
                    except EdgefleetError as exc:  # one model must not stall the others
                        log.error("%s: probation handling failed: %s", key, exc)

    def _judge(self, key: str, entry: Loaded) -> None:
        verdict = judge_probation(entry.pipeline.probation_stats(), entry.pipeline.policy)
        if verdict.status == PASSED:
            self.registry.mark_good(key)
        elif verdict.status == FAILED:
            version = entry.pipeline.version
            log.warning("%s v%d failed probation: %s", key, version, verdict.reason)
            try:
                self.registry.rollback(key, f"probation: {verdict.reason}", from_version=version)
            except ModelStoreError as exc:
                # No good version to go back to: keep serving, stop re-judging, say so.
                entry.on_probation = False
                self.registry.record_event(
                    key,
                    version,
                    "probation_failed",
                    f"{verdict.reason}; no rollback: {exc}",
                )
                return
            self._activate(key)
