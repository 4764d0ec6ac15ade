"""Report coalescing: plain reports share a message, anything urgent leaves at once.

The rule (``edge_agent.sync.coalesce``) on its own, then through a real ``Uplink`` and
``Outbox`` on a ``FakeClock``: a quiet device's reports leave ``report_coalesce_seconds``
apart in one batch, while an event, an alerting drift window, a model on probation or in
shadow, a full half-batch and a resend are never held.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clock import FakeClock
from edge_agent.config import SyncConfig
from edge_agent.errors import ConfigError
from edge_agent.sync.coalesce import CoalescePolicy, urgent
from edge_agent.sync.outbox import Outbox
from edge_agent.sync.uplink import Uplink
from edge_agent.wire.telemetry import Batch, Event, TelemetryAck, TelemetryReport

FIXTURE = Path(__file__).parents[1] / "fixtures" / "telemetry" / "report-v1.json"
DEV = "dev-1"


def report(**model: Any) -> TelemetryReport:
    """The golden report, made plain (no probation, shadow or alert) unless ``model`` says."""
    d = json.loads(FIXTURE.read_text())
    m = d["models"]["digits"]
    m.update(on_probation=False, shadow=None)
    for w in m["drift"]:
        w.update(alert=False, drifted=[])
    m.update(model)
    return TelemetryReport.from_dict({**d, "device_id": DEV, "seq": 0})


def event() -> Event:
    return Event(DEV, 0, "installed", 1.0, model="digits", version=3)


class Wire:
    def __init__(self) -> None:
        self.sent: list[Batch] = []

    def __call__(self, topic: str, payload: bytes) -> None:
        self.sent.append(Batch.from_bytes(payload))


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox.db", 1 << 20) as b:
        yield b


def uplink(box: Outbox, wire: Wire, clock: FakeClock, coalesce: float = 120.0) -> Uplink:
    return Uplink(
        box,
        wire,
        device_id=DEV,
        telemetry_topic="p/telemetry",
        clock=clock,
        ack_timeout=5.0,
        coalesce_seconds=coalesce,
    )


def test_what_is_urgent() -> None:
    assert not urgent(report())
    assert urgent(event())
    assert urgent(report(on_probation=True))
    shadow = json.loads(FIXTURE.read_text())["models"]["digits"]["shadow"]
    assert urgent(report(shadow=shadow))
    alerting = report()
    windows = alerting.models["digits"].drift
    alert = dataclasses.replace(windows[0], alert=True)
    stats = dataclasses.replace(alerting.models["digits"], drift=(alert,))
    assert urgent(dataclasses.replace(alerting, models={"digits": stats}))


def test_the_rule_holds_only_small_plain_batches_and_only_for_max_delay() -> None:
    p = CoalescePolicy(max_delay=120.0, max_bytes=1000)
    plain = [report(), report()]
    assert p.hold(plain, 500, None, 0.0)
    assert p.hold(plain, 500, 0.0, 119.9)
    assert not p.hold(plain, 500, 0.0, 120.0)  # held long enough
    assert not p.hold(plain, 1000, None, 0.0)  # half a batch: it leaves
    assert not p.hold([*plain, event()], 500, None, 0.0)  # an event takes them along
    assert not p.hold([report(on_probation=True)], 500, None, 0.0)
    assert not CoalescePolicy().hold(plain, 500, None, 0.0)  # off by default
    assert not p.hold([], 0, None, 0.0)


def test_quiet_reports_leave_together_every_max_delay(box: Outbox) -> None:
    wire, clock = Wire(), FakeClock()
    up = uplink(box, wire, clock)
    for _ in range(4):  # one report every 30 s, the uplink pumped as the sync loop does
        up.add_report(report())
        assert not up.pump()
        clock.advance(30.0)
    assert up.pump()  # 120 s after the first was held
    assert [i.seq for i in wire.sent[0].items] == [1, 2, 3, 4]
    assert up.stats().batches_held == 1
    up.on_ack(TelemetryAck(DEV, 4).to_bytes())
    assert box.stats().entries == 0
    up.add_report(report())  # the next batch is held afresh
    assert not up.pump()
    assert len(wire.sent) == 1


def test_an_event_leaves_at_once_with_the_held_reports(box: Outbox) -> None:
    wire, clock = Wire(), FakeClock()
    up = uplink(box, wire, clock)
    up.add_report(report())
    assert not up.pump()
    clock.advance(30.0)
    up.add_report(report())
    up.add_event(event())
    assert up.pump()
    assert [type(i).__name__ for i in wire.sent[0].items] == [
        "TelemetryReport",
        "TelemetryReport",
        "Event",
    ]


def test_an_urgent_report_is_not_held(box: Outbox) -> None:
    wire, clock = Wire(), FakeClock()
    up = uplink(box, wire, clock)
    up.add_report(report())
    assert not up.pump()
    up.add_report(report(on_probation=True))  # a canary being judged: the server waits on it
    assert up.pump()
    assert [i.seq for i in wire.sent[0].items] == [1, 2]


def test_a_resend_is_not_held_and_no_coalescing_sends_each_report(
    box: Outbox, tmp_path: Path
) -> None:
    wire, clock = Wire(), FakeClock()
    up = uplink(box, wire, clock)
    up.add_report(report())
    assert not up.pump()  # held
    clock.advance(120.0)
    assert up.pump()  # sent
    assert not up.pump()
    up.add_report(report())
    assert not up.pump()  # one batch in flight, no ack yet
    clock.advance(5.1)
    assert up.pump()  # the ack timed out: resent at once, plain reports or not
    assert [i.seq for i in wire.sent[-1].items] == [1, 2]
    plain_wire = Wire()
    with Outbox(tmp_path / "other.db", 1 << 20) as other:
        every = uplink(other, plain_wire, clock, coalesce=0.0)
        every.add_report(report())
        assert every.pump()


def test_a_batch_sent_before_a_reconnect_is_sent_again_at_once(box: Outbox) -> None:
    wire, clock = Wire(), FakeClock()
    up = uplink(box, wire, clock)
    up.add_report(report())
    assert not up.pump()  # held
    clock.advance(120.0)
    assert up.pump()  # sent; the connection drops before its ack
    up.reset_in_flight()  # reconnected: what was in flight goes again at once
    assert up.pump()
    assert [i.seq for i in wire.sent[-1].items] == [1]
    up.on_ack(TelemetryAck(DEV, 1).to_bytes())
    up.add_report(report())  # a report never sent before is held as usual
    assert not up.pump()


def test_the_config_key_is_bounded() -> None:
    SyncConfig(report_coalesce_seconds=120.0).validate()
    for bad in (-1.0, 3601.0):
        with pytest.raises(ConfigError, match="report_coalesce_seconds"):
            SyncConfig(report_coalesce_seconds=bad).validate()


def test_a_held_batch_is_not_reread_until_the_outbox_changes(
    box: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    wire, clock = Wire(), FakeClock()
    up = uplink(box, wire, clock)
    reads = 0
    pending = box.pending

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return pending(*args, **kwargs)

    monkeypatch.setattr(box, "pending", counted)
    up.add_report(report())
    assert not up.pump()
    for _ in range(50):  # the sync loop's ticks while the batch is held
        clock.advance(0.2)
        assert not up.pump()
    assert reads == 1
    up.add_event(event())  # appended: read again, and the event takes the report along
    assert up.pump()
    assert reads == 2
    assert [i.seq for i in wire.sent[0].items] == [1, 2]
