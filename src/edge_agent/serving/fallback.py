"""Cloud fallback: whether a local answer is a hard example, and how a cloud call is guarded.

Owns: the pure score check the router consumes (``FallbackPolicy.after``: whether a local
answer is a hard example from its confidence), the guards around a cloud call
(``CircuitBreaker``, ``MinuteBudget``; clocks are injected ``Callable[[], float]`` returning
monotonic seconds), the ``FallbackTransport`` interface and ``CloudFallback``, which makes one
guarded call and counts its outcome. Does not own: any route decision, the fallback mode's rule
among them (which modes ask the cloud, when, and whether a hard example is looked for at all),
nor answering locally when the cloud fails: ``edge_agent.serving.routing.Router`` owns them.
Nor the MQTT v5 transport (``edge_agent.serving.fallback_mqtt``), or validation and drift.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from edge_agent.config import FallbackConfig
from edge_agent.contract.inputs import OutputContract
from edge_agent.errors import ConfigError, ContractError, FallbackError
from edge_agent.runtime.base import Tensor

Clock = Callable[[], float]
Tensors = Mapping[str, Tensor]
# Why a cloud call produced no answer: ``CloudFallbackError.reason``, a stable metric label.
FAILURES = ("breaker_open", "budget_exhausted", "deadline", "transport_error", "no_transport")
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CloudFallbackError(FallbackError):
    """A cloud call that gave no usable answer; ``reason`` is one of ``FAILURES``."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Decision:
    """Whether to ask the cloud and why (a stable metric label); rows that were hard examples.

    Reasons: ``cloud_only``, ``prefer_cloud``, ``local_unavailable``, ``invalid_input``,
    ``out_of_distribution`` (the mode's rule, ``Router.before``); ``invalid_output``,
    ``low_confidence``, ``high_entropy`` (``FallbackPolicy.after``).
    """

    cloud: bool
    reason: str | None = None
    hard_rows: int = 0


#: The local answer stands.
DEVICE = Decision(cloud=False)


class FallbackTransport(Protocol):
    """Sends one inference request to the cloud model and waits for its answer."""

    def request(
        self,
        model: str,
        inputs: Tensors,
        *,
        deadline_s: float,
        reason: str,
        device_outputs: Tensors | None = None,
        model_version: int | None = None,
    ) -> Tensors:
        """Ask the cloud copy of ``model`` to answer ``inputs`` within ``deadline_s`` seconds.

        ``device_outputs`` is the device's own answer when it has one (a hard example), for
        counting cloud/device disagreement; None otherwise. ``model_version`` is the version
        the device runs, so the cloud answers with that version's cloud model (None: the
        device runs none). ``CloudFallback`` passes it only when it is set, so a transport
        written before the argument existed still serves devices without a model.

        Raises:
            FallbackError: the request failed or timed out (``CloudFallbackError`` with reason
                ``deadline`` for a timeout).
        """
        ...


class UnavailableTransport:
    """The transport of a device without a cloud connection: every request fails."""

    def request(
        self,
        model: str,
        inputs: Tensors,
        *,
        deadline_s: float,
        reason: str,
        device_outputs: Tensors | None = None,
        model_version: int | None = None,
    ) -> Tensors:
        """Raises: CloudFallbackError: always, with reason ``no_transport``."""
        raise CloudFallbackError("no cloud transport configured", reason="no_transport")


class FallbackPolicy:
    """The hard-example check of one model's answers: no clock, no I/O, no state."""

    def __init__(self, config: FallbackConfig, contract: OutputContract) -> None:
        """Bind the policy to a fallback config and the model's output contract.

        Raises:
            ConfigError: the config is invalid.
        """
        config.validate()
        self._config, self._contract = config, contract
        self._score_checks = contract.task == "classification"

    def after(self, outputs: Tensors) -> Decision:
        """Decide after local inference whether the answer is a hard example.

        Only for classification models; otherwise the local answer stands. The router asks
        only in ``prefer_device`` mode (``Router.after_local_answer``). Scores are read from
        ``score_output`` along the last axis (leading axes are rows; a 1-D output is one row;
        a single column is a binary classifier's positive class). Logits go through a softmax
        (sigmoid for one column); probabilities are renormalised to sum to one (quantised
        models drift off it). A batch is one request: it goes to the cloud when its worst row
        is hard. Reasons by precedence:
        ``invalid_output`` (a row with NaN/Inf or no probability mass), ``low_confidence``
        (top probability below ``min_confidence``), ``high_entropy`` (entropy / ln(classes)
        above ``max_entropy``). ``hard_rows`` counts rows failing any check.

        Raises:
            ContractError: the score output is missing, a scalar, or has no classes.
        """
        name = self._contract.score_output
        if not self._score_checks:
            return DEVICE
        if name is None or name not in outputs:
            raise ContractError(f"model answered without its score output {name!r}")
        logits = self._contract.score_kind == "logits"
        probs, valid = _probabilities(np.asarray(outputs[name]), logits=logits)
        entropy = -(probs * np.log(np.where(probs > 0, probs, 1.0))).sum(axis=1)
        low = valid & (probs.max(axis=1) < self._config.min_confidence)
        high = valid & (entropy / math.log(probs.shape[1]) > self._config.max_entropy)
        hard = int(np.count_nonzero(~valid | low | high))
        for mask, why in ((~valid, "invalid_output"), (low, "low_confidence")):
            if mask.any():
                return Decision(cloud=True, reason=why, hard_rows=hard)
        return Decision(cloud=True, reason="high_entropy", hard_rows=hard) if hard else DEVICE


def _probabilities(
    scores: npt.NDArray[Any], *, logits: bool
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Rows of class probabilities (rows, classes >= 2) and a mask of rows that were usable."""
    if scores.ndim == 0 or scores.shape[-1] == 0:
        raise ContractError(f"score output of shape {scores.shape} has no per-class scores")
    x = scores.astype(np.float64).reshape(-1, scores.shape[-1])
    valid = np.asarray(np.isfinite(x).all(axis=1), dtype=np.bool_)
    x = np.where(valid[:, None], x, 0.0)
    if x.shape[1] == 1:  # one column: the positive class of a binary classifier
        positive = np.exp(-np.logaddexp(0.0, -x)) if logits else x
        x, logits = np.concatenate([1.0 - positive, positive], axis=1), False
    if logits:
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True), valid
    p = np.clip(x, 0.0, None)
    mass = p.sum(axis=1, keepdims=True)
    valid &= mass[:, 0] > 0
    return p / np.where(mass > 0, mass, 1.0), valid


class CircuitBreaker:
    """Stops calling a failing cloud, then probes it with one trial call at a time.

    closed -> open after ``failures`` consecutive failures; open rejects every call until
    ``reset_seconds`` have passed, then half-open lets exactly one trial through (concurrent
    callers are rejected); the trial's success closes the breaker, its failure re-opens it for
    another ``reset_seconds``. Outcomes of calls that started while closed and finish later
    still count (a late failure while half-open re-opens). An outage is one episode: from the
    opening of a closed breaker (``record_failure`` returns True) to its closing
    (``record_success`` returns True); re-opening after a failed trial is part of it.
    Thread-safe.
    """

    def __init__(self, failures: int, reset_seconds: float, clock: Clock) -> None:
        """Create a closed breaker.

        Raises:
            ConfigError: ``failures`` < 1 or ``reset_seconds`` < 0.
        """
        if failures < 1 or reset_seconds < 0:
            raise ConfigError("breaker needs failures >= 1 and reset_seconds >= 0")
        self._threshold, self._reset_s, self._clock = failures, reset_seconds, clock
        self._lock = threading.Lock()
        self._state, self._consecutive, self._opened_at, self._trial_out = CLOSED, 0, 0.0, False
        self._counts = Counter[str]()

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open`` at the clock's current time."""
        with self._lock:
            return self._current()

    def _current(self) -> str:
        if self._state == OPEN and self._clock() - self._opened_at >= self._reset_s:
            self._state, self._trial_out = HALF_OPEN, False
        return self._state

    def allow(self) -> bool:
        """Whether a call may go out now; in half-open this claims the single trial.

        A caller that got ``True`` must report ``record_success``, ``record_failure`` or
        ``release`` (gave up before calling).
        """
        with self._lock:
            state = self._current()
            if state == CLOSED:
                return True
            if state == HALF_OPEN and not self._trial_out:
                self._trial_out = True
                self._counts["trials"] += 1
                return True
            self._counts["rejected"] += 1
            return False

    def record_success(self) -> bool:
        """A call succeeded: reset the failure run; a half-open breaker closes.

        Returns:
            True when this closed the breaker (the end of an outage).
        """
        with self._lock:
            self._counts["successes"] += 1
            self._consecutive = 0
            if self._current() == HALF_OPEN:
                self._state, self._trial_out = CLOSED, False
                return True
            return False

    def record_failure(self) -> bool:
        """A call failed: a half-open breaker re-opens; a closed one opens at the threshold.

        Returns:
            True when this opened a closed breaker (the start of an outage).
        """
        with self._lock:
            self._counts["failures"] += 1
            self._consecutive += 1
            state = self._current()
            if state == HALF_OPEN or (state == CLOSED and self._consecutive >= self._threshold):
                self._state, self._opened_at, self._trial_out = OPEN, self._clock(), False
                self._counts["opened"] += 1
                return state == CLOSED
            return False

    def release(self) -> None:
        """Give back a claimed half-open trial that was never made (no outcome to report)."""
        with self._lock:
            if self._state == HALF_OPEN:
                self._trial_out = False

    def stats(self) -> dict[str, Any]:
        """State, current failure run, and totals of successes/failures/rejections/openings."""
        with self._lock:
            keys = ("successes", "failures", "rejected", "opened", "trials")
            out: dict[str, Any] = {k: self._counts[k] for k in keys}
            return {"state": self._current(), "consecutive_failures": self._consecutive, **out}


class MinuteBudget:
    """At most ``max_per_minute`` cloud calls in any sliding 60-second window. Thread-safe.

    Keeps the timestamps of the calls in the window (at most ``max_per_minute`` floats), so the
    limit is exact rather than a token-bucket approximation. ``max_per_minute = 0`` denies all.
    """

    WINDOW_S = 60.0

    def __init__(self, max_per_minute: int, clock: Clock) -> None:
        """Create an unspent budget.

        Raises:
            ConfigError: ``max_per_minute`` is negative.
        """
        if max_per_minute < 0:
            raise ConfigError("max_per_minute must be >= 0")
        self._max, self._clock = max_per_minute, clock
        self._lock = threading.Lock()
        self._spent: deque[float] = deque()
        self.denied = 0

    def _expire(self) -> float:
        now = self._clock()
        while self._spent and self._spent[0] <= now - self.WINDOW_S:
            self._spent.popleft()
        return now

    def try_spend(self) -> bool:
        """Spend one call if the window has room; ``False`` (and counted) otherwise."""
        with self._lock:
            now = self._expire()
            if len(self._spent) >= self._max:
                self.denied += 1
                return False
            self._spent.append(now)
            return True

    def remaining(self) -> int:
        """Calls still allowed in the current window."""
        with self._lock:
            self._expire()
            return self._max - len(self._spent)


class CloudFallback:
    """Guarded cloud calls: deadline, breaker, budget, and counts of every outcome.

    ``event_sink``, when set (the sync layer sets it), is called with a
    ``fallback_breaker_open`` event entry when an outage starts and a
    ``fallback_breaker_closed`` one when it ends, in the shape of ``Registry.events`` entries;
    it must be quick and must not raise.
    """

    def __init__(self, transport: FallbackTransport, config: FallbackConfig, clock: Clock) -> None:
        """Wire a transport to the breaker and budget configured in ``config``.

        Raises:
            ConfigError: the config is invalid.
        """
        config.validate()
        self._transport, self._clock = transport, clock
        self._deadline_s = config.deadline_ms / 1000.0
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_reset_seconds, clock)
        self.budget = MinuteBudget(config.max_per_minute, clock)
        self._lock = threading.Lock()
        self._failed, self._by_reason, self._ok = Counter[str](), Counter[str](), 0
        self.event_sink: Callable[[dict[str, object]], None] | None = None

    def call(
        self,
        model: str,
        inputs: Tensors,
        reason: str,
        *,
        deadline_s: float | None = None,
        device_outputs: Tensors | None = None,
        model_version: int | None = None,
    ) -> Tensors:
        """Ask the cloud to answer ``inputs`` for ``model``.

        ``reason`` is the ``Decision.reason`` that sent the request here; ``deadline_s`` is the
        time the caller has left (the configured deadline caps it); ``model_version`` is the
        version the device runs (the cloud answers with that version's cloud model). Checks
        run in this order: transport configured, time left, breaker, budget; then the
        transport is called with the deadline, and an answer arriving after it is a failure.

        Raises:
            CloudFallbackError: with ``reason`` ``no_transport``, ``deadline`` (no time left,
                the transport timed out, or the answer came late), ``breaker_open``,
                ``budget_exhausted`` or ``transport_error`` (anything else the transport
                raised, or an answer that is not a mapping). Transport errors and late
                answers count as breaker failures.
        """
        with self._lock:
            self._by_reason[reason] += 1
        if isinstance(self._transport, UnavailableTransport):
            raise self._fail("no_transport", "no cloud transport configured")
        budget_s = self._deadline_s if deadline_s is None else min(deadline_s, self._deadline_s)
        if budget_s <= 0:
            raise self._fail("deadline", "no time left for a cloud call")
        if not self.breaker.allow():
            raise self._fail("breaker_open", "cloud fallback circuit breaker is open")
        if not self.budget.try_spend():
            self.breaker.release()
            raise self._fail("budget_exhausted", "cloud fallback budget per minute is spent")
        try:
            answer = self._request(model, inputs, reason, budget_s, device_outputs, model_version)
        except CloudFallbackError as exc:
            if exc.reason == "no_transport":
                self.breaker.release()
            elif self.breaker.record_failure():
                self._event("fallback_breaker_open", f"after {model!r}: {exc.reason}: {exc}")
            self._fail(exc.reason, str(exc))
            raise
        except BaseException:
            self.breaker.release()  # interrupted: no outcome, but never strand the trial
            raise
        if self.breaker.record_success():
            self._event("fallback_breaker_closed", f"trial call for {model!r} answered")
        with self._lock:
            self._ok += 1
        return answer

    def _request(
        self,
        model: str,
        inputs: Tensors,
        reason: str,
        deadline_s: float,
        device_outputs: Tensors | None,
        model_version: int | None,
    ) -> Tensors:
        start = self._clock()
        extra: dict[str, int] = {} if model_version is None else {"model_version": model_version}
        try:
            answer = self._transport.request(
                model,
                inputs,
                deadline_s=deadline_s,
                reason=reason,
                device_outputs=device_outputs,
                **extra,
            )
        except Exception as exc:
            # The transport is a plugin boundary: whatever it raises is a failed call.
            if isinstance(exc, CloudFallbackError) and exc.reason in ("no_transport", "deadline"):
                raise
            msg = f"cloud call for {model!r} failed: {type(exc).__name__}: {exc}"
            raise CloudFallbackError(msg, reason="transport_error") from exc
        elapsed = self._clock() - start
        if elapsed > deadline_s:
            msg = f"cloud answered in {elapsed * 1000:.0f} ms, past the {deadline_s * 1000:.0f} ms"
            raise CloudFallbackError(msg, reason="deadline")
        if not isinstance(answer, Mapping):
            raise CloudFallbackError("cloud answer is not a mapping", reason="transport_error")
        return answer

    def _event(self, kind: str, detail: str) -> None:
        sink = self.event_sink
        if sink is not None:  # wall time: events carry Unix time, the breaker a monotonic one
            sink(
                {
                    "model": None,
                    "version": None,
                    "event": kind,
                    "detail": detail[:1024],
                    "at": time.time(),
                }
            )

    def _fail(self, reason: str, message: str) -> CloudFallbackError:
        with self._lock:
            self._failed[reason] += 1
        return CloudFallbackError(message, reason=reason)

    def stats(self) -> dict[str, Any]:
        """Counts of calls by outcome and by request reason, plus breaker and budget state.

        Keys: ``requests``, ``ok``, ``failed`` (total), ``failures`` (per ``FAILURES`` label,
        all present), ``by_reason`` (per request reason), ``breaker``
        (``CircuitBreaker.stats``), ``budget_remaining``.
        """
        with self._lock:
            failures = {r: self._failed[r] for r in FAILURES}
            out: dict[str, Any] = {
                "requests": sum(self._by_reason.values()),
                "ok": self._ok,
                "failed": sum(failures.values()),
                "failures": failures,
                "by_reason": dict(self._by_reason),
            }
        return {**out, "breaker": self.breaker.stats(), "budget_remaining": self.budget.remaining()}
