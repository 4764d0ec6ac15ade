"""``DriftMonitor``: per-tensor tier-A windows on the device, scored and judged when they close.

Owns: the window policy (close by count or by time, whichever first), the per-tensor window
state, and the ``DriftWindow`` / ``TensorDriftState`` values it hands out. Does not own the
sketches (``tier_a``), scores (``scores``), thresholds (``thresholds``), nor any clock, timer,
metric or transport: the orchestrator passes ``now`` (seconds from a monotonic clock) as a
value, calls ``tick`` from its own timer and ships the windows it gets back. Not thread-safe:
one monitor per serving loop (or a lock around it).

Window policy, per tensor:

- A window opens at the ``now`` of its first row and closes as soon as it holds
  ``max_values`` rows (a batch crossing the boundary is split, so count-closed windows have
  exactly ``max_values`` rows and share one set of thresholds, unless the window budget
  below held them open).
- It also closes once ``max_seconds`` have passed since it opened, checked on ``observe``
  (before the new batch is added, which then opens the next window) and on ``tick`` - but only
  if it holds at least ``min_values`` rows; a quieter window stays open until it does, so a
  low-traffic device is never judged on a handful of rows.
- ``flush`` closes every non-empty window (shutdown); features with fewer than
  ``DEFAULT_MIN_N`` values are then reported but not judged.
- With ``windows_per_hour`` set, a count or time close also needs the tensor's window budget
  (``budget.WindowBudget``: that many an hour on average, ``window_burst`` in a row). Without
  credit the due window stays open and takes every further row (no split) until credit
  accrues; it then closes on the next ``observe`` or ``tick`` with its reason (``count`` if it
  reached ``max_values`` rows). So windows grow with traffic and their number per day is
  bounded, while a device whose windows are rarer than the budget sees no change.

The hot path (``observe``) flattens the batch and updates the tracker; scoring, thresholds and
the verdict run only when a window closes (well under a millisecond for 16 features).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt

from edge_agent.drift.baseline import DriftBaseline
from edge_agent.drift.budget import WindowBudget
from edge_agent.drift.scores import FeatureScores, score
from edge_agent.drift.thresholds import (
    CORRECTIONS,
    DEFAULT_ALPHA,
    DEFAULT_TESTS,
    TESTS,
    DriftThresholds,
    DriftVerdict,
    judge,
)
from edge_agent.drift.tier_a import TierASketch
from edge_agent.drift.view import TierAView
from edge_agent.errors import DriftError

CLOSE_REASONS = ("count", "time", "flush")


@dataclass(frozen=True)
class MonitorPolicy:
    """When windows close and how they are judged.

    Attributes:
        max_values: Rows per window (count close).
        max_seconds: Window age at which it closes (time close), given ``min_values`` rows.
        min_values: Rows a window needs before a time close.
        alpha: Family-wise false-alarm rate per window; the family is one tensor's features.
        tests: Tests OR-ed into an alert (see ``thresholds``).
        correction: ``"bonferroni"`` or ``"holm"`` across the tensor's features.
        windows_per_hour: Per tensor, windows closed by count or time an hour on average
            (0: no budget, windows close as soon as they are due).
        window_burst: Per tensor, windows that may close in a row within that budget.

    Raises:
        ValueError: (from the constructor) a value out of range or an unknown test/correction.
    """

    max_values: int = 1000
    max_seconds: float = 60.0
    min_values: int = 100
    alpha: float = DEFAULT_ALPHA
    tests: tuple[str, ...] = DEFAULT_TESTS
    correction: str = "bonferroni"
    windows_per_hour: float = 0.0
    window_burst: int = 4

    def __post_init__(self) -> None:
        if self.max_values < 1 or not 1 <= self.min_values <= self.max_values:
            raise ValueError("need max_values >= 1 and 1 <= min_values <= max_values")
        if not (math.isfinite(self.max_seconds) and self.max_seconds > 0):
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not self.tests or any(t not in TESTS for t in self.tests):
            raise ValueError(f"tests must be a non-empty subset of {TESTS}")
        if self.correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {CORRECTIONS}")
        if not (math.isfinite(self.windows_per_hour) and self.windows_per_hour >= 0):
            raise ValueError(f"windows_per_hour must be >= 0, got {self.windows_per_hour}")
        if self.window_burst < 1:
            raise ValueError(f"window_burst must be >= 1, got {self.window_burst}")

    def budget(self) -> WindowBudget | None:
        """A fresh window budget for one tensor, or None without ``windows_per_hour``."""
        if not self.windows_per_hour:
            return None
        return WindowBudget(self.windows_per_hour, self.window_burst)


@dataclass(frozen=True, eq=False)
class DriftWindow:
    """One closed window of one tensor: its sketch, scores and verdict.

    Attributes:
        tensor: Tensor name.
        role: ``"input"`` or ``"output"``.
        start: ``now`` of the window's first row.
        end: ``now`` at which it closed.
        reason: ``"count"``, ``"time"`` or ``"flush"``.
        view: The window's tier-A view (mergeable across devices; ship ``view.to_bytes()``).
        scores: Scores against the baseline.
        verdict: The judgement of those scores.
        alert_started: This window alerts and the tensor's previous window did not: the start
            of an alert episode, which the agent announces with one ``drift_alert`` event (not
            part of ``to_dict``; the verdict says whether each window alerts).
    """

    tensor: str
    role: str
    start: float
    end: float
    reason: str
    view: TierAView
    scores: FeatureScores
    verdict: DriftVerdict
    alert_started: bool = False

    @property
    def rows(self) -> int:
        """Rows (samples) in the window."""
        return int(self.view.total()[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary: metadata, scores and verdict (the view travels as bytes)."""
        return {
            "tensor": self.tensor,
            "role": self.role,
            "start": self.start,
            "end": self.end,
            "reason": self.reason,
            "rows": self.rows,
            "scores": self.scores.to_dict(),
            "verdict": self.verdict.to_dict(),
        }


@dataclass(frozen=True)
class TensorDriftState:
    """What ``DriftMonitor.snapshot`` reports per tensor (for metrics and status pages).

    Attributes:
        tensor: Tensor name.
        role: ``"input"`` or ``"output"``.
        open_rows: Rows in the open window.
        open_since: ``now`` of the open window's first row, or None if it is empty.
        windows_closed: Windows closed since the monitor started.
        windows_alerted: Of those, windows with at least one drifted feature.
        last: The last closed window (its ``scores`` are the per-feature gauges), or None.
    """

    tensor: str
    role: str
    open_rows: int
    open_since: float | None
    windows_closed: int
    windows_alerted: int
    last: DriftWindow | None


@dataclass(eq=False)
class _Tensor:
    role: str
    baseline: TierAView
    tracker: TierASketch
    rows: int = 0
    start: float = 0.0
    closed: int = 0
    alerted: int = 0
    last: DriftWindow | None = field(default=None)
    budget: WindowBudget | None = field(default=None)


class DriftMonitor:
    """Windows, scores and judges the live traffic of every tensor in a ``DriftBaseline``."""

    def __init__(self, baseline: DriftBaseline, policy: MonitorPolicy | None = None) -> None:
        """A monitor with one empty window per input and output tensor of ``baseline``."""
        self._baseline = baseline
        self._policy = policy or MonitorPolicy()
        self._tensors: dict[str, _Tensor] = {}
        for role, views, trackers in (
            ("input", baseline.inputs, baseline.input_trackers()),
            ("output", baseline.outputs, baseline.output_trackers()),
        ):
            for name, view in views.items():
                self._tensors[name] = _Tensor(
                    role, view, trackers[name], budget=self._policy.budget()
                )

    @property
    def policy(self) -> MonitorPolicy:
        """The window and alert policy."""
        return self._policy

    @property
    def tensors(self) -> tuple[str, ...]:
        """Names of the monitored tensors (inputs, then outputs)."""
        return tuple(self._tensors)

    def observe(self, name: str, batch: npt.ArrayLike, now: float) -> tuple[DriftWindow, ...]:
        """Count a batch of tensor ``name``; return the windows this closed (usually none).

        Args:
            name: Tensor name (an input or output of the baseline).
            batch: The tensor batch as the model sees it (first axis = batch).
            now: Current time in seconds (monotonic clock), passed in by the caller.

        Returns:
            Windows closed by this call, oldest first: a time close (or a count close the
            budget had deferred) of the open window before the batch, then one count close per
            ``max_values`` rows reached, while the window budget allows.

        Raises:
            DriftError: unknown tensor, or a batch that does not flatten to the baseline's
                features (nothing is counted and no window closes).
            ValueError: ``now`` is not finite.
        """
        state = self._state(name)
        x = self._baseline.features(batch)
        if x.shape[1] != state.tracker.n_features:
            raise DriftError(
                f"tensor {name!r}: batch gives {x.shape[1]} features, "
                f"the baseline has {state.tracker.n_features}"
            )
        if not math.isfinite(now):
            raise ValueError(f"now must be finite, got {now}")
        p = self._policy
        closed: tuple[DriftWindow, ...] = ()
        reason = self._due(state, now)
        if reason:
            closed = (self._close(name, state, now, reason),)
        while x.shape[0]:
            if state.rows == 0:
                state.start = now
            # A full window the budget keeps open takes the whole batch.
            room = p.max_values - state.rows if state.rows < p.max_values else x.shape[0]
            state.tracker.update(x[:room])
            state.rows += min(room, x.shape[0])
            x = x[room:]
            if state.rows >= p.max_values and (reason := self._due(state, now)):
                closed = (*closed, self._close(name, state, now, reason))
        return closed

    def tick(self, now: float) -> tuple[DriftWindow, ...]:
        """Close every window that is due by time, or by count once the budget allows (call
        from the orchestrator's timer).

        Raises:
            ValueError: ``now`` is not finite.
        """
        if not math.isfinite(now):
            raise ValueError(f"now must be finite, got {now}")
        return tuple(
            self._close(name, s, now, reason)
            for name, s in self._tensors.items()
            if (reason := self._due(s, now))
        )

    def flush(self, now: float) -> tuple[DriftWindow, ...]:
        """Close every non-empty window regardless of age and size (e.g. on shutdown)."""
        return tuple(
            self._close(name, s, now, "flush") for name, s in self._tensors.items() if s.rows
        )

    def snapshot(self) -> dict[str, TensorDriftState]:
        """Per tensor: the open window's size and age, counters and the last closed window."""
        return {
            name: TensorDriftState(
                name,
                s.role,
                s.rows,
                s.start if s.rows else None,
                s.closed,
                s.alerted,
                s.last,
            )
            for name, s in self._tensors.items()
        }

    def _state(self, name: str) -> _Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise DriftError(f"the drift baseline has no tensor named {name!r}") from None

    def _due(self, state: _Tensor, now: float) -> str | None:
        """Why ``state``'s window closes at ``now`` (spending its budget), or None."""
        p = self._policy
        if state.rows >= p.max_values:
            reason = "count"
        elif state.rows >= p.min_values and now - state.start >= p.max_seconds:
            reason = "time"
        else:
            return None
        if state.budget is not None and not state.budget.take(now):
            return None
        return reason

    def _close(self, name: str, state: _Tensor, now: float, reason: str) -> DriftWindow:
        view = state.tracker.view()
        state.tracker.reset()
        p = self._policy
        scores = score(view, state.baseline)
        thresholds = DriftThresholds.for_scores(
            scores, p.alpha, tests=p.tests, correction=p.correction
        )
        verdict = judge(scores, thresholds)
        was_alerting = state.last is not None and state.last.verdict.alert
        started = verdict.alert and not was_alerting
        window = DriftWindow(
            name, state.role, state.start, now, reason, view, scores, verdict, started
        )
        state.rows = 0
        state.closed += 1
        state.alerted += int(verdict.alert)
        state.last = window
        return window
