"""Per loaded model, what routing needs: its fallback policy, its A/B split, its shadow runner.

Owns the tables the request path reads (``policy``, ``ab``, ``ab_candidate``, ``shadow``) and
setting them up when a model (or a model it uses as a candidate) is activated: a candidate is
another model's name or a kept version ``name@version``, loaded pinned through the registry;
a candidate that cannot be loaded leaves the live model serving without it. Closes shadow runners
it replaces.

A *rollout shadow* (``assign_shadow``: the signed desired state names a staged version and a
sampled fraction) takes the place of the per-device ``shadow_candidate`` of that model while
it is assigned. It is loaded outside the registry's table (``Registry.load_detached``), so no
request can reach it by name or version: the shadow never answers a client.

Does not own: deciding a route (``edge_agent.serving.routing.Router``), drawing the A/B arm or
running the shadow (``edge_agent.serving.shadow``), or loading the live versions
(``edge_agent.serving.registry.Registry``). Set up on the agent's control thread; read by request
threads (one dict lookup each, swapped whole).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

from edge_agent.config import AgentConfig
from edge_agent.serving.fallback import FallbackPolicy
from edge_agent.serving.registry import Loaded, Registry
from edge_agent.serving.shadow import ABRouter, ShadowRunner

__all__ = ["Candidates"]

log = logging.getLogger("edge_agent.serving.candidates")


class Candidates:
    """The routing set-up of every loaded model, by model name."""

    def __init__(self, config: AgentConfig, registry: Registry, clock: Callable[[], float]) -> None:
        self._config, self._registry, self._clock = config, registry, clock
        self._policies: dict[str, FallbackPolicy] = {}
        self._ab: dict[str, ABRouter] = {}
        self._shadows: dict[str, ShadowRunner] = {}
        # Rollout shadows: name -> (version, fraction), and their detached loads.
        self._assigned: dict[str, tuple[int, float]] = {}
        self._detached: dict[str, Loaded] = {}
        self.shadow_errors: dict[str, str] = {}

    # ------------------------------------------------------------------ request path
    def policy(self, name: str) -> FallbackPolicy | None:
        """The fallback policy of ``name`` (None until it has served in this process)."""
        return self._policies.get(name)

    def ab(self, name: str) -> ABRouter | None:
        """The A/B split of ``name`` (None: no candidate configured or ever loaded)."""
        return self._ab.get(name)

    def ab_candidate(self, name: str) -> Loaded | None:
        """The A/B candidate of ``name`` if it is loaded now (never loads it)."""
        return self._registry.get(self._config.policy(name).ab_candidate or "")

    def shadow(self, name: str) -> ShadowRunner | None:
        """The shadow runner of ``name``, if it has one."""
        return self._shadows.get(name)

    # --------------------------------------------------------------------- reporting
    def ab_counts(self) -> dict[str, dict[str, int]]:
        """Requests per A/B arm, per model with a split."""
        return {name: ab.counts() for name, ab in list(self._ab.items())}

    def shadow_stats(self) -> dict[str, dict[str, object]]:
        """``ShadowRunner.stats`` per model with a shadow."""
        return {name: shadow.stats() for name, shadow in list(self._shadows.items())}

    def rollout_shadow(self, name: str) -> int | None:
        """The version running as ``name``'s rollout shadow now (None: none runs)."""
        entry = self._detached.get(name)
        return None if entry is None or name not in self._shadows else entry.pipeline.version

    # ------------------------------------------------------------------------ set-up
    def assign_shadow(self, name: str, version: int | None, fraction: float = 0.0) -> None:
        """Run the staged ``version`` as ``name``'s shadow on ``fraction`` of its requests
        (None: no rollout shadow; the per-device config applies again). Set up at once when
        ``name`` serves, else when it is activated. A shadow that cannot load is recorded in
        ``shadow_errors`` and the live model serves without it."""
        if version is None:
            if self._assigned.pop(name, None) is None:
                return
        elif self._assigned.get(name) == (version, fraction):
            return
        else:
            self._assigned[name] = (version, fraction)
        self.shadow_errors.pop(name, None)
        self._setup(name)

    def activated(self, name: str, entry: Loaded | None) -> None:
        """``name`` was (re)activated as ``entry`` (None: nothing of it serves): set it up,
        and set up again the models that use it as a shadow or A/B candidate."""
        for other in self._registry.loaded_keys():
            policy = self._config.policy(other)
            refs = (policy.shadow_candidate, policy.ab_candidate)
            if other != name and any(r == name for r in refs):
                self._setup(other)
        if entry is not None:
            self._setup(name)

    def _setup(self, name: str) -> None:
        entry = self._registry.get(name)
        if entry is None:
            return
        manifest = entry.pipeline.manifest
        self._policies[name] = FallbackPolicy(self._config.fallback, manifest.outputs)
        policy = self._config.policy(name)
        ab, ab_fraction = policy.ab_candidate, policy.ab_fraction
        if ab and ab_fraction > 0 and self._pin(ab) is not None:
            self._ab.setdefault(name, ABRouter(ab_fraction, seed=None))
        old = self._shadows.pop(name, None)
        if old is not None:
            old.close()
        if name in self._assigned or name in self._detached:
            self._setup_rollout_shadow(name)
            if name in self._assigned:
                return
        if policy.shadow_candidate and policy.shadow_fraction > 0:
            cand = self._pin(policy.shadow_candidate)
            if cand is not None:
                self._shadows[name] = ShadowRunner(
                    cand.pipeline.runtime,
                    policy.shadow_fraction,
                    policy.shadow_queue,
                    cand.pipeline.manifest.outputs,
                    random.Random(),
                    self._clock,
                    name=f"shadow-{name}",
                )

    def _setup_rollout_shadow(self, name: str) -> None:
        """Load (or drop) the rollout shadow of ``name`` and start its runner."""
        want = self._assigned.get(name)
        have = self._detached.get(name)
        if have is not None and (want is None or have.pipeline.version != want[0]):
            self._detached.pop(name).pipeline.close()
            have = None
        if want is None:
            return
        version, fraction = want
        if have is None:
            try:
                have = self._registry.load_detached(name, version)
            except Exception as exc:  # a broken shadow must not stop the live model
                self.shadow_errors[name] = f"{type(exc).__name__}: {exc}"
                log.error("%s: shadow v%d not available: %s", name, version, exc)
                return
            self._detached[name] = have
        self._shadows[name] = ShadowRunner(
            have.pipeline.runtime,
            fraction,
            self._config.policy(name).shadow_queue,
            have.pipeline.manifest.outputs,
            random.Random(),
            self._clock,
            name=f"shadow-{name}",
            version=version,
        )

    def _pin(self, ref: str) -> Loaded | None:
        """``name`` (another model) or ``name@version`` (a kept version) as a candidate."""
        if self._registry.get(ref) is not None:
            return self._registry.get(ref)
        name, _, version = ref.partition("@")
        try:
            if version:
                return self._registry.load_pinned(name, int(version))
            return self._registry.activate(name)
        except Exception as exc:  # a missing candidate must not stop the live model
            log.error("candidate %s not available: %s", ref, exc)
            return None

    def close(self) -> None:
        """Stop every shadow runner."""
        for shadow in self._shadows.values():
            shadow.close()
        for entry in self._detached.values():
            entry.pipeline.close()
