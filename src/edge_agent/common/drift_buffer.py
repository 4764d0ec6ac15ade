"""``DriftWindowBuffer``: the closed drift windows waiting for a telemetry report, bounded in bytes.

Owns: the queue of ``(model key, version, DriftWindow)`` the control tick appends to and the
sync loop's report drains (and puts back when the report cannot be recorded), its memory
bound, and the count of windows it dropped to keep it. When an append or a put-back would
take the estimated memory of the windows held past ``max_bytes``, the OLDEST windows go first
(a report is about now; a window older than the newest 2 MiB of them is the least useful), and
every window dropped is counted once in ``dropped`` (cumulative, for the report's
``telemetry_dropped["drift_windows"]`` and the agent's metrics). A window bigger than the whole
budget is dropped on arrival, counted.

Without sync (standalone serving, a broker outage) nothing drains the buffer, so its bound is
what the device pays. A digits input window (64 features, 10 bins) holds about 28 KiB of
Python objects (tracemalloc; its view's arrays, scores and verdict), so the former
1,000-window deque grew to ~28 MB; see docs/agent.md "Memory under load".

The windows are kept as objects, not serialized: the report needs each window's view, scores
and verdict, and only the view has a binary form (``TierAView.to_bytes``, 12 KB for a digits
input window); storing bytes would save about half and make every consumer decode. The size
of a window is an estimate (``window_nbytes``), not the allocator's figure: 25.2 KiB for that
digits window, about 10% under what tracemalloc counts.

Does not own closing or scoring windows (``edge_agent.drift.monitor``), building or sending
reports (``edge_agent.sync.telemetry_feed``), nor the budget's value (``[drift] buffer_bytes``
in ``edge_agent.config``). Thread-safe: one lock around every operation (the control tick
thread appends, the sync thread drains and puts back, metrics and status read).
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from edge_agent.drift.edges import FeatureEdges
from edge_agent.drift.monitor import DriftWindow

__all__ = ["DriftWindowBuffer", "WindowItem", "window_nbytes"]

#: What the buffer holds: (model key, model version, the closed window).
WindowItem = tuple[str, int, DriftWindow]


def window_nbytes(item: WindowItem) -> int:
    """Estimated memory held by one buffered item: every object reachable from it (dataclass
    fields, mappings, sequences) by ``sys.getsizeof``, arrays with their data buffers (a view
    with the whole array it keeps alive), except the view's bin edges, which belong to the
    baseline and are shared by every window of the tensor.
    """
    # Keeps every object visited alive: one made on access (a mapping's value) and freed
    # could hand its id to the next and have it skipped.
    seen: dict[int, Any] = {}
    total = 0
    stack: list[Any] = [item]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen[id(obj)] = obj
        total += sys.getsizeof(obj)
        if isinstance(obj, np.ndarray):
            if obj.base is not None:  # a view keeps its whole base alive, counted once
                stack.append(obj.base)
        elif isinstance(obj, FeatureEdges):
            continue  # the baseline's, shared by every window of the tensor
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            stack.extend(getattr(obj, f.name) for f in dataclasses.fields(obj))
        elif isinstance(obj, Mapping):
            for key, value in obj.items():
                stack.append(key)
                stack.append(value)
        elif isinstance(obj, tuple | list | set | frozenset):
            stack.extend(obj)
    return total


class DriftWindowBuffer:
    """Closed drift windows, oldest first, within ``max_bytes``; see the module doc.

    Args:
        max_bytes: The budget for the windows held (estimated by ``window_nbytes``).

    Raises:
        ValueError: (from the constructor) ``max_bytes`` is not a positive integer.
    """

    def __init__(self, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._items: deque[tuple[WindowItem, int]] = deque()
        self._nbytes = 0
        self._dropped = 0

    def append(self, item: WindowItem) -> None:
        """Add the newest window, dropping the oldest ones (counted) to stay within budget."""
        size = window_nbytes(item)
        with self._lock:
            if size > self.max_bytes:
                self._dropped += 1
                return
            self._items.append((item, size))
            self._nbytes += size
            self._shed()

    def drain(self) -> list[WindowItem]:
        """Take every window held, oldest first (the buffer is empty afterwards)."""
        with self._lock:
            out = [item for item, _ in self._items]
            self._items.clear()
            self._nbytes = 0
            return out

    def put_back(self, items: Iterable[WindowItem]) -> None:
        """Return drained windows, oldest first, in front of any appended since (a report
        that could not be recorded); the oldest are dropped (counted) if they no longer fit."""
        sized = [(item, window_nbytes(item)) for item in items]
        with self._lock:
            for item, size in reversed(sized):
                if size > self.max_bytes:
                    self._dropped += 1
                    continue
                self._items.appendleft((item, size))
                self._nbytes += size
            self._shed()

    def _shed(self) -> None:
        while self._nbytes > self.max_bytes:
            _, size = self._items.popleft()
            self._nbytes -= size
            self._dropped += 1

    @property
    def dropped(self) -> int:
        """Windows dropped to keep the budget since the buffer was created (cumulative)."""
        with self._lock:
            return self._dropped

    @property
    def nbytes(self) -> int:
        """Estimated memory of the windows held (never above ``max_bytes``)."""
        with self._lock:
            return self._nbytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __bool__(self) -> bool:
        return len(self) > 0

    def __iter__(self) -> Iterator[WindowItem]:
        """The windows held now, oldest first (a copy: safe while others append or drain)."""
        with self._lock:
            return iter([item for item, _ in self._items])
