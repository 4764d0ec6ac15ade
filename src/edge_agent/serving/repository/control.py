"""Load, unload and the version policy's extra versions, mapped onto the store and the registry.

Owns three things the model repository extension needs and nothing else on the device models:

* **Unload** stops serving a model: an in-memory *hold* (``unloaded``) that the router turns
  into a refusal (``ModelStoreError``, 503 / UNAVAILABLE, never the cloud), and the version
  policy's extra versions of it are freed. The store has no "stopped" state, so a hold is not
  persisted: a restart serves every installed model again. The active version's session stays
  resident (the lifecycle re-activates any installed model missing from the registry's table).
  A hold lapses by itself when another version becomes active (a fleet desired state, an install
  or a rollback): the newest intent wins.
* **Load** lifts a hold and, with a ``version``, makes that kept version active through the
  store's ``revert_to`` (persisted; the version left is marked ``rolled_back``, as when the fleet
  sends a device back). A version that failed here, a staged shadow or one not kept is refused.
  A model whose active version is down stays down (the reason says why): load does not retry it.
* **The version policy** (``[serving] version_policy``; ``serving.routing.served_versions``):
  the kept versions it names besides the active one are loaded eagerly into the registry under
  ``name@version`` (health-checked and counted against ``store.memory_budget_mb`` like any
  load) at start and on every control tick, so a versioned request never waits for a load.
  Versions no longer named are unloaded; a version that fails to load is not tried again until
  the model's active version changes. Versions configured as the model's A/B or shadow
  candidate are the candidates' (``serving.candidates``): reachable, never loaded or unloaded
  here.

Thread-safety: one lock serialises ``refresh``, ``load`` and ``unload`` (taken before the
lifecycle's, never inside it); the request path reads ``unloaded`` and ``serves`` (a dict and a
set lookup, tables swapped whole). Does not own routing (``serving.routing``), loading one
version (``serving.registry``) or what the store persists (``edge_agent.store``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from edge_agent.config import AgentConfig
from edge_agent.errors import EdgefleetError, ModelNotFoundError, ModelStoreError
from edge_agent.serving.registry import Registry
from edge_agent.serving.repository.index import READY, UNAVAILABLE, IndexEntry, index_of
from edge_agent.serving.routing import served_versions
from edge_agent.store import ModelState, ModelStore

__all__ = ["LOAD_REASON", "ModelRepository"]

log = logging.getLogger("edge_agent.serving.repository")

#: The reason recorded in the store when a load switches the active version.
LOAD_REASON = "loaded through the local repository API"

Revert = Callable[[str, int, str], None]


class ModelRepository:
    """The repository extension's side of the agent (see the module docstring)."""

    def __init__(
        self, config: AgentConfig, store: ModelStore, registry: Registry, revert: Revert
    ) -> None:
        """``revert(name, version, reason)`` serves a kept version (the lifecycle's revert)."""
        self._config = config
        self._store = store
        self._registry = registry
        self._revert = revert
        self._lock = threading.Lock()
        self._held: dict[str, int | None] = {}  # unloaded model -> active version then
        self._served: dict[str, frozenset[int]] = {}  # the policy's versions, per model
        self._reachable: frozenset[str] = frozenset()  # "name@v" keys requests may name
        self._mine: set[str] = set()  # "name@v" keys this loaded into the registry
        self._failures: dict[tuple[str, int], str] = {}
        self._loading: set[tuple[str, int]] = set()
        self._seen_active: dict[str, int | None] = {}

    # ------------------------------------------------------------------ request path
    def unloaded(self, name: str) -> bool:
        """Whether an operator unloaded ``name`` (and no other version became active since)."""
        return name in self._held

    def serves(self, name: str, version: str) -> bool:
        """Whether a request may name ``version`` of ``name`` (besides the serving version):
        the version policy serves it, or it is the model's configured A/B or shadow candidate."""
        key = f"{name}@{version}"
        if key in self._reachable:
            return True
        policy = self._config.policy(name)
        return key in (policy.ab_candidate, policy.shadow_candidate)

    # --------------------------------------------------------------------- control
    def refresh(self) -> None:
        """Bring every model's extra versions in line with the policy and the store (the
        control tick). A model whose state cannot be read keeps what it has (logged)."""
        with self._lock:
            names = self._store.names()
            for name in names:
                self._refresh_one(name)
            for key in [k for k in self._mine if k.partition("@")[0] not in names]:
                self._drop(key)
            for gone in set(self._served) - set(names):
                del self._served[gone]
            self._publish()

    def unload(self, name: str) -> None:
        """Stop serving ``name`` until it is loaded again or another version becomes active.

        Raises:
            ModelNotFoundError: ``name`` is not installed.
            ModelStoreError: its state cannot be read.
        """
        with self._lock:
            state = self._installed(name)
            self._held[name] = state.active
            log.warning("%s unloaded through the repository API (v%s)", name, state.active)
            self._refresh_one(name, state)
            self._publish()

    def load(self, name: str, version: int | None = None) -> None:
        """Serve ``name`` again; with ``version``, make that kept version active first.

        Raises:
            ModelNotFoundError: ``name`` or ``version`` is not installed.
            ModelStoreError: ``version`` failed here before or is a staged shadow; the
                version cannot be served (the message says why); the state is unreadable.
        """
        with self._lock:
            state = self._installed(name)
            if version is not None and version != state.active:
                record = state.record(version)
                if record.status == "staged":
                    raise ModelStoreError(f"{name} v{version} is a rollout's shadow: not served")
                self._revert(name, version, LOAD_REASON)  # persisted by the store
                state = self._store.state(name)
            self._held.pop(name, None)
            self._refresh_one(name, state)
            self._publish()
            if self._registry.get(name) is None:
                down = state.down
                why = down.reason if down is not None else "no version of it can be loaded"
                raise ModelStoreError(f"model {name!r} is not ready: {why}")
            log.info("%s loaded through the repository API (v%s)", name, state.active)

    def index(self, *, ready_only: bool = False) -> list[IndexEntry]:
        """Every installed model's kept versions, name then version order (``index_of``).

        A model whose state cannot be read is one UNAVAILABLE entry without a version.
        """
        entries: list[IndexEntry] = []
        # Copies (atomic under the GIL): the control thread changes these while a load runs,
        # and the index does not wait for a load.
        loading, failures = self._loading.copy(), self._failures.copy()
        for name in self._store.names():
            try:
                state = self._store.state(name)
            except EdgefleetError as exc:
                entries.append(IndexEntry(name, "", UNAVAILABLE, f"unreadable state: {exc}"))
                continue
            entry = self._registry.get(name)
            pinned = {
                r.version
                for r in state.versions
                if self.serves(name, str(r.version))
                and self._registry.get(f"{name}@{r.version}") is not None
            }
            entries += index_of(
                state,
                serving=None if entry is None else entry.pipeline.version,
                pinned=pinned,
                served=self._served.get(name, frozenset()),
                unloaded=self.unloaded(name),
                loading={v for n, v in loading if n == name},
                failures={v: why for (n, v), why in failures.items() if n == name},
            )
        return [e for e in entries if e.state == READY] if ready_only else entries

    # -------------------------------------------------------------------- internals
    def _installed(self, name: str) -> ModelState:
        if name not in self._store.names():
            raise ModelNotFoundError(f"model {name!r} is not installed")
        return self._store.state(name)

    def _refresh_one(self, name: str, state: ModelState | None = None) -> None:
        if state is None:
            try:
                state = self._store.state(name)
            except EdgefleetError as exc:
                log.error("%s: unreadable state, extra versions unchanged: %s", name, exc)
                return
        previous = self._seen_active.get(name, state.active)
        self._seen_active[name] = state.active
        if previous != state.active:  # another version became active: retry what failed
            self._failures = {k: v for k, v in self._failures.items() if k[0] != name}
        if name in self._held and self._held[name] != state.active:
            del self._held[name]  # the newest intent wins: the unload has lapsed
            log.info("%s: v%s is active now, the repository unload lapsed", name, state.active)
        entry = self._registry.get(name)
        serving = None if entry is None else entry.pipeline.version
        kept = [(r.version, r.status) for r in state.versions]
        policy_of = self._config.serving.version_policy
        served: frozenset[int] = (
            frozenset() if name in self._held else served_versions(policy_of, state.active, kept)
        )
        self._served[name] = served
        policy = self._config.policy(name)
        candidates = {policy.ab_candidate, policy.shadow_candidate}
        wanted = {f"{name}@{v}" for v in served if v not in (state.active, serving)} - candidates
        for key in sorted(k for k in self._mine if k.partition("@")[0] == name):
            if key not in wanted:
                self._drop(key)
        for key in sorted(wanted):
            if self._registry.get(key) is None:
                self._load_pinned(name, int(key.partition("@")[2]))

    def _load_pinned(self, name: str, version: int) -> None:
        if (name, version) in self._failures:
            return
        self._loading.add((name, version))
        try:
            self._registry.load_pinned(name, version)
        except EdgefleetError as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self._failures[(name, version)] = reason
            log.error("%s v%d not served by version (version policy): %s", name, version, reason)
            return
        finally:
            self._loading.discard((name, version))
        self._mine.add(f"{name}@{version}")
        log.info("%s v%d serves by version (version policy)", name, version)

    def _drop(self, key: str) -> None:
        self._mine.discard(key)
        self._registry.unload(key)
        log.info("%s no longer serves by version (version policy)", key)

    def _publish(self) -> None:
        self._reachable = frozenset(
            f"{name}@{v}" for name, served in self._served.items() for v in served
        )
