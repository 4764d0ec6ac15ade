"""Ack-timeout backoff of the uplink: consecutive resends wait longer, full jitter, up to a cap.

``ack_wait`` on its own (the window for each resend count), then a real ``Uplink`` and
``Outbox`` on a ``FakeClock`` with scripted random draws (no sleeps): the first resend comes
after exactly ``ack_timeout``, later ones after a wait drawn in a window that doubles up to
``ack_timeout_max``, an ack that makes progress starts over, a stale ack does not, and the
``[sync] ack_timeout_max_seconds`` key refuses hostile values.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from clock import FakeClock
from edge_agent.config import SyncConfig, load_config
from edge_agent.errors import ConfigError
from edge_agent.sync.outbox import Outbox
from edge_agent.sync.uplink import Uplink, ack_wait
from edge_agent.wire.telemetry import Batch, TelemetryAck, TelemetryReport

DEV = "dev-a"


class Wire:
    def __init__(self) -> None:
        self.sent: list[Batch] = []

    def __call__(self, topic: str, payload: bytes) -> None:
        self.sent.append(Batch.from_bytes(payload))


class Draws:
    """Scripted ``random.random``: returns the values given, in order, then the last one."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox.db", 1 << 20) as b:
        yield b


def _report(t: float = 1.0) -> TelemetryReport:
    return TelemetryReport(device_id=DEV, seq=0, window_start=t, window_end=t + 1)


def _uplink(box: Outbox, wire: Wire, clock: FakeClock, rand: Draws, cap: float = 80.0) -> Uplink:
    return Uplink(
        box,
        wire,
        device_id=DEV,
        telemetry_topic="p/devices/dev-a/telemetry",
        ack_timeout=10.0,
        ack_timeout_max=cap,
        clock=clock,
        rand=rand,
    )


def _resend_after(up: Uplink, clock: FakeClock, wait: float) -> None:
    """The batch in flight is not resent just before ``wait`` s and is resent at ``wait``."""
    start = clock.now
    clock.now = start + wait - 0.01
    assert not up.pump(), f"resent before {wait} s"
    clock.now = start + wait
    assert up.pump(), f"not resent at {wait} s"


@pytest.mark.parametrize(
    ("resends", "rand", "expected"),
    [
        (0, 0.0, 10.0),  # the first send waits exactly ack_timeout, whatever the draw
        (0, 0.99, 10.0),
        (1, 0.0, 10.0),  # the window is [10, 20]
        (1, 0.5, 15.0),
        (1, 1.0, 20.0),
        (2, 0.5, 25.0),  # [10, 40]
        (3, 1.0, 80.0),  # [10, 80] = the cap
        (4, 1.0, 80.0),  # capped
        (10_000, 0.5, 45.0),  # huge counts do not overflow
    ],
)
def test_ack_wait_windows(resends: int, rand: float, expected: float) -> None:
    assert ack_wait(resends, 10.0, 80.0, rand) == pytest.approx(expected)


def test_a_cap_at_or_below_the_timeout_is_a_fixed_timeout() -> None:
    for cap in (10.0, 5.0):
        for n in (0, 1, 7):
            assert ack_wait(n, 10.0, cap, 0.99) == 10.0


def test_consecutive_timeouts_back_off_up_to_the_cap(box: Outbox) -> None:
    wire, clock = Wire(), FakeClock()
    rand = Draws(0.3, 0.5, 0.5, 1.0, 1.0, 0.0)  # one draw per publish
    up = _uplink(box, wire, clock, rand)
    up.add_report(_report())
    assert up.pump()  # first send: waits exactly 10 s (draw 0.3 ignored: window [10, 10])
    _resend_after(up, clock, 10.0)  # resend 1, draw 0.5 in [10, 20]
    _resend_after(up, clock, 15.0)  # resend 2, draw 0.5 in [10, 40]
    _resend_after(up, clock, 25.0)  # resend 3, draw 1.0 in [10, 80]
    _resend_after(up, clock, 80.0)  # resend 4, draw 1.0 in [10, 80]: capped
    _resend_after(up, clock, 80.0)  # resend 5, draw 0.0
    _resend_after(up, clock, 10.0)  # full jitter: as short as the ack timeout
    assert up.stats().resends == 6
    assert [b.items[0].seq for b in wire.sent] == [1] * 7


def test_an_ack_resets_the_backoff(box: Outbox) -> None:
    wire, clock = Wire(), FakeClock()
    up = _uplink(box, wire, clock, Draws(1.0))
    up.add_report(_report())
    assert up.pump()
    _resend_after(up, clock, 10.0)
    _resend_after(up, clock, 20.0)
    _resend_after(up, clock, 40.0)  # three timeouts: the next wait would be 80
    up.add_report(_report(2.0))
    up.on_ack(TelemetryAck(DEV, 1).to_bytes())  # progress: the next batch leaves at once
    assert [i.seq for i in wire.sent[-1].items] == [2]
    _resend_after(up, clock, 10.0)  # the backoff started over
    _resend_after(up, clock, 20.0)


def test_an_ack_without_progress_does_not_reset_the_backoff(box: Outbox) -> None:
    wire, clock = Wire(), FakeClock()
    up = _uplink(box, wire, clock, Draws(1.0))
    up.add_report(_report())
    assert up.pump()
    _resend_after(up, clock, 10.0)
    _resend_after(up, clock, 20.0)
    up.on_ack(TelemetryAck(DEV, 0).to_bytes())  # a stale ack: neither progress nor a reset
    _resend_after(up, clock, 40.0)
    assert len(box.pending()) == 1


def test_a_reconnect_sends_at_once_but_keeps_the_backoff(box: Outbox) -> None:
    wire, clock = Wire(), FakeClock()
    up = _uplink(box, wire, clock, Draws(1.0))
    up.add_report(_report())
    assert up.pump()
    _resend_after(up, clock, 10.0)
    _resend_after(up, clock, 20.0)
    up.reset_in_flight()  # a new session: what was in flight goes again at once
    assert up.pump()
    _resend_after(up, clock, 40.0)  # two timeouts so far, still no answer: window [10, 40]


def test_without_a_cap_the_timeout_is_fixed(box: Outbox) -> None:
    wire, clock = Wire(), FakeClock()
    up = Uplink(
        box, wire, device_id=DEV, telemetry_topic="t", ack_timeout=5.0, clock=clock
    )  # ack_timeout_max not given: the old fixed interval
    up.add_report(_report())
    assert up.pump()
    for _ in range(5):
        _resend_after(up, clock, 5.0)


def test_nothing_is_lost_or_sent_twice_once_acks_come_back(box: Outbox) -> None:
    """Backoff only delays resends: every report leaves, in order, and is deleted on its ack."""
    wire, clock = Wire(), FakeClock()
    up = _uplink(box, wire, clock, Draws(0.7))
    for t in range(5):
        up.add_report(_report(float(t)))
    assert up.pump()
    for _ in range(4):  # an outage: four timeouts, nothing acked
        clock.now += 80.0
        assert up.pump()
    up.on_ack(TelemetryAck(DEV, 5).to_bytes())
    assert box.pending() == []
    first_sends = {tuple(i.seq for i in b.items) for b in wire.sent}
    assert first_sends == {(1, 2, 3, 4, 5)}
    assert up.stats().resends == 4
    assert up.stats().acked_entries == 5


def test_the_default_cap_is_valid_and_backs_off() -> None:
    cfg = SyncConfig()
    cfg.validate()
    assert cfg.ack_timeout_max_seconds > cfg.ack_timeout_seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "sync.ack_timeout_max_seconds must be in"),
        ("0.0", "sync.ack_timeout_max_seconds must be in"),
        ("-1", "sync.ack_timeout_max_seconds must be in"),
        ("-1e300", "sync.ack_timeout_max_seconds must be in"),
        ("3600.5", "sync.ack_timeout_max_seconds must be in"),
        ("1e308", "sync.ack_timeout_max_seconds must be in"),
        ("nan", "sync.ack_timeout_max_seconds must be a finite number"),
        ("inf", "sync.ack_timeout_max_seconds must be a finite number"),
        ("true", "sync.ack_timeout_max_seconds must be float"),
        ('"60s"', "sync.ack_timeout_max_seconds must be float"),
        ("[60]", "sync.ack_timeout_max_seconds must be float"),
        ("{}", "sync.ack_timeout_max_seconds must be float"),
    ],
)
def test_config_refuses_hostile_ack_timeout_max(tmp_path: Path, value: str, message: str) -> None:
    f = tmp_path / "a.toml"
    f.write_text(f"[sync]\nack_timeout_max_seconds = {value}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(f, {})
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"EDGEFLEET_AGENT__SYNC__ACK_TIMEOUT_MAX_SECONDS": value})


@pytest.mark.parametrize("value", ["1", "10", "60", "3600", "0.5"])
def test_config_accepts_sane_caps(tmp_path: Path, value: str) -> None:
    f = tmp_path / "a.toml"
    f.write_text(f"[sync]\nack_timeout_max_seconds = {value}\n")
    assert load_config(f, {}).sync.ack_timeout_max_seconds == float(value)
