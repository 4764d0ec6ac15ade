"""What the device puts into its telemetry outbox: agent events and the periodic report.

Owns turning the agent's view into telemetry entries: events queued by any thread (the
registry's and the cloud fallback's event sinks, the deployer, desired-state refusals) become
``Event`` entries; a report (``wire.telemetry.report_from_status``) carries the agent's status,
the drift windows closed since the last one, process resources and what the outbox and uplink
dropped. A report carries each model's newest ``MAX_WINDOWS`` drift windows (one that would
not fit one telemetry message keeps the newest half of them); the windows left out are counted
in ``telemetry_dropped["drift_windows"]``, with those the agent's buffer dropped to stay within
its memory budget (``common.drift_buffer``). Windows that start a drift alert add a
``drift_alert`` event.

Does not decide when a report is due or send anything (``loop`` schedules, ``uplink.Uplink``
sends acknowledged batches from the outbox). Runs on the sync thread, except ``event`` and the
queue's ``put``, which any thread may call.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path

from edge_agent.common.drift_buffer import WindowItem
from edge_agent.errors import EdgefleetError
from edge_agent.serving.agent import Agent
from edge_agent.sync.outbox import Outbox
from edge_agent.sync.uplink import MAX_ITEM_BYTES, Uplink
from edge_agent.wire.telemetry import Resources, event_from_registry, report_from_status
from edge_agent.wire.telemetry_build import drift_alert_entries
from edge_agent.wire.telemetry_drift import MAX_WINDOWS

__all__ = ["MAX_REPORT_BYTES", "TelemetryFeed"]

log = logging.getLogger("edge_agent.sync.loop")

#: A report must fit one telemetry message with room to spare for the batch around it.
MAX_REPORT_BYTES = MAX_ITEM_BYTES
#: Events kept in memory for a support bundle.
RECENT_EVENTS = 200


class TelemetryFeed:
    """Feeds one device's events and reports into its uplink; see the module doc.

    Args:
        agent: read for its status, drift windows and model memory.
        outbox: read for what it dropped.
        uplink: takes the entries.
        events: the queue of registry-style event entries (shared with the event sinks).
        device_id: the device the entries name.
        clock: wall-clock seconds for the report's window.
    """

    def __init__(
        self,
        agent: Agent,
        outbox: Outbox,
        uplink: Uplink,
        events: queue.SimpleQueue[dict[str, object]],
        *,
        device_id: str,
        clock: Callable[[], float],
    ) -> None:
        self._agent = agent
        self._outbox = outbox
        self._uplink = uplink
        self._events = events
        self._device_id = device_id
        self._clock = clock
        self._windows_dropped = 0
        self._window_start = clock()
        #: The newest events handed to the uplink (a support bundle's ``events.jsonl``).
        self.recent: deque[dict[str, object]] = deque(maxlen=RECENT_EVENTS)

    def event(self, model: str | None, version: int | None, kind: str, detail: str) -> None:
        """Queue one event (any thread)."""
        self._events.put(
            {"model": model, "version": version, "event": kind, "detail": detail, "at": time.time()}
        )

    def drain_events(self) -> None:
        """Hand every queued event to the uplink (an entry that cannot be recorded is logged)."""
        while True:
            try:
                entry = self._events.get_nowait()
            except queue.Empty:
                return
            self.recent.append(entry)
            try:
                event = event_from_registry(self._device_id, 0, entry)
                if event is not None:
                    self._uplink.add_event(event)
            except EdgefleetError as exc:
                log.error("event not recorded: %s", exc)

    def add_report(self) -> None:
        """Record one report covering the time since the last; never raises (the drift windows
        are kept for the next report when this one cannot be recorded)."""
        buffer = self._agent.drift_windows
        windows = buffer.drain()
        now = self._clock()
        try:
            dropped = {kind: d.entries for (_p, kind), d in self._outbox.dropped().items()}
            up = self._uplink.stats()
            if up.unsendable_dropped:
                dropped["unsendable"] = up.unsendable_dropped
            status = self._agent.status()
            resources = process_resources(self._agent.registry.memory_used())
            # A report carries at most MAX_WINDOWS per model: keep each model's newest.
            kept, too_big = newest_per_model(windows, MAX_WINDOWS)
            # too_big is counted only once the report is recorded (else all are put back).
            buffer_dropped = buffer.dropped
            while True:
                # Cumulative, like the outbox's: too many or too big for a message, or over the
                # buffer's memory budget while no report drained it.
                windows_dropped = self._windows_dropped + too_big + buffer_dropped
                if windows_dropped:
                    dropped["drift_windows"] = windows_dropped
                report = report_from_status(
                    self._device_id,
                    0,
                    status,
                    kept,
                    now,
                    window_start=self._window_start,
                    resources=resources,
                    telemetry_dropped=dropped,
                )
                if len(report.to_bytes()) <= MAX_REPORT_BYTES or not kept:
                    break
                # Too many or too wide drift windows for one message: keep the newest half
                # and count the rest (a report the server would refuse would jam the outbox).
                too_big += len(kept) - len(kept) // 2
                kept = kept[len(kept) - len(kept) // 2 :] if len(kept) > 1 else []
            self._uplink.add_report(report)
        except EdgefleetError as exc:
            # Keep the windows for the next report (the outbox may be full for a moment).
            buffer.put_back(windows)
            log.error("telemetry report not recorded: %s", exc)
            return
        self._windows_dropped += too_big
        self._window_start = now
        for entry in drift_alert_entries(windows, now):  # once: windows are not re-read now
            self._events.put(entry)


def newest_per_model(windows: list[WindowItem], limit: int) -> tuple[list[WindowItem], int]:
    """The windows without each model key's oldest beyond ``limit`` (order kept), and how
    many were left out."""
    per_key = Counter(key for key, _, _ in windows)
    skip = {key: n - limit for key, n in per_key.items() if n > limit}
    kept = []
    for item in windows:
        if skip.get(item[0], 0) > 0:
            skip[item[0]] -= 1
            continue
        kept.append(item)
    return kept, len(windows) - len(kept)


def process_resources(model_memory: int) -> Resources:
    """This process's resident memory and CPU time, with the models' memory."""
    rss = 0
    try:
        statm = Path("/proc/self/statm").read_text()
        rss = int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return Resources(
        rss_bytes=rss, cpu_seconds=t.user + t.system, model_memory_bytes=max(0, model_memory)
    )
