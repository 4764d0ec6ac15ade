"""Adaptive batching: concurrent requests for one model run as one batch (``[models.<name>]
batching``).

``BatchingRuntime`` wraps a loaded ``Runtime`` and is one itself, so the pipeline above it
(validation, preprocessing, drift, metrics, per request) does not change. Requests whose inputs
share a signature (names, dtypes, every dimension but the first) queue; whoever finds the model
idle leads: it takes the queue's compatible requests in arrival order up to ``max_rows`` rows,
concatenates them along the first dimension, runs the model once and hands every request its
rows of each output. No thread is added and nothing waits at low load: a request that finds the
model idle and the queue empty runs at once, alone. Batches form from the requests that arrive
while a batch runs; ``max_delay_s`` (the latency budget) lets a leader wait that long for more
rows, and only when the previous batch held several requests, so a lone client never waits.

A batch that fails runs its requests again one by one, so one request's failure is never
another's. A model whose outputs do not keep the batch dimension (the first output dimension is
not the rows) is found out on its first batch: that batch is rerun one by one and the wrapper
stops batching for good (``disabled``), logged once.

``batch_gain`` measures, when a model loads with ``batching = "auto"``, whether batching pays:
the cost of one row alone against one row of a batch of 64, on zeros (``decide`` turns the two
timings into the decision; the agent logs both).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from edge_agent.errors import InferenceError
from edge_agent.runtime.base import Runtime, Tensor, TensorInfo

__all__ = [
    "MIN_SAVING_S",
    "PROBE_ROWS",
    "BatchGain",
    "BatchStats",
    "BatchingRuntime",
    "batch_gain",
    "batchable",
    "decide",
    "with_batching",
]

log = logging.getLogger(__name__)

#: ``auto`` turns batching on only when a row in a batch of this many costs at most half as
#: much as a row alone, and saves at least ``MIN_SAVING_S`` per row: below that, the queueing
#: and the copies cost more than they save (a tiny model runs a row in microseconds).
PROBE_ROWS: Final = 64
MAX_ROW_COST_RATIO: Final = 0.5
MIN_SAVING_S: Final = 50e-6
#: Batch sizes are counted in these buckets (rows per batch), for the metrics.
BATCH_ROW_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

_Signature = tuple[tuple[str, str, tuple[int, ...]], ...]


@dataclass
class _Request:
    feeds: Mapping[str, Tensor]
    rows: int
    signature: _Signature
    outputs: dict[str, Tensor] | None = None
    error: InferenceError | None = None
    done: bool = False
    # Set once the request is answered, or made the leader: each waiting thread is woken
    # for its own reason only (no thundering herd of every waiter at every batch).
    wake: threading.Event = field(default_factory=threading.Event)


@dataclass
class BatchStats:
    """What the batcher did: batches run, requests and rows in them, batch sizes."""

    batches: int = 0
    requests: int = 0
    rows: int = 0
    # requests that ran alone because they were too large to share a batch, or their rows
    # could not be told (inputs of different lengths)
    alone: int = 0
    reruns: int = 0  # batches that failed and ran again one request at a time
    rows_buckets: list[int] = field(default_factory=lambda: [0] * (len(BATCH_ROW_BUCKETS) + 1))


def batchable(inputs: tuple[TensorInfo, ...]) -> str | None:
    """Why a model's inputs cannot be batched on their first dimension (None: they can)."""
    if not inputs:
        return "the model has no inputs"
    for t in inputs:
        if not t.shape:
            return f"input {t.name!r} is a scalar"
        if isinstance(t.shape[0], int) and t.shape[0] > 0:
            return f"input {t.name!r} has a fixed first dimension ({t.shape[0]})"
    return None


class BatchingRuntime:
    """A ``Runtime`` that runs concurrent requests as one batch (see the module docstring)."""

    def __init__(
        self,
        inner: Runtime,
        *,
        max_rows: int = 64,
        max_delay_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Wrap ``inner``.

        Raises:
            ValueError: ``max_rows`` < 2 or ``max_delay_s`` < 0.
        """
        if max_rows < 2:
            raise ValueError("max_rows must be >= 2")
        if max_delay_s < 0:
            raise ValueError("max_delay_s must be >= 0")
        self.inner = inner
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Request] = deque()
        self._busy = False
        self._last_batch_requests = 1
        self.disabled: str | None = None
        self.stats = BatchStats()

    # ------------------------------------------------------------------ Runtime protocol
    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def version(self) -> str:
        return self.inner.version

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        return self.inner.inputs

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return self.inner.outputs

    def close(self) -> None:
        self.inner.close()

    def run(self, feeds: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Run ``feeds``, batched with concurrent requests when they fit.

        Raises:
            InferenceError: the runtime failed on these feeds.
        """
        rows = _rows(feeds)
        if rows is None or rows >= self.max_rows or self.disabled is not None:
            with self._cond:
                self.stats.alone += 1
            return self.inner.run(feeds)
        request = _Request(feeds, rows, _signature(feeds))
        with self._cond:
            self._queue.append(request)
            if self._busy:
                self._cond.notify()  # a leader waiting for rows (only a leader waits on it)
                lead = False
            else:
                self._busy = lead = True
        if not lead:
            request.wake.wait()  # answered, or handed the lead
        while not request.done:
            # This thread leads: nobody else runs a batch, so nobody else sets ``wake`` now.
            request.wake.clear()
            with self._cond:
                batch = self._gather()
            try:
                self._execute(batch)
            except Exception as exc:  # a bug or no memory: nobody in the batch is left waiting
                log.exception("batched run failed")
                for r in batch:
                    if not r.done:
                        r.error = InferenceError(f"batched run failed: {type(exc).__name__}")
                        r.done = True
                        r.wake.set()
            with self._cond:
                nxt = self._queue[0] if self._queue else None
                if nxt is None:
                    self._busy = False
            if nxt is not None and nxt is not request:
                nxt.wake.set()  # the lead passes to the oldest waiting request
                if not request.done:
                    request.wake.wait()  # still queued: wait to be answered or to lead again
            # nxt is request: still queued (it did not fit this batch), so lead again
        if request.error is not None:
            raise request.error
        assert request.outputs is not None
        return request.outputs

    # ------------------------------------------------------------------ batching
    def _gather(self) -> list[_Request]:
        """The next batch, taken from the queue (``_cond`` held): the head request and the
        compatible requests after it, in arrival order, up to ``max_rows`` rows."""
        if self.max_delay_s > 0 and self._last_batch_requests > 1:
            deadline = self._clock() + self.max_delay_s
            while self._queued_rows() < self.max_rows:
                left = deadline - self._clock()
                if left <= 0:
                    break
                self._cond.wait(left)
        head = self._queue[0]
        batch: list[_Request] = []
        rows = 0
        kept: deque[_Request] = deque()
        while self._queue:
            r = self._queue.popleft()
            if r.signature == head.signature and rows + r.rows <= self.max_rows:
                batch.append(r)
                rows += r.rows
            else:
                kept.append(r)
        self._queue = kept
        self._last_batch_requests = len(batch)
        return batch

    def _queued_rows(self) -> int:
        head = self._queue[0].signature
        return sum(r.rows for r in self._queue if r.signature == head)

    def _execute(self, batch: list[_Request]) -> None:
        """Run ``batch`` and hand out the results (``_cond`` not held)."""
        total = sum(r.rows for r in batch)
        with self._cond:
            s = self.stats
            s.batches += 1
            s.requests += len(batch)
            s.rows += total
            s.rows_buckets[_bucket(total)] += 1
        if len(batch) == 1:
            self._alone(batch[0])
            return
        names = list(batch[0].feeds)
        joined = {n: np.concatenate([r.feeds[n] for r in batch], axis=0) for n in names}
        try:
            outputs = self.inner.run(joined)
        except InferenceError:
            self._rerun(batch)
            return
        bad = [n for n, v in outputs.items() if v.ndim == 0 or v.shape[0] != total]
        if bad:
            if self.disabled is None:
                self.disabled = f"output {bad[0]!r} does not keep the batch dimension"
                log.warning("batching stopped: %s", self.disabled)
            self._rerun(batch)
            return
        start = 0
        for r in batch:
            stop = start + r.rows
            r.outputs = {n: v[start:stop] for n, v in outputs.items()}
            start = stop
            r.done = True
            r.wake.set()

    def _rerun(self, batch: list[_Request]) -> None:
        with self._cond:
            self.stats.reruns += 1
        for r in batch:
            self._alone(r)

    def _alone(self, r: _Request) -> None:
        try:
            r.outputs = self.inner.run(r.feeds)
        except InferenceError as exc:
            r.error = exc
        r.done = True
        r.wake.set()


def _rows(feeds: Mapping[str, Tensor]) -> int | None:
    """The rows every input has (its first dimension), or None if they differ or are scalars."""
    rows: int | None = None
    for v in feeds.values():
        if v.ndim == 0 or (rows is not None and v.shape[0] != rows):
            return None
        rows = int(v.shape[0])
    return rows


def _signature(feeds: Mapping[str, Tensor]) -> _Signature:
    return tuple(sorted((n, v.dtype.str, tuple(v.shape[1:])) for n, v in feeds.items()))


def _bucket(rows: int) -> int:
    for i, edge in enumerate(BATCH_ROW_BUCKETS):
        if rows <= edge:
            return i
    return len(BATCH_ROW_BUCKETS)


@dataclass(frozen=True)
class BatchGain:
    """Seconds per row alone, and per row in a batch of ``PROBE_ROWS`` (best of a few runs)."""

    alone_s: float
    batched_s: float

    @property
    def ratio(self) -> float:
        return self.batched_s / self.alone_s if self.alone_s > 0 else 1.0


def decide(gain: BatchGain) -> str | None:
    """Why batching does not pay for ``gain`` (None: it does; see ``MAX_ROW_COST_RATIO``)."""
    if gain.ratio > MAX_ROW_COST_RATIO:
        limit = MAX_ROW_COST_RATIO
        return f"a row in a batch costs {gain.ratio:.2f}x a row alone (pays below {limit})"
    saving = gain.alone_s - gain.batched_s
    if saving < MIN_SAVING_S:
        return f"it saves {saving * 1e6:.1f} us per row (pays from {MIN_SAVING_S * 1e6:.0f} us)"
    return None


def batch_gain(
    runtime: Runtime, *, budget_s: float = 0.25, clock: Callable[[], float] = time.perf_counter
) -> BatchGain | str:
    """Time ``runtime`` on zeros at one row and at ``PROBE_ROWS`` rows, within ~``budget_s``.

    Returns:
        The timings, or why the model cannot be probed (a dynamic dimension past the first, an
        input type numpy cannot make, a failing run).
    """
    why = batchable(runtime.inputs)
    if why is not None:
        return why
    shapes: dict[str, tuple[tuple[int, ...], np.dtype[np.generic]]] = {}
    for t in runtime.inputs:
        rest = t.shape[1:]
        if not all(isinstance(d, int) and d > 0 for d in rest):
            return f"input {t.name!r} has a dynamic dimension past the first"
        try:
            dtype = np.dtype(t.dtype)
        except TypeError:
            return f"input {t.name!r} has type {t.dtype!r}"
        shapes[t.name] = (tuple(int(d) for d in rest if isinstance(d, int)), dtype)

    def feeds(rows: int) -> dict[str, Tensor]:
        return {n: np.zeros((rows, *rest), dtype=dt) for n, (rest, dt) in shapes.items()}

    one, many = feeds(1), feeds(PROBE_ROWS)
    best = {1: float("inf"), PROBE_ROWS: float("inf")}
    end = clock() + budget_s
    try:
        for f in (one, many, one, many):
            runtime.run(f)  # warm: the first run of a shape allocates
        runs = 0
        while runs < 3 or (clock() < end and runs < 200):
            for rows, f in ((1, one), (PROBE_ROWS, many)):
                t0 = clock()
                runtime.run(f)
                best[rows] = min(best[rows], (clock() - t0) / rows)
            runs += 1
    except InferenceError as exc:
        return f"the model failed on zeros: {exc}"
    return BatchGain(best[1], best[PROBE_ROWS])


def with_batching(
    runtime: Runtime, mode: str, *, max_rows: int, max_delay_s: float
) -> tuple[Runtime, str]:
    """``runtime`` wrapped for batching as ``mode`` ("off", "on", "auto") says, and why, for the
    log: "on" batches whenever the inputs allow it, "auto" only when ``batch_gain`` shows it
    pays."""
    if mode == "off":
        return runtime, "batching off"
    why = batchable(runtime.inputs)
    if why is None and mode == "auto":
        gain = batch_gain(runtime)
        if isinstance(gain, str):
            why = gain
        else:
            costs = (
                f"{gain.alone_s * 1e6:.1f} us per row alone, {gain.batched_s * 1e6:.1f} us "
                f"in a batch of {PROBE_ROWS}"
            )
            why = decide(gain)
            if why is None:
                wrapped = BatchingRuntime(runtime, max_rows=max_rows, max_delay_s=max_delay_s)
                return wrapped, f"batching on ({costs})"
            why = f"{why}; {costs}"
    if why is not None:
        return runtime, f"batching off: {why}"
    return BatchingRuntime(runtime, max_rows=max_rows, max_delay_s=max_delay_s), "batching on"
