"""The agent: the ``InferenceService`` behind the local API (and the CLI).

Owns answering a request as a short sequence: gather the facts (which version is loaded, the
A/B split, the fallback policy), ask the ``Router`` for a route, follow it (run on the device
with ``ModelPipeline.run``, or call the cloud through ``CloudFallback``, asking the router again
after a local failure or a local answer), then account for the answer (shadow offer, capture
sample, counts by source, and a classifier's answer remembered for ground-truth feedback:
``edge_agent.serving.ground_truth``). It also builds the read-only ``AgentSnapshot`` that status and
metrics read.

Does not own: any routing decision (``edge_agent.serving.routing``), the per-model candidates
and policies (``edge_agent.serving.candidates``), which versions serve and the control work
behind ``tick`` (``edge_agent.serving.lifecycle``, whose operations it exposes), loading and
health checks (``Registry``), or the ``status()`` dict (``edge_agent.serving.status``).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent import __version__
from edge_agent.config import AgentConfig
from edge_agent.errors import (
    FallbackError,
    InferenceError,
    InputValidationError,
    ModelNotFoundError,
    ModelStoreError,
)
from edge_agent.serving.candidates import Candidates
from edge_agent.serving.capture import CaptureRing, label_indices
from edge_agent.serving.fallback import DEVICE, CloudFallback, FallbackPolicy, FallbackTransport
from edge_agent.serving.ground_truth import FeedbackResult, GroundTruth, predicted_classes
from edge_agent.serving.lifecycle import ModelLifecycle
from edge_agent.serving.pipeline import DriftWorker, PipelineResult
from edge_agent.serving.registry import Loaded, Registry
from edge_agent.serving.repository.control import ModelRepository
from edge_agent.serving.repository.index import IndexEntry
from edge_agent.serving.routing import (
    ANSWER_LOCALLY,
    CLOUD,
    LIVE_LOCAL,
    RAISE_LOCAL_ERROR,
    REFUSE,
    Facts,
    Route,
    Router,
)
from edge_agent.serving.service import (
    SOURCE_CLOUD,
    SOURCE_DEVICE,
    Array,
    InferenceRequest,
    InferenceResult,
)
from edge_agent.serving.status import (
    AgentSnapshot,
    not_ready,
    status_snapshot,
    transport_counts,
    why_not_serving,
)
from edge_agent.store import InstallResult, ModelStore


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
        self.router = Router(config.fallback.mode, cloud=self.cloud is not None)
        self.candidates = Candidates(config, self.registry, clock)
        self.lifecycle = ModelLifecycle(config, store, self.registry, self.candidates)
        # Load/unload and the version policy's extra versions (the repository extension).
        self.repository = ModelRepository(config, store, self.registry, self.lifecycle.revert_to)
        # Closed drift windows (key, version, window) since start, newest last; bounded.
        self.drift_windows = self.lifecycle.drift_windows
        self.counts: Counter[str] = Counter()
        # Answers per model name by source (device/cloud): the per-model fallback rate.
        self._sources: defaultdict[str, Counter[str]] = defaultdict(Counter)
        # Answers remembered for ground-truth feedback, and the confusion counts it brings.
        self.ground_truth = GroundTruth(
            config.api.feedback_requests, config.api.feedback_seconds, clock=clock
        )
        self.started_at = time.time()

    # ------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Load every installed model (self-rolling back failed ones) and set up routing, then
        the kept versions the version policy serves by number."""
        self.lifecycle.start()
        self.repository.refresh()

    def install(self, bundle: Path, *, force: bool = False) -> InstallResult:
        """Install and serve a bundle (see ``ModelLifecycle.install``).

        Raises:
            BundleFormatError, BundleVerificationError, ModelStoreError: nothing changed.
        """
        return self.lifecycle.install(bundle, force=force)

    def rollback(self, name: str, reason: str = "manual rollback") -> None:
        """Serve the previous good version of ``name``.

        Raises:
            ModelStoreError: no other good version.
        """
        self.lifecycle.rollback(name, reason)

    def revert_to(self, name: str, version: int, reason: str) -> None:
        """Serve the kept ``version`` of ``name`` again (the fleet server sent it back).

        Raises:
            ModelNotFoundError: ``version`` is not installed.
            ModelStoreError: ``version`` failed here before, or cannot be served.
        """
        self.lifecycle.revert_to(name, version, reason)

    def reload_changed(self) -> list[str]:
        """Pick up changes made by another process; the names now serving another version."""
        return self.lifecycle.reload_changed()

    def tick(self) -> None:
        """Periodic control work: probation verdicts, drift windows and the version policy's
        versions (not on the hot path)."""
        self.lifecycle.tick()
        self.repository.refresh()

    def close(self) -> None:
        """Stop the shadows, the drift worker and the capture ring; unload every model."""
        self.candidates.close()
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
        A model an operator unloaded does not count (the repository extension's meaning).
        """
        why = not_ready(self.store, self.registry)
        return {n: r for n, r in why.items() if not self.repository.unloaded(n)}

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
        if self.repository.unloaded(name):
            raise self._not_serving(name)
        if version is not None and version != str(entry.pipeline.version):
            # Only the versions the version policy serves (or a configured candidate).
            pinned = None
            if self.repository.serves(name, version):
                pinned = self.registry.get(f"{name}@{version}")
            if pinned is None:
                raise ModelNotFoundError(f"model {name!r} version {version} is not loaded")
            return pinned
        return entry

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        """v2 model metadata of ``name`` (``version``).

        Raises:
            ModelNotFoundError: no such model or version.
        """
        return self._entry(name, version).v2_metadata(name)

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
        if self.repository.unloaded(name):
            return ModelStoreError(f"model {name!r} is not ready: unloaded (load it to serve)")
        if name in self.store.names():
            why = why_not_serving(self.store, self.registry, name)
            return ModelStoreError(f"model {name!r} is not ready: {why}")
        return ModelNotFoundError(f"model {name!r} is not loaded")

    # ------------------------------------------------------------ model repository
    def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every installed model's kept versions and their state (``ModelRepository.index``)."""
        return self.repository.index(ready_only=ready_only)

    def load_model(self, name: str, version: int | None = None) -> None:
        """Serve ``name`` again (``version``: make that kept version active first).

        Raises:
            ModelNotFoundError, ModelStoreError: see ``ModelRepository.load``.
        """
        self.repository.load(name, version)

    def unload_model(self, name: str) -> None:
        """Stop serving ``name`` (``ModelRepository.unload``).

        Raises:
            ModelNotFoundError, ModelStoreError: see ``ModelRepository.unload``.
        """
        self.repository.unload(name)

    def infer(self, request: InferenceRequest) -> InferenceResult:
        """Route, run and account for one request: the ``Router`` decides every step.

        Raises:
            ModelNotFoundError, ModelStoreError: no such model or version, or it does not
                serve and the cloud may not answer instead.
            InputValidationError, InferenceError: the device refused or failed, and the
                route keeps the request on the device (or the cloud could not take it).
            FallbackError: the route needed the cloud and the cloud could not answer.
        """
        name = request.model
        entry = self.registry.get(name)
        if (
            entry is not None
            and request.version is None
            and self.router.local_only
            and self.candidates.ab(name) is None
            and not self.repository.unloaded(name)
        ):
            # The common case, where the router's answer is known without asking it: the
            # live version, no A/B split, and no cloud any route could reach (``first`` gives
            # ``LIVE_LOCAL``, a local failure is re-raised, a local answer is kept).
            return self._local(request, entry)
        if entry is not None and request.version is not None:
            entry = self._entry(name, request.version)
        ab = self.candidates.ab(name)
        candidate = None if ab is None else self.candidates.ab_candidate(name)
        if candidate is not None and self.repository.unloaded(candidate.key.partition("@")[0]):
            candidate = None
        policy = self.candidates.policy(name)
        facts = Facts(
            live=entry is not None,
            pinned=request.version is not None,
            candidate=candidate is not None,
            set_up=policy is not None,
            unloaded=self.repository.unloaded(name),
        )
        draw = None if ab is None else partial(ab.arm, request.routing_key)
        route = self.router.first(facts, draw)
        if route.arm == "candidate":
            entry = candidate
        return self._follow(request, route, entry, policy)

    def _follow(
        self,
        request: InferenceRequest,
        route: Route,
        entry: Loaded | None,
        policy: FallbackPolicy | None,
    ) -> InferenceResult:
        """Run ``route`` and the routes it leads to (see ``edge_agent.serving.routing``)."""
        cloud_failed: str | None = None
        if route.target == CLOUD:
            try:
                return self._cloud(request, entry, route)
            except FallbackError as exc:
                if route.if_cloud_fails != ANSWER_LOCALLY:
                    raise
                cloud_failed = str(exc)
        if route.target == REFUSE or entry is None:
            raise self._not_serving(request.model)
        try:
            result = self._run_local(entry, request)
        except (InputValidationError, InferenceError) as exc:
            invalid = isinstance(exc, InputValidationError)
            self.counts["rejected" if invalid else "errors"] += 1
            fallback = self.router.after_local_error(route, invalid_input=invalid)
            if fallback.target != CLOUD:
                raise
            try:
                return self._cloud(request, entry, fallback)
            except FallbackError:
                if fallback.if_cloud_fails == RAISE_LOCAL_ERROR:
                    raise exc from None  # the client learns why its input was refused
                raise
        params = self._device_params(entry, result, route.arm, cloud_failed)
        ood = self.config.fallback.ood_feature_fraction
        pipeline = entry.pipeline
        after = self.router.after_local_answer(
            route,
            cloud_failed=cloud_failed is not None,
            set_up=policy is not None,
            out_of_distribution=lambda: pipeline.out_of_distribution(result.validation.feeds, ood),
            hard=lambda: DEVICE if policy is None else policy.after(result.outputs),
        )
        if after.target == CLOUD:
            device = result.outputs if after.with_device_answer else None
            try:
                return self._cloud(request, entry, after, device)
            except FallbackError as exc:
                params["fallback_failed"] = str(exc)
                if after.out_of_distribution:
                    params["out_of_distribution"] = True
        return self._device_answer(request, entry, route, result, params)

    def _local(self, request: InferenceRequest, entry: Loaded) -> InferenceResult:
        """``_follow`` of ``LIVE_LOCAL`` under a router that never reaches the cloud (the fast
        path of ``infer``): run on ``entry``, re-raise a local failure after counting it, keep
        the answer."""
        try:
            result = self._run_local(entry, request)
        except InputValidationError:
            self.counts["rejected"] += 1
            raise
        except InferenceError:
            self.counts["errors"] += 1
            raise
        params = self._device_params(entry, result, "live", None)
        return self._device_answer(request, entry, LIVE_LOCAL, result, params)

    def _device_answer(
        self,
        request: InferenceRequest,
        entry: Loaded,
        route: Route,
        result: PipelineResult,
        params: dict[str, Any],
    ) -> InferenceResult:
        """The device's answer on ``route``: remembered for feedback, accounted, returned."""
        given = self._remember(request, entry, result)
        rid = request.request_id if isinstance(request.request_id, str) else given
        self._account(request.model, entry, route, result, rid)
        pipeline = entry.pipeline
        return InferenceResult(
            request.model,
            pipeline.version_text,
            result.outputs,
            SOURCE_DEVICE,
            params,
            request_id=given,
            batched=pipeline.batched,
        )

    def _remember(
        self, request: InferenceRequest, entry: Loaded, result: PipelineResult
    ) -> str | None:
        """Remember a classifier's answer for feedback; the id given to a request without one."""
        memory = self.ground_truth
        if not memory.enabled:
            return None
        outputs = entry.pipeline.manifest.outputs
        v = result.validation
        classes = predicted_classes(outputs, result.outputs, v.kept if v.dropped else None)
        if classes is None:
            return None
        rid = request.request_id if request.request_id is not None else memory.new_id()
        version = int(entry.pipeline.version)
        if not memory.remember(rid, request.model, version, outputs.labels, classes):
            return None
        return rid if request.request_id is None else None

    def feedback(
        self, name: str, version: str | None, request_id: Any, label: Any, *, rows: bool
    ) -> FeedbackResult:
        """Count the true answer of an earlier request of ``name`` (see ``GroundTruth``).

        Raises:
            ModelNotFoundError: ``name`` is not installed, or ``version`` is not a version.
            UnknownRequestError: the request's answer is not (or no longer) remembered.
            InputValidationError: a malformed id or a label that names no class.
        """
        if self.registry.get(name) is None and name not in self.store.names():
            raise ModelNotFoundError(f"model {name!r} is not installed")
        if version is not None and not (version.isascii() and version.isdigit()):
            raise ModelNotFoundError(f"model {name!r} has no version {version!r}")
        pinned = None if version is None else int(version)
        result = self.ground_truth.feedback(name, request_id, label, rows=rows, version=pinned)
        loaded = self.registry.get(name)
        if self.capture is not None and loaded is not None:
            classes = label_indices(label, rows, loaded.pipeline.manifest.outputs.labels)
            if classes is not None:
                self.capture.label(name, request_id, classes)
        return result

    def _device_params(
        self, entry: Loaded, result: PipelineResult, arm: str, cloud_failed: str | None
    ) -> dict[str, Any]:
        """The response parameters of an answer from the device."""
        params: dict[str, Any] = {
            "model_version": entry.pipeline.version_text,
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
        return params

    def _account(
        self,
        name: str,
        entry: Loaded,
        route: Route,
        result: PipelineResult,
        request_id: str | None = None,
    ) -> None:
        """A device answer: offer it to the shadow and capture, count it."""
        shadow = self.candidates.shadow(name)
        if shadow is not None and self.router.offers_shadow(
            route, answered_by_active=entry.key == name
        ):
            shadow.offer(result.model_inputs, result.outputs, result.latency_s)
        if self.capture is not None:
            self.capture.offer(
                name, entry.pipeline.version, result.validation.feeds, result.outputs, request_id
            )
        self.counts["device"] += 1
        self._sources[name]["device"] += 1

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

    def _cloud(
        self,
        request: InferenceRequest,
        entry: Loaded | None,
        route: Route,
        device_outputs: Mapping[str, Array] | None = None,
    ) -> InferenceResult:
        assert self.cloud is not None  # the router sends nothing to a cloud that is not there
        reason = route.reason or "policy"
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
                "ab_arm": route.arm,
            },
        )

    # -------------------------------------------------------------------------- reporting
    def snapshot(self) -> AgentSnapshot:
        """A read-only view of this agent for status and metrics (counters copied now)."""
        return AgentSnapshot(
            store=self.store,
            registry=self.registry,
            started_at=self.started_at,
            counts=dict(self.counts),
            transport_counts=transport_counts(self._transport),
            sources={name: dict(c) for name, c in list(self._sources.items())},
            shadow=self.candidates.shadow_stats(),
            ab=self.candidates.ab_counts(),
            drift_blocks_dropped=self.worker.dropped if self.worker else 0,
            fallback=self.cloud.stats() if self.cloud else None,
        )

    def status(self) -> dict[str, Any]:
        """A JSON-safe snapshot for ``edge-agent status`` and telemetry (see ``status``); a
        model with feedback also has its ``ground_truth`` (``GroundTruth.status``)."""
        out = status_snapshot(self.snapshot())
        models = out.get("models")
        for name, truth in self.ground_truth.status().items():
            if isinstance(models, dict) and isinstance(models.get(name), dict):
                models[name]["ground_truth"] = truth
        return out
