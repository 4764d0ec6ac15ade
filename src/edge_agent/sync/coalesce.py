"""When the uplink may hold telemetry back so that several reports share one message.

Owns the coalescing rule. Every message costs its own MQTT header, topic, TLS record, the
server's ack and a fresh DEFLATE stream (the packed encoding's dictionary helps, but keys and
edges repeat across reports of one stream much better), so one message per few reports is
cheaper than one per report. The rule holds a batch back only when nothing in it is urgent and
it is small:

- only reports are pending (any event leaves at once and takes the held reports with it: a
  model installed or refused, a drift alert, dropped telemetry, the fallback breaker, ...);
- no report is urgent: none has a drift window whose verdict alerts, a model on probation
  (a freshly installed version being judged, e.g. a rollout's canary) or a shadow comparison
  (a candidate being compared before a rollout): the server's decisions wait on those;
- the pending reports take less than half a batch (``max_bytes / 2`` of JSON);
- and the batch has been held for less than ``max_delay`` seconds.

With ``max_delay`` at ``k`` report intervals a quiet device sends one message per ``k``
reports. Resends of a batch in flight and acks are never held (the uplink only asks before a
first send). Pure: the caller passes the pending items, their size and the clock readings.

Does not own the outbox, the batch or any clock (``uplink.Uplink`` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edge_agent.wire.telemetry import Event, TelemetryReport

__all__ = ["CoalescePolicy", "urgent"]


def urgent(item: TelemetryReport | Event) -> bool:
    """True for an item that must leave at once (see the module doc)."""
    if not isinstance(item, TelemetryReport):
        return True
    return any(
        m.on_probation or m.shadow is not None or any(w.alert for w in m.drift)
        for m in item.models.values()
    )


@dataclass(frozen=True)
class CoalescePolicy:
    """How long and how much telemetry the uplink may hold back.

    Attributes:
        max_delay: Seconds a batch may wait for more reports (0: every batch leaves at once).
        max_bytes: Pending JSON bytes at which a batch leaves (the uplink's batch size / 2).
    """

    max_delay: float = 0.0
    max_bytes: int = 96 * 1024

    def hold(
        self,
        items: Sequence[TelemetryReport | Event],
        size: int,
        held_since: float | None,
        now: float,
    ) -> bool:
        """Whether to hold ``items`` (``size`` bytes of stored JSON) back at ``now``;
        ``held_since`` is when the uplink first held them (None: not yet)."""
        if self.max_delay <= 0 or not items or size >= self.max_bytes:
            return False
        if held_since is not None and now - held_since >= self.max_delay:
            return False
        return not any(urgent(item) for item in items)
