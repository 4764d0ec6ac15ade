"""What the device puts into its telemetry outbox: agent events and the periodic report.

Owns turning the agent's view into telemetry entries: events queued by any thread (the
registry's and the cloud fallback's event sinks, the deployer, desired-state refusals) become
``Event`` entries; a report (``wire.telemetry.report_from_status``) carries the agent's status,
the drift windows closed since the last one, process resources and what the outbox and uplink
dropped. A report that would not fit one telemetry message keeps the newest half of its drift
windows and counts the rest; windows that start a drift alert add a ``drift_alert`` event.

Does not decide when a report is due or send anything (``loop`` schedules, ``uplink.Uplink``
sends acknowledged batches from the outbox). Runs on the sync thread, except ``event`` and the
queue's ``put``, which any thread may call.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections.abc import Callable
from pathlib import Path

from edge_agent.errors import EdgefleetError
from edge_agent.serving.agent import Agent
from edge_agent.sync.outbox import Outbox
from edge_agent.sync.uplink import MAX_ITEM_BYTES, Uplink
from edge_agent.wire.telemetry import Resources, event_from_registry, report_from_status
from edge_agent.wire.telemetry_build import drift_alert_entries

__all__ = ["MAX_REPORT_BYTES", "TelemetryFeed"]

log = logging.getLogger("edge_agent.sync.loop")

#: A report must fit one telemetry message with room to spare for the batch around it.
MAX_REPORT_BYTES = MAX_ITEM_BYTES


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
            try:
                event = event_from_registry(self._device_id, 0, entry)
                if event is not None:
                    self._uplink.add_event(event)
            except EdgefleetError as exc:
                log.error("event not recorded: %s", exc)

    def add_report(self) -> None:
        """Record one report covering the time since the last; never raises (the drift windows
        are kept for the next report when this one cannot be recorded)."""
        windows = []
        while self._agent.drift_windows:
            try:
                windows.append(self._agent.drift_windows.popleft())
            except IndexError:
                break
        now = self._clock()
        try:
            dropped = {kind: d.entries for (_p, kind), d in self._outbox.dropped().items()}
            up = self._uplink.stats()
            if up.unsendable_dropped:
                dropped["unsendable"] = up.unsendable_dropped
            status = self._agent.status()
            resources = process_resources(self._agent.registry.memory_used())
            kept = windows
            while True:
                if self._windows_dropped:
                    dropped["drift_windows"] = self._windows_dropped
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
                self._windows_dropped += len(kept) - len(kept) // 2
                kept = kept[len(kept) - len(kept) // 2 :] if len(kept) > 1 else []
            self._uplink.add_report(report)
        except EdgefleetError as exc:
            # Keep the windows for the next report (the outbox may be full for a moment).
            self._agent.drift_windows.extendleft(reversed(windows))
            log.error("telemetry report not recorded: %s", exc)
            return
        self._window_start = now
        for entry in drift_alert_entries(windows, now):  # once: windows are not re-read now
            self._events.put(entry)


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
