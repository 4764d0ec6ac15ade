"""The agent: the ``InferenceService`` behind the local API, and the control loop behind it.

Owns: request routing (A/B arm, device or cloud, hard examples, fallback on failure), shadow
offers, capture sampling, probation judging and drift-window collection on ``tick``, and
installs/rollbacks requested by the CLI or the sync layer. The hot path itself is
``ModelPipeline.run``; loading and health checks are ``Registry``'s; the ``status()`` snapshot
is built by ``edge_agent.serving.status``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent import __version__
from edge_agent.config import AgentConfig
from edge_agent.drift.monitor import DriftWindow
from edge_agent.errors import (
    EdgefleetError,
    FallbackError,
    InferenceError,
    InputValidationError,
    ModelNotFoundError,
    ModelStoreError,
)
from edge_agent.serving.capture import CaptureRing
from edge_agent.serving.fallback import CloudFallback, FallbackPolicy, FallbackTransport
from edge_agent.serving.pipeline import DriftWorker, PipelineResult
from edge_agent.serving.probation import FAILED, PASSED, judge_probation
from edge_agent.serving.registry import Loaded, Registry
from edge_agent.serving.service import (
    SOURCE_CLOUD,
    SOURCE_DEVICE,
    Array,
    InferenceRequest,
    InferenceResult,
)
from edge_agent.serving.shadow import ABRouter, ShadowRunner
from edge_agent.serving.status import not_ready, status_snapshot, why_not_serving
from edge_agent.store import InstallResult, ModelStore

log = logging.getLogger("edge_agent.serving.agent")


class Agent:
    """Serves every installed model; implements ``edge_agent.serving.service.InferenceService``."""

    def __init__(
        self,
        config: AgentConfig,
        store: ModelStore,
        *,
        transport: FallbackTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        capture: CaptureRing | None = None,
        background_drift: bool = False,
    ) -> None:
        self.config = config
        self.store = store
        self._clock = clock
        self.worker = DriftWorker() if background_drift else None
        self.registry = Registry(config, store, clock=clock, worker=self.worker)
        self.cloud = CloudFallback(transport, config.fallback, clock) if transport else None
        self._transport = transport
        self.capture = capture
        self._rng = random.Random()
        self._policies: dict[str, FallbackPolicy] = {}
        self._routers: dict[str, ABRouter] = {}
        self._shadows: dict[str, ShadowRunner] = {}
        self._control = threading.RLock()
        self.counts: Counter[str] = Counter()
        # Answers per model name by source (device/cloud): the per-model fallback rate.
        self._sources: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.drift_windows: deque[tuple[str, int, DriftWindow]] = deque(maxlen=1000)
        self.started_at = time.time()
        self._root_version = store.root.version

    # ------------------------------------------------------------------------ lifecycle
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
            self.registry._event(name, None, "load_failed", str(exc))

    def _activate(self, name: str) -> Loaded | None:
        entry = self.registry.activate(name)
        # Models that use this one as a shadow / A-B candidate must see the new version.
        for other in self.registry.loaded_keys():
            policy = self.config.policy(other)
            refs = (policy.shadow_candidate, policy.ab_candidate)
            if other != name and any(r == name for r in refs):
                self._setup_routing(other)
        if entry is None:
            return None
        self._setup_routing(name)
        return entry

    def _setup_routing(self, name: str) -> None:
        entry = self.registry.get(name)
        if entry is None:
            return
        manifest = entry.pipeline.manifest
        self._policies[name] = FallbackPolicy(self.config.fallback, manifest.outputs)
        policy = self.config.policy(name)
        self._setup_candidates(
            name,
            policy.ab_candidate,
            policy.ab_fraction,
            policy.shadow_candidate,
            policy.shadow_fraction,
            policy.shadow_queue,
        )

    def _setup_candidates(
        self,
        name: str,
        ab: str | None,
        ab_fraction: float,
        shadow: str | None,
        shadow_fraction: float,
        queue: int,
    ) -> None:
        if ab and ab_fraction > 0 and self._pin(ab) is not None:
            self._routers.setdefault(name, ABRouter(ab_fraction, seed=None))
        old = self._shadows.pop(name, None)
        if old is not None:
            old.close()
        if shadow and shadow_fraction > 0:
            cand = self._pin(shadow)
            if cand is not None:
                self._shadows[name] = ShadowRunner(
                    cand.pipeline.runtime,
                    shadow_fraction,
                    queue,
                    cand.pipeline.manifest.outputs,
                    random.Random(),
                    self._clock,
                    name=f"shadow-{name}",
                )

    def _pin(self, ref: str) -> Loaded | None:
        """``name`` (another model) or ``name@version`` (a kept version) as a candidate."""
        if self.registry.get(ref) is not None:
            return self.registry.get(ref)
        name, _, version = ref.partition("@")
        try:
            if version:
                return self.registry.load_pinned(name, int(version))
            return self.registry.activate(name)
        except Exception as exc:  # a missing candidate must not stop the live model
            log.error("candidate %s not available: %s", ref, exc)
            return None

    def install(self, bundle: Path, *, force: bool = False) -> InstallResult:
        """Install through the store and serve the new version (health-checked, on probation).

        Raises:
            BundleFormatError, BundleVerificationError, ModelStoreError: nothing changed.
        """
        with self._control:
            result = self.store.install(bundle, force=force)
            self._activate(result.name)
            return result

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
                self.registry._event(
                    key,
                    version,
                    "probation_failed",
                    f"{verdict.reason}; no rollback: {exc}",
                )
                return
            self._activate(key)

    def close(self) -> None:
        for shadow in self._shadows.values():
            shadow.close()
        if self.worker is not None:
            self.worker.close()
        if self.capture is not None:
            self.capture.close()
        self.registry.close()

    # -------------------------------------------------------------------- InferenceService
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Server ready (KServe v2): models are installed and every one of them serves."""
        return bool(self.store.names()) and not self.not_ready()

    def not_ready(self) -> dict[str, str]:
        """Installed models that do not serve, each with why (the store's down record first).

        What ``/v2/health/ready`` and ``/v2/models/{name}/ready`` answer with when not ready.
        """
        return not_ready(self)

    def server_metadata(self) -> dict[str, Any]:
        return {
            "name": "edgefleet-edge-agent",
            "version": __version__,
            "extensions": ["binary_tensor_data"],  # what edge_agent.api serves
        }

    def model_names(self) -> list[str]:
        return [k for k in self.registry.loaded_keys() if "@" not in k]

    def _entry(self, name: str, version: str | None) -> Loaded:
        entry = self.registry.get(name)
        if entry is None:
            raise ModelNotFoundError(f"model {name!r} is not loaded")
        if version is not None and version != str(entry.pipeline.version):
            pinned = self.registry.get(f"{name}@{version}")
            if pinned is None:
                raise ModelNotFoundError(f"model {name!r} version {version} is not loaded")
            return pinned
        return entry

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        entry = self._entry(name, version)
        m = entry.pipeline.manifest
        rt = entry.pipeline.runtime
        return {
            "name": name,
            "versions": [str(m.version)],
            "platform": "onnxruntime_onnx" if m.artifact.format == "onnx" else "tflite",
            "inputs": [
                {
                    "name": t.name,
                    "datatype": t.dtype,
                    "shape": [-1 if d.size is None else d.size for d in t.shape],
                }
                for t in m.inputs.tensors
            ],
            "outputs": [
                {
                    "name": o.name,
                    "datatype": o.dtype,
                    "shape": [d if isinstance(d, int) else -1 for d in o.shape],
                }
                for o in rt.outputs
            ],
            "parameters": {
                "channel": m.channel,
                "task": m.outputs.task,
                "labels": list(m.outputs.labels),
                "probation": entry.on_probation,
            },
        }

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """Whether ``name`` (``version``) serves.

        Raises:
            ModelStoreError: ``name`` is installed but does not serve (the message says why).
            ModelNotFoundError: no such model or version.
        """
        if version is None and self.registry.get(name) is None:
            raise self._not_serving(name)
        return self._entry(name, version) is not None

    def _not_serving(self, name: str) -> ModelStoreError:
        """The error for a request to a model that is not loaded: why, when it is installed."""
        if name in self.store.names():
            return ModelStoreError(f"model {name!r} is not ready: {why_not_serving(self, name)}")
        return ModelNotFoundError(f"model {name!r} is not loaded")

    def infer(self, request: InferenceRequest) -> InferenceResult:
        """Route, run and account for one request (see the module docstring)."""
        name = request.model
        entry = self.registry.get(name)
        policy = self._policies.get(name)
        arm = "live"
        if entry is not None and request.version is None:
            router = self._routers.get(name)
            if router is not None:
                arm = router.arm(request.routing_key)
                if arm == "candidate":
                    # Never load on the request path: a candidate not loaded serves as live.
                    cand = self.registry.get(self.config.policy(name).ab_candidate or "")
                    if cand is None:
                        arm = "live"
                    else:
                        entry = cand
        elif entry is not None:
            entry = self._entry(name, request.version)
        cloud_failed: str | None = None
        if policy is not None and self.cloud is not None:
            decision = policy.before(
                local_ok=entry is not None, validation_failed=False, out_of_distribution=False
            )
            if decision.cloud:
                try:
                    return self._cloud(request, entry, decision.reason or "policy", arm)
                except FallbackError as exc:
                    # prefer_cloud answers on the device when the cloud cannot; cloud_only not.
                    if entry is None or self.config.fallback.mode == "cloud_only":
                        raise
                    cloud_failed = str(exc)
        if entry is None:
            if self.cloud is not None and self.config.fallback.mode != "device_only":
                return self._cloud(request, None, "local_unavailable", arm)
            raise self._not_serving(name)
        try:
            result = self._run_local(entry, request)
        except InputValidationError as invalid:
            self.counts["rejected"] += 1
            if self._may_fall_back():
                try:
                    return self._cloud(request, entry, "invalid_input", arm)
                except FallbackError:
                    raise invalid from None  # the client learns why its input was refused
            raise
        except InferenceError:
            self.counts["errors"] += 1
            if self._may_fall_back():
                return self._cloud(request, entry, "local_unavailable", arm)
            raise
        version = str(entry.pipeline.version)
        params: dict[str, Any] = {
            "model_version": version,
            "inference_source": SOURCE_DEVICE,
            "ab_arm": arm,
        }
        if cloud_failed is not None:
            params["fallback_failed"] = cloud_failed
        if result.validation.dropped and result.validation.kept is not None:
            params["dropped_rows"] = result.validation.dropped
            params["dropped_by_reason"] = dict(result.validation.rejected)
            params["kept_rows"] = np.flatnonzero(result.validation.kept).tolist()
        if entry.pipeline.last_drift_alert:
            params["drift_alert"] = True
        if policy is not None and self._may_fall_back():
            fb = self.config.fallback
            if entry.pipeline.out_of_distribution(result.validation.feeds, fb.ood_feature_fraction):
                try:
                    return self._cloud(request, entry, "out_of_distribution", arm)
                except FallbackError as exc:
                    params["fallback_failed"] = str(exc)
                    params["out_of_distribution"] = True
        if policy is not None and self.cloud is not None and "fallback_failed" not in params:
            hard = policy.after(result.outputs)
            if hard.cloud:
                try:
                    return self._cloud(
                        request, entry, hard.reason or "hard_example", arm, result.outputs
                    )
                except FallbackError as exc:
                    params["fallback_failed"] = str(exc)
        shadow = self._shadows.get(name)
        if shadow is not None and entry.key == name:
            shadow.offer(result.model_inputs, result.outputs, result.latency_s)
        if self.capture is not None:
            self.capture.offer(
                name, entry.pipeline.version, result.validation.feeds, result.outputs
            )
        self.counts["device"] += 1
        self._sources[name]["device"] += 1
        return InferenceResult(name, version, result.outputs, SOURCE_DEVICE, params)

    def _run_local(self, entry: Loaded, request: InferenceRequest) -> PipelineResult:
        """Run on the device; if the version was swapped out mid-request, retry once on the
        version now serving (a swap must not fail requests already in flight)."""
        try:
            return entry.pipeline.run(request.inputs, request.payload_bytes)
        except InferenceError:
            current = self.registry.get(entry.key)
            if current is None or current.pipeline is entry.pipeline:
                raise
            return current.pipeline.run(request.inputs, request.payload_bytes)

    def _may_fall_back(self) -> bool:
        return self.cloud is not None and self.config.fallback.mode == "prefer_device"

    def _cloud(
        self,
        request: InferenceRequest,
        entry: Loaded | None,
        reason: str,
        arm: str,
        device_outputs: Mapping[str, Array] | None = None,
    ) -> InferenceResult:
        assert self.cloud is not None
        if entry is not None:
            # The cloud model gets the tensor as sent: one of another datatype than the local
            # input's is refused here as on the device (never cast), whichever route chose it.
            entry.pipeline.validator.check_datatypes(request.inputs)
        # The cloud answers with the version this device runs (never a newer published one).
        outputs: Mapping[str, Array] = self.cloud.call(
            request.model,
            request.inputs,
            reason,
            device_outputs=device_outputs,
            model_version=None if entry is None else int(entry.pipeline.version),
        )
        self.counts["cloud"] += 1
        self._sources[request.model]["cloud"] += 1
        version = str(entry.pipeline.version) if entry is not None else "cloud"
        return InferenceResult(
            request.model,
            version,
            dict(outputs),
            SOURCE_CLOUD,
            {
                "model_version": version,
                "inference_source": SOURCE_CLOUD,
                "fallback_reason": reason,
                "ab_arm": arm,
            },
        )

    # -------------------------------------------------------------------------- reporting
    def status(self) -> dict[str, Any]:
        """A JSON-safe snapshot for ``edge-agent status`` and telemetry (see ``agent_status``)."""
        return status_snapshot(self)
