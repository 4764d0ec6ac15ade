"""Every documented event kind has a producer, and each is sent once.

The documented list (docs/telemetry.md), the schema's enum and ``EVENT_KINDS`` agree; the four
kinds that were documented but never sent have a producer: ``drift_alert`` (a drift window that
starts an alert episode), ``fallback_breaker_open``/``_closed`` (``tests/unit/test_fallback``)
and ``telemetry_dropped`` (the outbox dropped entries for lack of space). An event leaves only
in an acknowledged batch (never a second copy on ``.../events``); ``seq`` starts at 1.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from edge_agent.drift import DriftMonitor, MonitorPolicy, build_baseline
from edge_agent.errors import NotConnectedError
from edge_agent.sync.outbox import Outbox
from edge_agent.sync.uplink import Uplink
from edge_agent.wire.telemetry import (
    EVENT_KINDS,
    Batch,
    Event,
    TelemetryAck,
    TelemetryReport,
    event_from_registry,
)
from edge_agent.wire.telemetry_build import drift_alert_entries

DEV = "dev-a"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "telemetry.md"


class Wire:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.offline = False

    def __call__(self, topic: str, payload: bytes) -> None:
        if self.offline:
            raise NotConnectedError("offline")
        self.sent.append((topic, payload))

    def items(self) -> list[TelemetryReport | Event]:
        assert all(t.endswith("/telemetry") for t, _ in self.sent), "only the telemetry topic"
        return [i for _, p in self.sent for i in Batch.from_bytes(p).items]


def _uplink(box: Outbox, wire: Wire) -> Uplink:
    return Uplink(box, wire, device_id=DEV, telemetry_topic="p/devices/dev-a/telemetry")


def _report(t: float) -> TelemetryReport:
    return TelemetryReport(device_id=DEV, seq=0, window_start=t, window_end=t + 1)


def test_documented_kinds_match_the_schema_and_the_code() -> None:
    schema = json.loads(
        resources.files("edge_agent").joinpath("schemas/event.schema.json").read_text()
    )
    enum = set(schema["properties"]["kind"]["enum"])
    lines = DOCS.read_text().splitlines()
    row = next(line for line in lines if line.startswith("| `kind` | string |"))
    documented = set(re.findall(r"`([a-z_]+)`", row)) - {"kind"}
    assert documented == enum == set(EVENT_KINDS)
    # ... and the table of when each kind is sent names every one of them, once
    first = lines.index("| `kind` | sent when |") + 2
    rows = [line for line in lines[first:] if line.startswith("|")][: len(enum)]
    rows = rows[: next((i for i, r in enumerate(rows) if not r.startswith("| `")), len(rows))]
    when = [k for row in rows for k in re.findall(r"`([a-z_]+)`", row.split("|")[1])]
    assert sorted(when) == sorted(enum)


def test_an_event_is_sent_once_in_a_batch_and_seq_starts_at_one(tmp_path: Path) -> None:
    wire = Wire()
    with Outbox(tmp_path / "outbox.db", 1 << 20) as box:
        up = _uplink(box, wire)
        first = up.add_event(Event(DEV, 0, "installed", 5.0, model="m", version=1))
        assert first.seq == 1  # the documented start
        assert wire.sent == []  # nothing on .../events
        assert up.pump()
        items = wire.items()
    assert [(i.seq, i.kind) for i in items if isinstance(i, Event)] == [(1, "installed")]


def test_outbox_drops_are_announced_once_by_a_telemetry_dropped_event(tmp_path: Path) -> None:
    wire = Wire()
    with Outbox(tmp_path / "outbox.db", 4096) as box:
        up = _uplink(box, wire)
        up.add_report(_report(100.0))
        assert not [e for e in box.pending(1000, 1 << 20) if e.kind == "event"]
        wire.offline = True  # nothing leaves: the outbox fills and drops the oldest reports
        for t in range(40):
            up.add_report(_report(200.0 + t))
        events = [
            Event.from_dict({**json.loads(e.payload), "seq": e.seq})
            for e in box.pending(1000, 1 << 20)
            if e.kind == "event"
        ]
        box_drops = box.dropped()
        dropped = sum(d.entries for d in box_drops.values())
    assert dropped > 0
    # One notice while offline (it waits for its ack): notices never crowd the reports out.
    assert [e.kind for e in events] == ["telemetry_dropped"]
    assert re.search(r"\d+ report\(s\) dropped", events[0].detail)
    assert events[0].at >= 200.0
    assert ("event", "event") not in box_drops


def test_the_next_notice_follows_the_ack_of_the_last(tmp_path: Path) -> None:
    wire = Wire()
    with Outbox(tmp_path / "outbox.db", 4096) as box:
        up = _uplink(box, wire)
        wire.offline = True
        for t in range(30):
            up.add_report(_report(200.0 + t))
        wire.offline = False
        while up.pump():  # online again: every batch is acknowledged
            up.on_ack(TelemetryAck(DEV, wire.items()[-1].seq).to_bytes())
        notices = [i for i in wire.items() if isinstance(i, Event)]
        assert len(notices) == 1
        wire.offline = True
        for t in range(30):
            up.add_report(_report(300.0 + t))
        later = [e for e in box.pending(1000, 1 << 20) if e.kind == "event"]
    assert len(later) == 1
    assert b"telemetry_dropped" in later[0].payload


def test_no_drops_no_event(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", 1 << 20) as box:
        up = _uplink(box, Wire())
        for t in range(5):
            up.add_report(_report(float(t)))
        assert {e.kind for e in box.pending(100, 1 << 20)} == {"report"}


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    data = np.asarray(load_digits().data, dtype=np.float32)
    return data[np.random.default_rng(0).permutation(len(data))]


def test_drift_alert_once_per_alert_episode(images: np.ndarray) -> None:
    baseline = build_baseline({"image": images[:1000]}, {}, n_bins=10)
    monitor = DriftMonitor(baseline, MonitorPolicy(max_values=200, max_seconds=1e9))
    calm = images[1000:1400]
    shifted = np.clip(images[1000:1600] * 0.2 + 10.0, 0, 16)
    windows = [
        *monitor.observe("image", calm, 1.0),  # 2 windows, no alert
        *monitor.observe("image", shifted, 2.0),  # 3 windows, all alert: one episode
        *monitor.observe("image", calm, 3.0),  # back to normal
        *monitor.observe("image", shifted[:200], 4.0),  # a new episode
    ]
    alerts = [w.verdict.alert for w in windows]
    assert alerts == [False, False, True, True, True, False, False, True]
    assert [w.alert_started for w in windows] == [a and i in (2, 7) for i, a in enumerate(alerts)]
    assert "alert_started" not in windows[2].to_dict()  # the report's wire format is unchanged

    keyed = [("digits@3", 3, w) for w in windows]
    entries = drift_alert_entries(keyed, 1_795_000_000.0)
    assert len(entries) == 2
    for entry in entries:
        event = event_from_registry(DEV, 0, entry)
        assert event is not None
        assert (event.kind, event.model, event.version) == ("drift_alert", "digits", 3)
        assert event.at == 1_795_000_000.0
        assert "'image'" in event.detail
        assert "drifted" in event.detail
