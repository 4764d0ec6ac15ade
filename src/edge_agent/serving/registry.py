"""Loaded models: verified load from the store, memory admission, golden check, self-rollback.

Owns: turning an installed version into a serving ``ModelPipeline`` (re-verify the bundle, load
the runtime, run the golden samples), refusing a load that would exceed the memory budget,
and falling back by itself to the last good version when a new one fails its health check,
recording why in the store; when nothing can serve a model it is marked down in the store with
the cause, which is logged once per process (not on every reload). Thread-safe: the agent's
request threads read the table while the control thread swaps entries.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_agent.config import AgentConfig
from edge_agent.errors import (
    AdmissionError,
    EdgefleetError,
    ModelStoreError,
    RuntimeAdapterError,
)
from edge_agent.runtime.batching import with_batching
from edge_agent.runtime.golden import check_golden
from edge_agent.runtime.loader import load_runtime
from edge_agent.serving.pipeline import DriftWorker, ModelPipeline
from edge_agent.store import ModelStore

log = logging.getLogger("edge_agent.serving.registry")

# A loaded onnxruntime/LiteRT session holds the weights plus arenas and kernels' packed copies:
# admission assumes 3x the artifact plus a fixed 8 MiB until the load has been measured.
_ESTIMATE_FACTOR = 3
_ESTIMATE_FIXED = 8 * 1024 * 1024


def private_bytes() -> int:
    """Resident memory of this process that is not file-backed or shared (Linux
    ``/proc/self/statm``: resident minus shared); 0 elsewhere.

    A model's load is measured with this, not the whole RSS: library code paged back in by the
    load (the daemon pages out its start-up library pages, ``edge_agent.common.residency``) is
    file-backed and would otherwise be counted as the model's memory.
    """
    try:
        with open("/proc/self/statm", "rb") as fh:  # noqa: PTH123 - hot enough to skip pathlib
            fields = fh.read().split()
            return max(int(fields[1]) - int(fields[2]), 0) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class Loaded:
    """A serving model version and what it costs."""

    key: str  # "name" for the active version, "name@version" for a pinned candidate
    pipeline: ModelPipeline
    memory_bytes: int
    on_probation: bool

    def v2_metadata(self, name: str) -> dict[str, Any]:
        """The v2 model metadata of this version, served as ``name``."""
        m = self.pipeline.manifest
        rt = self.pipeline.runtime
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
                "probation": self.on_probation,
            },
        }


class Registry:
    """The table of loaded models."""

    def __init__(
        self,
        config: AgentConfig,
        store: ModelStore,
        *,
        clock: Callable[[], float] = time.monotonic,
        worker: DriftWorker | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self._clock = clock
        self._worker = worker
        self._lock = threading.Lock()
        self._loaded: dict[str, Loaded] = {}
        self.events: list[dict[str, object]] = []
        # Called with every event as it happens (the sync layer queues it for telemetry);
        # must be quick and must not raise.
        self.event_sink: Callable[[dict[str, object]], None] | None = None
        self.rollbacks = 0
        # An agent release on trial (edge_agent.selfupdate) makes no lasting decision about
        # models: a load that fails on it is its own fault until it is confirmed, so it marks
        # the model down (cleared by the next good load) instead of rolling it back.
        self.on_trial = False
        # (name, version, reason) already logged as down: a cause is logged once per process.
        self._down_logged: set[tuple[str, int, str]] = set()

    # --------------------------------------------------------------------------- reading
    def get(self, key: str) -> Loaded | None:
        return self._loaded.get(key)

    def loaded_keys(self) -> list[str]:
        with self._lock:
            return sorted(self._loaded)

    def memory_used(self) -> int:
        with self._lock:
            return sum(x.memory_bytes for x in self._loaded.values())

    # --------------------------------------------------------------------------- loading
    def activate(self, name: str) -> Loaded | None:
        """Load the active version of ``name``; on a failed health check roll back and retry.

        Never gives up a version that is serving: when the new one fails and no *good*
        version is kept, the version that was serving is made active again (the new one is
        marked failed) and keeps serving.

        Returns:
            The loaded entry, or None when no version of ``name`` can serve (recorded).
        """
        serving = self._loaded.get(name)
        for _ in range(self.config.store.keep_versions + 2):
            try:
                state = self.store.state(name)
                if state.active is None:
                    return serving
                if serving is not None and serving.pipeline.version == state.active:
                    return serving  # already serving exactly this version
                record = state.active_record
                entry = self._load(
                    name,
                    state.active,
                    on_probation=record is not None and record.status == "probation",
                )
            except AdmissionError as exc:
                self.record_event(name, None, "admission_refused", str(exc))
                active = self._active_or_none(name)
                if active is None:
                    log.error("%s not loaded: %s", name, exc)
                    return serving
                keep = "" if serving is None else f"; v{serving.pipeline.version} keeps serving"
                self._mark_down(name, active, f"{type(exc).__name__}: {exc}{keep}")
                return serving
            except EdgefleetError as exc:  # verification, runtime, golden, corrupt state
                reason = f"{type(exc).__name__}: {exc}"
                active = self._active_or_none(name)
                self.record_event(name, active, "load_failed", reason)
                if self._fall_back(name, reason):
                    continue
                if serving is None and active is not None:
                    self._mark_down(name, active, reason)
                elif (
                    serving is not None
                    and active is not None
                    and serving.pipeline.version != active
                ):
                    try:
                        self.store.fail_to(
                            name, serving.pipeline.version, reason, from_version=active
                        )
                        self.rollbacks += 1
                        log.warning("%s stays on v%d: %s", name, serving.pipeline.version, reason)
                    except EdgefleetError as store_exc:
                        log.error("%s: cannot record the failed update: %s", name, store_exc)
                return serving
            self._swap(name, entry)
            try:
                self.store.clear_down(name, entry.pipeline.version)
            except EdgefleetError as exc:
                log.error("%s: cannot record that it serves again: %s", name, exc)
            return entry
        return serving

    def _mark_down(self, name: str, version: int, reason: str) -> None:
        """The active ``version`` cannot serve and nothing replaces it (an older version may
        still be serving from memory): persist why (store state) and log it once per cause."""
        try:
            self.store.mark_down(name, version, reason)
        except EdgefleetError as exc:
            log.error("%s: cannot record why it is down: %s", name, exc)
        if (name, version, reason) not in self._down_logged:
            self._down_logged.add((name, version, reason))
            log.error(
                "%s v%d not served: %s (nothing else can take its place; recorded, and tried "
                "again when another version becomes active, the root rotates, or at restart)",
                name,
                version,
                reason,
            )

    def _active_or_none(self, name: str) -> int | None:
        try:
            return self.store.state(name).active
        except EdgefleetError:
            return None

    def load_pinned(self, name: str, version: int) -> Loaded:
        """Load a specific installed version under ``name@version`` (shadow / A-B candidates).

        Raises:
            ModelNotFoundError, AdmissionError, BundleVerificationError, RuntimeAdapterError.
        """
        entry = self._load(name, version, on_probation=False, key=f"{name}@{version}")
        self._swap(entry.key, entry)
        return entry

    def load_detached(self, name: str, version: int) -> Loaded:
        """Load an installed (or staged) version outside the table: a rollout's shadow.

        Health-checked like any load (golden samples), but never registered, so no request
        can reach it by name or version; the caller closes ``entry.pipeline`` when done.

        Raises:
            ModelNotFoundError, AdmissionError, BundleVerificationError, RuntimeAdapterError.
        """
        return self._load(name, version, on_probation=False, key=f"{name}@{version}#shadow")

    def _load(
        self, name: str, version: int, *, on_probation: bool, key: str | None = None
    ) -> Loaded:
        bundle = self.store.load(name, version)
        estimate = bundle.manifest.artifact.length * _ESTIMATE_FACTOR + _ESTIMATE_FIXED
        replaced = self._loaded.get(key or name)
        in_use = self.memory_used() - (replaced.memory_bytes if replaced else 0)
        budget = self.config.store.memory_budget_mb * 1024 * 1024
        if in_use + estimate > budget:
            raise AdmissionError(
                f"loading {name} v{version} needs ~{estimate >> 20} MiB; {in_use >> 20} of "
                f"{budget >> 20} MiB already in use"
            )
        before = private_bytes()
        runtime = load_runtime(
            bundle.artifact, bundle.manifest.artifact.format, self.config.runtime.options()
        )
        measured = max(private_bytes() - before, 0)
        golden = check_golden(bundle.manifest, runtime)
        if not golden.ok:
            runtime.close()
            raise RuntimeAdapterError(
                f"golden samples failed ({golden.total - golden.passed}/{golden.total}): "
                + "; ".join(golden.failures[:3])
            )
        policy = self.config.policy(name)
        runtime, batching = with_batching(
            runtime,
            policy.batching,
            max_rows=policy.batch_max_rows,
            max_delay_s=policy.batch_max_delay_ms / 1000,
        )
        pipeline = ModelPipeline(
            bundle.manifest,
            runtime,
            policy,
            self.config.drift,
            clock=self._clock,
            worker=self._worker,
        )
        log.info(
            "loaded %s v%d (%d golden samples ok, ~%d KiB, %s)",
            name,
            version,
            golden.total,
            max(measured, bundle.manifest.artifact.length) >> 10,
            batching,
        )
        return Loaded(
            key or name, pipeline, max(measured, bundle.manifest.artifact.length), on_probation
        )

    def _swap(self, key: str, entry: Loaded) -> None:
        with self._lock:
            old = self._loaded.get(key)
            self._loaded[key] = entry
        if old is not None and old.pipeline is not entry.pipeline:
            old.pipeline.close()

    def unload(self, key: str) -> None:
        with self._lock:
            old = self._loaded.pop(key, None)
        if old is not None:
            old.pipeline.close()

    # -------------------------------------------------------------------------- rollback
    def rollback(
        self, name: str, reason: str, *, failed: bool = True, from_version: int | None = None
    ) -> None:
        """Roll ``name`` back in the store (the caller then activates the new active version).

        Raises:
            ModelStoreError: no other good version, or ``from_version`` is no longer active.
        """
        state = self.store.rollback(name, reason, failed=failed, from_version=from_version)
        self.rollbacks += 1
        self.record_event(name, state.active, "rollback", reason)

    def revert_to(self, name: str, version: int, reason: str) -> None:
        """Switch ``name`` back to the kept ``version`` in the store (caller activates it).

        Raises:
            ModelNotFoundError, ModelStoreError: see ``ModelStore.revert_to``.
        """
        self.store.revert_to(name, version, reason)
        self.rollbacks += 1
        self.record_event(name, version, "rollback", reason)

    def _fall_back(self, name: str, reason: str) -> bool:
        if self.on_trial:
            log.warning("%s not rolled back: this agent release is on trial (%s)", name, reason)
            return False
        try:
            self.store.rollback(name, reason)
        except EdgefleetError as exc:  # the caller says what happens instead (once)
            log.debug("%s: cannot roll back to a good version: %s", name, exc)
            return False
        self.rollbacks += 1
        log.warning("%s rolled back by itself: %s", name, reason)
        return True

    def mark_good(self, name: str) -> None:
        """Probation passed for the serving version (ignored if the store moved on).

        Raises:
            ModelStoreError: the store cannot be written.
        """
        entry = self._loaded.get(name)
        if entry is None:
            return
        try:
            self.store.mark_good(name, entry.pipeline.version)
        except ModelStoreError as exc:
            log.info("%s: probation verdict not recorded: %s", name, exc)
            return
        entry.on_probation = False
        self.record_event(name, entry.pipeline.version, "probation_passed", "")

    def record_event(self, name: str, version: int | None, kind: str, detail: str) -> None:
        """Keep an event about ``name`` (the last 200) and hand it to ``event_sink``."""
        event: dict[str, object] = {
            "model": name,
            "version": version,
            "event": kind,
            "detail": detail,
            "at": time.time(),
        }
        self.events.append(event)
        del self.events[:-200]
        if self.event_sink is not None:
            self.event_sink(event)

    def close(self) -> None:
        for key in list(self._loaded):
            self.unload(key)
