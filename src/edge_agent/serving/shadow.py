"""On-device A/B routing and shadow evaluation of a candidate model.

Owns: ``ABRouter`` (a sticky split of live traffic between the live model and an A/B candidate)
and ``ShadowRunner`` (a sample of live requests replayed on a shadow candidate in a worker
thread, off the request path; answers compared with the live ones, latencies of both recorded).
Does not own: loading or closing either model (the model store does), serving the A/B
candidate's answer (the service does), or promoting a candidate (decided centrally from the
statistics reported here).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import random
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edge_agent.contract.inputs import OutputContract
from edge_agent.errors import ConfigError
from edge_agent.runtime.base import Runtime, Tensor

Clock = Callable[[], float]
Arm = Literal["live", "candidate"]
ARMS: tuple[Arm, ...] = ("live", "candidate")

_log = logging.getLogger(__name__)


def key_fraction(routing_key: str) -> float:
    """A uniform number in [0, 1) fixed by ``routing_key`` (BLAKE2b, 8-byte digest).

    Only the top 53 bits are used so the float division can never round up to 1.0.
    """
    digest = hashlib.blake2b(routing_key.encode("utf-8"), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) / float(1 << 53)


class ABRouter:
    """Sends ``fraction`` of traffic to the candidate arm.

    Sticky per routing key (a user, a camera, a session): the same key always gets the same arm
    for a given fraction, on every device and across restarts, because the arm is a function
    of the key's hash. Raising the fraction only moves keys from live to candidate. Requests
    without a key draw from ``rng`` (injected; seeded from ``seed`` when not given).
    Thread-safe; counts requests per arm.
    """

    def __init__(
        self, fraction: float, seed: int | None = None, *, rng: random.Random | None = None
    ) -> None:
        """Create a router.

        Raises:
            ConfigError: ``fraction`` is outside [0, 1].
        """
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"A/B fraction must be in [0, 1], got {fraction}")
        self._fraction = fraction
        # Routing, not security: a reproducible PRNG is what we want.
        self._rng = rng if rng is not None else random.Random(seed)
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(ARMS, 0)

    @property
    def fraction(self) -> float:
        return self._fraction

    def arm(self, routing_key: str | None) -> Arm:
        """The arm for this request: ``"candidate"`` or ``"live"``."""
        with self._lock:
            u = self._rng.random() if routing_key is None else key_fraction(routing_key)
            chosen: Arm = "candidate" if u < self._fraction else "live"
            self._counts[chosen] += 1
            return chosen

    def counts(self) -> dict[str, int]:
        """Requests routed so far, per arm."""
        with self._lock:
            return dict(self._counts)


@dataclass(frozen=True)
class _Job:
    feeds: Mapping[str, Tensor]
    live: Mapping[str, Tensor]
    live_latency_s: float


class _MismatchError(Exception):
    """The candidate's answer cannot be compared with the live one (missing output, shape)."""


_COUNTERS = (
    "offered",
    "sampled",
    "dropped",
    "compared",
    "agree_rows",
    "disagree_rows",
    "candidate_errors",
)


class ShadowRunner:
    """Replays a sample of live requests on a candidate model and compares the answers.

    ``offer`` is called on the request path after the live answer is known: it samples
    ``fraction`` of requests with ``rng`` and puts them on a bounded queue without ever blocking
    (a full queue counts the request as ``dropped``). A daemon worker thread runs the candidate
    and compares, per row (leading axis; a scalar output is one row):

    - classification: top-1 class of ``score_output`` (for a single column, the positive class
      at 0.5 for probabilities or 0 for logits);
    - regression / raw: every contract output within ``atol`` absolute difference (NaN equals
      NaN). ``max_abs_diff`` is the largest finite difference seen, for every task.

    Latencies (the live one as reported, the candidate's measured with ``clock``) are kept for
    the last ``latency_window`` comparisons and reported as p50/p99 in milliseconds. A candidate
    that raises, misses an output or answers in another shape counts as ``candidate_errors``;
    nothing propagates. Arrays passed to ``offer`` are held by reference until the worker is
    done with them: callers must not modify them afterwards.
    """

    def __init__(
        self,
        candidate: Runtime,
        fraction: float,
        queue_size: int,
        contract: OutputContract,
        rng: random.Random,
        clock: Clock,
        *,
        atol: float = 1e-4,
        latency_window: int = 1024,
        name: str = "shadow",
        version: int | None = None,
    ) -> None:
        """Start the worker thread.

        Raises:
            ConfigError: ``fraction`` outside [0, 1], ``queue_size`` or ``latency_window``
                below 1, or a negative ``atol``.
        """
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"shadow fraction must be in [0, 1], got {fraction}")
        if queue_size < 1 or latency_window < 1 or atol < 0:
            raise ConfigError("shadow needs queue_size >= 1, latency_window >= 1, atol >= 0")
        self._candidate = candidate
        self._version = version
        # Classification: rows counted by (live class, shadow class); None until the first
        # comparison fixes the number of classes (or for other tasks).
        self._flips: npt.NDArray[np.int64] | None = None
        self._fraction = fraction
        self._contract = contract
        self._rng = rng
        self._clock = clock
        self._atol = atol
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._max_abs_diff = 0.0
        self._last_error: str | None = None
        self._live_ms: deque[float] = deque(maxlen=latency_window)
        self._candidate_ms: deque[float] = deque(maxlen=latency_window)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._work, name=f"{name}-worker", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        """Whether the worker thread is alive."""
        return self._thread.is_alive()

    def offer(
        self, feeds: Mapping[str, Tensor], live_outputs: Mapping[str, Tensor], live_latency_s: float
    ) -> bool:
        """Maybe queue a served request for the candidate; never blocks.

        Returns:
            ``True`` when the request was queued; ``False`` when not sampled, the queue was
            full (counted as dropped) or the runner is closed.
        """
        with self._lock:
            if self._closing.is_set():
                return False
            self._counts["offered"] += 1
            if self._rng.random() >= self._fraction:
                return False
            self._counts["sampled"] += 1
            try:
                self._queue.put_nowait(_Job(feeds, live_outputs, live_latency_s))
            except queue.Full:
                self._counts["dropped"] += 1
                return False
            self._pending += 1
            return True

    def flush(self, timeout: float) -> bool:
        """Wait until every queued request has been handled; ``False`` on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 5.0) -> bool:
        """Stop the worker after at most the request it is running; queued ones are abandoned.

        Idempotent. Does not close the candidate runtime (its owner does).

        Returns:
            ``True`` when the worker has stopped within ``timeout`` seconds.
        """
        self._closing.set()
        with contextlib.suppress(queue.Full):
            # A full queue needs no sentinel: the worker checks the flag on its next item.
            self._queue.put_nowait(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        """Counters, agreement and latency percentiles.

        Keys: ``offered``, ``sampled``, ``dropped``, ``compared``, ``agree_rows``,
        ``disagree_rows``, ``candidate_errors``, ``pending``, ``version`` (the candidate's, when
        known), ``flips`` (classification: rows by live class (row) and candidate class
        (column), a square list of lists; None otherwise), ``agreement`` (agreeing share of
        compared rows, ``None`` before any), ``max_abs_diff``, ``last_error``, and
        ``live_p50_ms``, ``live_p99_ms``, ``candidate_p50_ms``, ``candidate_p99_ms`` (``None``
        before any comparison).
        """
        with self._lock:
            out: dict[str, Any] = dict(self._counts)
            out["pending"] = self._pending
            out["max_abs_diff"] = self._max_abs_diff
            out["last_error"] = self._last_error
            live = np.fromiter(self._live_ms, dtype=np.float64)
            cand = np.fromiter(self._candidate_ms, dtype=np.float64)
            out["version"] = self._version
            out["flips"] = None if self._flips is None else self._flips.tolist()
        rows = out["agree_rows"] + out["disagree_rows"]
        out["agreement"] = out["agree_rows"] / rows if rows else None
        for prefix, values in (("live", live), ("candidate", cand)):
            for q in (50, 99):
                out[f"{prefix}_p{q}_ms"] = float(np.percentile(values, q)) if values.size else None
        return out

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None or self._closing.is_set():
                return
            try:
                self._process(job)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def _process(self, job: _Job) -> None:
        start = self._clock()
        try:
            answer = self._candidate.run(job.feeds)
            latency_s = self._clock() - start
            agree, max_diff = self._compare(job.live, answer)
            classes = self._classes(job.live, answer)
        except Exception as exc:
            # A broken candidate must never affect serving: count it and move on.
            _log.debug("shadow candidate failed", exc_info=True)
            with self._lock:
                self._counts["candidate_errors"] += 1
                self._last_error = f"{type(exc).__name__}: {exc}"
            return
        n_agree = int(np.count_nonzero(agree))
        with self._lock:
            self._counts["compared"] += 1
            self._counts["agree_rows"] += n_agree
            self._counts["disagree_rows"] += int(agree.size) - n_agree
            self._max_abs_diff = max(self._max_abs_diff, max_diff)
            if classes is not None:
                self._count_flips(*classes)
            self._live_ms.append(job.live_latency_s * 1000.0)
            self._candidate_ms.append(latency_s * 1000.0)

    def _classes(
        self, live: Mapping[str, Tensor], candidate: Mapping[str, Tensor]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int] | None:
        """Per row, the live and the candidate's top-1 class and the number of classes
        (classification with a score output only; None otherwise)."""
        contract = self._contract
        if contract.task != "classification" or contract.score_output is None:
            return None
        a, b = _pair(live, candidate, contract.score_output)
        if a.shape[1] == 1:
            cut = 0.0 if contract.score_kind == "logits" else 0.5
            return (a[:, 0] > cut).astype(np.int64), (b[:, 0] > cut).astype(np.int64), 2
        return a.argmax(axis=1), b.argmax(axis=1), int(a.shape[1])

    def _count_flips(
        self, live: npt.NDArray[np.int64], cand: npt.NDArray[np.int64], k: int
    ) -> None:
        """Add the rows to ``_flips`` (under the lock); a changed class count starts over."""
        if self._flips is None or self._flips.shape[0] != k:
            self._flips = np.zeros((k, k), dtype=np.int64)
        np.add.at(self._flips, (live, cand), 1)

    def _compare(
        self, live: Mapping[str, Tensor], candidate: Mapping[str, Tensor]
    ) -> tuple[npt.NDArray[np.bool_], float]:
        """Per-row agreement and the largest finite absolute difference.

        Raises:
            _MismatchError: an output is missing on either side or the shapes differ.
        """
        contract = self._contract
        if contract.task == "classification" and contract.score_output is not None:
            a, b = _pair(live, candidate, contract.score_output)
            diff = _max_finite(np.abs(a - b))
            if a.shape[1] == 1:
                cut = 0.0 if contract.score_kind == "logits" else 0.5
                return (a[:, 0] > cut) == (b[:, 0] > cut), diff
            return a.argmax(axis=1) == b.argmax(axis=1), diff
        agree: npt.NDArray[np.bool_] | None = None
        diff = 0.0
        for name in contract.outputs:
            a, b = _pair(live, candidate, name)
            d = np.abs(a - b)
            close = (d <= self._atol) | (np.isnan(a) & np.isnan(b))
            rows_ok = np.asarray(close.all(axis=1), dtype=np.bool_)
            if agree is not None and agree.shape != rows_ok.shape:
                raise _MismatchError(
                    f"output {name!r} has {rows_ok.size} rows, expected {agree.size}"
                )
            agree = rows_ok if agree is None else agree & rows_ok
            diff = max(diff, _max_finite(d))
        if agree is None:  # pragma: no cover - a contract always names an output
            raise _MismatchError("the output contract names no outputs")
        return agree, diff


def _pair(
    live: Mapping[str, Tensor], candidate: Mapping[str, Tensor], name: str
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Both sides' ``name`` output as float64 (rows, values); scalars are one row."""
    if name not in live or name not in candidate:
        raise _MismatchError(f"output {name!r} missing from the live or the candidate answer")
    a, b = np.asarray(live[name]), np.asarray(candidate[name])
    if a.shape != b.shape:
        raise _MismatchError(f"output {name!r}: live shape {a.shape}, candidate shape {b.shape}")
    rows = a.shape[0] if a.ndim else 1
    return (
        a.astype(np.float64).reshape(rows, -1),
        b.astype(np.float64).reshape(rows, -1),
    )


def _max_finite(values: npt.NDArray[np.float64]) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.max()) if finite.size else 0.0
