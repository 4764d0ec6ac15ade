"""The hot path of one loaded model version: validate, preprocess, run, sketch, count.

Owns: the per-request sequence and its cost. Drift rows are copied into preallocated per-tensor
buffers and the sketches are updated in vectorised blocks (``BLOCK`` rows) rather than per
request; counters and a bounded latency reservoir feed probation, telemetry and metrics.
Routing (A/B, shadow, cloud fallback) happens one level up, in ``edge_agent.serving.agent``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.common.ratelimit import TokenBucket
from edge_agent.config import DriftConfig, ModelPolicy
from edge_agent.contract import BundleManifest
from edge_agent.contract.validation import ROW_REASONS, ValidationResult, Validator
from edge_agent.drift import DriftMonitor, KllFeatureSketches
from edge_agent.drift.monitor import DriftWindow, MonitorPolicy
from edge_agent.errors import InferenceError, InputValidationError
from edge_agent.runtime.base import Runtime
from edge_agent.runtime.batching import BatchingRuntime
from edge_agent.serving.probation import ProbationStats
from edge_agent.wire.telemetry import LATENCY_FINE_BUCKETS_MS, coarse_from_fine

Array = npt.NDArray[Any]
log = logging.getLogger("edge_agent.serving.pipeline")
BLOCK = 256
_LATENCY_SAMPLES = 2048  # a power of two: the ring index is a mask
_LATENCY_MASK = _LATENCY_SAMPLES - 1
# Upper edges of the fine telemetry latency buckets, in seconds (bucket i: edge[i-1] < s <=
# edge[i]); the coarse histogram is derived from it, so the two always agree.
_BUCKET_EDGES_S = tuple(ms / 1000.0 for ms in LATENCY_FINE_BUCKETS_MS)


class PipelineResult:
    """What one run produced (a slotted class: one is built per request)."""

    __slots__ = ("latency_s", "model_inputs", "outputs", "validation")

    def __init__(
        self,
        outputs: dict[str, Array],
        validation: ValidationResult,
        latency_s: float,
        model_inputs: dict[str, Array],
    ) -> None:
        self.model_inputs = model_inputs  # after preprocessing: what the runtime was fed
        self.outputs = outputs
        self.validation = validation
        self.latency_s = latency_s


class _RowBuffer:
    """A preallocated (BLOCK, features) buffer; full blocks go to the drift monitor."""

    __slots__ = ("buf", "fill", "name", "width")

    def __init__(self, name: str, features: int) -> None:
        self.name = name
        self.buf = np.empty((BLOCK, features), dtype=np.float64)
        self.fill = 0
        self.width = features

    def add(self, rows: Array, flush: Callable[[str, Array], bool]) -> None:
        """Copy ``rows`` in; each full block goes to ``flush``, which says whether it kept it
        (a block it did not keep, sampled out, is filled again: no new block is allocated)."""
        n = rows.shape[0]
        if n == 1 and self.fill < BLOCK - 1:  # the batch-1 hot path: one row copy
            self.buf[self.fill] = rows[0]
            self.fill += 1
            return
        start = 0
        while start < n:
            take = min(BLOCK - self.fill, n - start)
            self.buf[self.fill : self.fill + take] = rows[start : start + take]
            self.fill += take
            start += take
            if self.fill == BLOCK:
                self.fill = 0
                if flush(self.name, self.buf):
                    self.buf = np.empty_like(self.buf)


class DriftWorker:
    """Sketches full drift blocks off the request path, on one background thread.

    The queue is bounded: when sketching cannot keep up, blocks are dropped and counted
    (``dropped``), which samples the drift statistics instead of slowing inference.
    """

    def __init__(self, queue_blocks: int = 256) -> None:
        self._queue: queue.Queue[tuple[ModelPipeline, str, Array] | None] = queue.Queue(
            queue_blocks
        )
        self.dropped = 0
        self.processed = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._loop, name="drift-worker", daemon=True)
        self._thread.start()

    def submit(self, pipeline: ModelPipeline, name: str, block: Array) -> None:
        try:
            self._queue.put_nowait((pipeline, name, block))
        except queue.Full:
            self.dropped += 1

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                pipeline, name, block = item
                try:
                    pipeline.observe_block(name, block)
                    self.processed += 1
                except Exception:  # a bad block must not kill drift for every model
                    self.failed += 1
                    log.exception("drift sketching failed for %s", name)
            finally:
                self._queue.task_done()

    def drain(self) -> None:
        """Block until every queued block is sketched (tests, shutdown)."""
        self._queue.join()

    def close(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)


class ModelPipeline:
    """One model version, ready to serve. ``run`` is thread-safe."""

    def __init__(
        self,
        manifest: BundleManifest,
        runtime: Runtime,
        policy: ModelPolicy,
        drift: DriftConfig,
        clock: Callable[[], float] = time.monotonic,
        worker: DriftWorker | None = None,
    ) -> None:
        """Compile the validator and set up drift tracking.

        Args:
            worker: sketches full blocks in the background; ``None`` sketches inline.
        """
        self.manifest = manifest
        self.runtime = runtime
        self.policy = policy
        self.validator = Validator(manifest.inputs, policy.validation)
        self._clock = clock
        dtypes = {i.name: i.dtype for i in runtime.inputs}
        self._pre = [
            (t.name, t.preprocessing.compile(dtypes.get(t.name, t.dtype)))
            for t in manifest.inputs.tensors
        ]
        self._pre_one = self._pre[0] if len(self._pre) == 1 else None
        # The tensors drift follows (name, is an output), looked up once rather than per request.
        self._drift_tensors = tuple(
            [(n, False) for n in manifest.baseline.inputs]
            + [(n, True) for n in manifest.baseline.outputs]
        )
        # Sketching costs ~1-2 us per row: above this rate blocks are sampled, not all sketched,
        # so monitoring never takes more than a bounded share of the CPU (max_rows_per_second on
        # average, bursts up to one second's worth).
        rows_per_second = drift.max_rows_per_second
        self._sketch_budget = TokenBucket(rows_per_second, rows_per_second, clock())
        self.sketch_sampled_out = 0
        self.sketch_failures = 0
        self.last_drift_alert = False
        # Tier B (optional): KLL sketches for tensors whose baseline carries them.
        self.kll: dict[str, KllFeatureSketches] = {}
        if drift.kll:
            for name in (*manifest.baseline.inputs, *manifest.baseline.outputs):
                base = manifest.baseline.kll_sketches(name)
                if base is not None:
                    self.kll[name] = KllFeatureSketches(base.n_features, base.k)
        # Per input, the range each (baseline-reduced) feature took in the baseline.
        self._baseline_range = {
            name: (
                np.array([e[0] for e in view.edges.edges]),
                np.array([e[-1] for e in view.edges.edges]),
            )
            for name, view in manifest.baseline.inputs.items()
        }
        self.monitor = DriftMonitor(
            manifest.baseline,
            MonitorPolicy(
                max_values=drift.window_values,
                max_seconds=drift.window_seconds,
                min_values=min(100, drift.window_values),
                alpha=drift.alpha,
                windows_per_hour=drift.windows_per_hour,
                window_burst=drift.window_burst,
            ),
        )
        self._buffers: dict[str, _RowBuffer] = {}
        self._lock = threading.Lock()
        self._drift_lock = threading.Lock()
        self._worker = worker
        self.windows: list[DriftWindow] = []  # closed windows not yet collected by the agent
        self.loaded_at = clock()
        self.requests = 0
        self.rows = 0
        # Cumulative request counts per fine telemetry latency bucket (LATENCY_FINE_BUCKETS_MS).
        self._lat_buckets = [0] * (len(_BUCKET_EDGES_S) + 1)
        self.errors = 0
        self.rejects = 0
        self.rejects_by_reason: dict[str, int] = {}
        self.client_errors = 0
        self._inflight = 0
        self._closing = False
        self.dropped_rows_by_reason: dict[str, int] = {}
        self._lat = [0.0] * _LATENCY_SAMPLES
        self._lat_n = 0
        self._version_text = str(manifest.version)
        # Whether concurrent requests run as one batch (``edge_agent.runtime.batching``).
        self.batched = isinstance(runtime, BatchingRuntime)

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def version_text(self) -> str:
        """The version as the protocol writes it (``"3"``), built once."""
        return self._version_text

    def run(self, inputs: Mapping[str, Any], payload_bytes: int | None = None) -> PipelineResult:
        """Validate and run one request.

        One method on purpose (the hot path): validation, preprocessing and the run, then,
        under the lock that also ends the request, the success accounting (``_account``'s
        counts, the latency ring and histogram, the drift rows).

        Raises:
            InputValidationError: the request does not fit the contract (counted).
            InferenceError: the runtime failed (counted), or this version was unloaded.
        """
        lock = self._lock
        with lock:
            if self._closing:
                raise InferenceError(f"{self.manifest.name} v{self.version} was unloaded")
            self._inflight += 1
        result: PipelineResult | None = None
        try:
            clock = self._clock
            start = clock()
            try:
                checked = self.validator.validate(inputs, payload_bytes)
            except InputValidationError as exc:
                self._count_reject(exc.reason)
                raise
            one = self._pre_one
            if one is not None:
                feeds = {one[0]: one[1](checked.feeds[one[0]])}
            else:
                feeds = {name: fn(checked.feeds[name]) for name, fn in self._pre}
            try:
                outputs = self.runtime.run(feeds)
            except InferenceError:
                with lock:
                    self.requests += 1
                    self.errors += 1
                raise
            result = PipelineResult(outputs, checked, clock() - start, feeds)
            return result
        finally:
            # One lock for the accounting of a success and the end of the request.
            with lock:
                self._inflight -= 1
                if result is not None:
                    self._account(result)
                last = self._closing and self._inflight == 0
            if last:
                self.runtime.close()

    def _count_reject(self, reason: str) -> None:
        with self._lock:
            self.rejects_by_reason[reason] = self.rejects_by_reason.get(reason, 0) + 1
            # Only row problems say something about this version's contract; a client
            # sending the wrong names or shapes must not fail a healthy model's probation.
            if reason in ROW_REASONS:
                self.requests += 1
                self.rejects += 1
            else:
                self.client_errors += 1

    def _account(self, result: PipelineResult) -> None:
        """Count a success, record its latency, buffer its rows for drift (``_lock`` held)."""
        checked = result.validation
        self.requests += 1
        self.rows += checked.rows_kept
        if checked.rejected:
            for reason, count in checked.rejected.items():
                self.dropped_rows_by_reason[reason] = (
                    self.dropped_rows_by_reason.get(reason, 0) + count
                )
        latency = result.latency_s
        n = self._lat_n
        self._lat[n & _LATENCY_MASK] = latency
        self._lat_n = n + 1
        self._lat_buckets[bisect_left(_BUCKET_EDGES_S, latency)] += 1
        self._sketch(checked.feeds, result.outputs)

    def preprocess(self, raw: Mapping[str, Array]) -> dict[str, Array]:
        """Validated raw inputs -> model inputs, through the declared preprocessing."""
        one = self._pre_one
        if one is not None:
            return {one[0]: one[1](raw[one[0]])}
        return {name: fn(raw[name]) for name, fn in self._pre}

    def _sketch(self, raw: Mapping[str, Array], outputs: Mapping[str, Array]) -> None:
        buffers = self._buffers
        for name, from_outputs in self._drift_tensors:
            x = (outputs if from_outputs else raw).get(name)
            if x is None:
                continue
            buf = buffers.get(name)
            shape = x.shape
            # Batch 1 of (1, features) with room in the block: one row copy, inline.
            if buf is not None and len(shape) == 2 and shape[0] == 1 and shape[1] == buf.width:
                fill = buf.fill
                if fill < BLOCK - 1:
                    buf.buf[fill : fill + 1] = x  # no row view of ``x`` to build
                    buf.fill = fill + 1
                    continue
            self._buffer_rows(name, x)

    def _buffer_rows(self, name: str, x: Array) -> None:
        buf = self._buffers.get(name)
        if buf is None:
            features = self.manifest.baseline.features(x[:1]).shape[1]
            buf = self._buffers[name] = _RowBuffer(name, features)
        shape = x.shape
        if len(shape) == 2 and shape[1] == buf.width:
            flat = x  # already (rows, features): the common case, no reshape
        else:
            flat = x.reshape(shape[0], -1)
            if flat.shape[1] != buf.width:
                flat = self.manifest.baseline.features(x)  # reduced features: the same rule
        buf.add(flat, self._flush)

    def _flush(self, name: str, block: Array) -> bool:
        """Sketch (or queue) a full block; False when the budget sampled it out (not kept)."""
        if self._sketch_budget.take(self._clock(), block.shape[0]) > 0:
            self.sketch_sampled_out += block.shape[0]
            return False
        if self._worker is None:
            try:
                self.observe_block(name, block)
            except Exception:  # monitoring must never fail a request already answered
                self.sketch_failures += 1
                log.exception("drift sketching failed for %s", name)
        else:
            self._worker.submit(self, name, block)
        return True

    def observe_block(self, name: str, block: Array) -> None:
        """Sketch one full block (called by the drift worker, or inline)."""
        with self._drift_lock:
            closed = self.monitor.observe(name, block, self._clock())
            self._note_windows(closed)
            sketch = self.kll.get(name)
            if sketch is not None:
                sketch.update(block)

    def _note_windows(self, closed: tuple[DriftWindow, ...]) -> None:
        if closed:
            self.windows.extend(closed)
            self.last_drift_alert = any(w.verdict.alert for w in closed)

    def kll_summary(self, ranks: tuple[float, ...] = (0.5, 0.99)) -> dict[str, Any]:
        """Live tier-B quantiles per tensor and feature next to the baseline's."""
        out: dict[str, Any] = {}
        with self._drift_lock:
            for name, sketch in self.kll.items():
                if not int(sketch.n().max(initial=0)):
                    continue
                base = self.manifest.baseline.kll_sketches(name)
                out[name] = {
                    "ranks": list(ranks),
                    "rows": int(sketch.n().max()),
                    "live": sketch.quantiles(ranks).tolist(),
                    "baseline": base.quantiles(ranks).tolist() if base else None,
                }
        return out

    def out_of_distribution(self, raw: Mapping[str, Array], feature_fraction: float) -> bool:
        """Whether any row has more than ``feature_fraction`` of its features outside the range
        the baseline saw (a cheap per-request OOD test used by the cloud-fallback policy)."""
        for name, (lo, hi) in self._baseline_range.items():
            x = raw.get(name)
            if x is None:
                continue
            flat = x.reshape(x.shape[0], -1)
            if flat.shape[1] != lo.shape[0]:
                flat = self.manifest.baseline.features(x)
            with np.errstate(invalid="ignore"):
                outside = ((flat < lo) | (flat > hi)).mean(axis=1)
            if bool((outside > feature_fraction).any()):
                return True
        return False

    def collect_windows(self) -> list[DriftWindow]:
        """Closed drift windows since the last call (also closes windows due by time)."""
        with self._drift_lock:
            self._note_windows(self.monitor.tick(self._clock()))
            out, self.windows = self.windows, []
        return out

    def probation_stats(self) -> ProbationStats:
        with self._lock:
            n = min(self._lat_n, _LATENCY_SAMPLES)
            p99 = float(np.percentile(self._lat[:n], 99)) * 1000 if n else 0.0
            return ProbationStats(
                self.requests, self.errors, self.rejects, p99, self._clock() - self.loaded_at
            )

    def latency_histogram(self) -> list[int]:
        """Successful requests per coarse telemetry latency bucket since load (cumulative)."""
        with self._lock:
            return list(coarse_from_fine(self._lat_buckets))

    def latency_histogram_fine(self) -> list[int]:
        """Successful requests per fine telemetry latency bucket since load (cumulative)."""
        with self._lock:
            return list(self._lat_buckets)

    def latency_quantiles(self) -> dict[str, float]:
        with self._lock:
            n = min(self._lat_n, _LATENCY_SAMPLES)
            if not n:
                return {}
            q = np.percentile(self._lat[:n], [50, 90, 99]) * 1000
        return {"p50_ms": float(q[0]), "p90_ms": float(q[1]), "p99_ms": float(q[2])}

    def close(self) -> None:
        """Release the runtime once the requests still running on it are done."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            idle = self._inflight == 0
        if idle:
            self.runtime.close()
