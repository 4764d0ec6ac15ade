"""The device's sync building blocks: download pacing, the telemetry uplink, reported state."""

from __future__ import annotations

import hashlib
import json
import random
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from clock import FakeClock
from edge_agent.errors import (
    ContractError,
    DigestMismatchError,
    NotConnectedError,
    TransferMismatchError,
)
from edge_agent.sync.download import Download
from edge_agent.sync.outbox import Outbox
from edge_agent.sync.uplink import MAX_ITEM_BYTES, Uplink
from edge_agent.trust.assignment import ModelAssignment
from edge_agent.wire.reported import ModelReport, ReportedState, TransferReport
from edge_agent.wire.telemetry import Batch, Event, TelemetryAck, TelemetryReport
from edge_agent.wire.transfer import MIN_BLOCK_SIZE, BlockData, BlockPlan

BS = MIN_BLOCK_SIZE
DEV = "dev-a"


def _assignment(data: bytes) -> ModelAssignment:
    return ModelAssignment(1, "stable", hashlib.sha256(data).hexdigest(), len(data), "0" * 64)


def _blocks(data: bytes) -> list[BlockData]:
    plan = BlockPlan(len(data), hashlib.sha256(data).hexdigest(), BS)
    out = []
    for i in range(plan.n_blocks):
        start, stop = plan.block_range(i)
        out.append(BlockData(plan.transfer_id, i, data[start:stop]))
    return out


@pytest.fixture
def data() -> bytes:
    return random.Random(7).randbytes(10 * BS + 123)  # 11 blocks


def _download(tmp_path: Path, data: bytes, clock: FakeClock, window: int = 4) -> Download:
    return Download("m", _assignment(data), tmp_path, window=window, retry_seconds=2.0, clock=clock)


# ------------------------------------------------------------------------------- download
def test_download_asks_a_window_at_a_time_then_finishes(tmp_path: Path, data: bytes) -> None:
    clock = FakeClock()
    dl = _download(tmp_path, data, clock)
    blocks = _blocks(data)
    req = dl.due_request()
    assert req is not None
    assert req.ranges == ((0, 4),)
    assert dl.due_request() is None  # window in flight
    for b in blocks[:3]:
        dl.accept(b)
    assert dl.due_request() is None  # one block of the window still missing
    dl.accept(blocks[3])
    req = dl.due_request()  # window complete: the next one at once
    assert req is not None
    assert req.ranges == ((4, 8),)
    for b in blocks[4:]:
        dl.accept(b)
    assert dl.complete
    assert dl.due_request() is None
    path = dl.finish()
    assert path.read_bytes() == data


def test_download_asks_again_after_silence(tmp_path: Path, data: bytes) -> None:
    clock = FakeClock()
    dl = _download(tmp_path, data, clock)
    blocks = _blocks(data)
    assert dl.due_request() is not None
    dl.accept(blocks[1])  # the others of the window were lost
    clock.now += 1.9
    assert dl.due_request() is None
    clock.now += 0.2
    req = dl.due_request()
    assert req is not None
    assert req.ranges == ((0, 1), (2, 5))


def test_download_stays_quiet_while_a_wave_streams(tmp_path: Path, data: bytes) -> None:
    clock = FakeClock()
    dl = _download(tmp_path, data, clock)
    blocks = _blocks(data)
    for b in blocks[4:6]:  # broadcast blocks nobody on this device asked for
        dl.accept(b)
    assert dl.due_request() is None
    clock.now += 0.6  # the wave went quiet
    req = dl.due_request()
    assert req is not None
    assert req.ranges == ((0, 4),)


def test_download_resumes_and_refuses_foreign_or_bad_blocks(tmp_path: Path, data: bytes) -> None:
    clock = FakeClock()
    blocks = _blocks(data)
    dl = _download(tmp_path, data, clock)
    for b in blocks[:5]:
        dl.accept(b)
    assert not dl.accept(blocks[0])  # duplicate
    assert dl.duplicates == 1
    other = _blocks(random.Random(8).randbytes(2 * BS))[0]
    with pytest.raises(TransferMismatchError):
        dl.accept(other)
    dl.close()
    again = _download(tmp_path, data, clock)
    assert again.resumed_blocks == 5
    assert again.received == 5
    req = again.due_request()
    assert req is not None
    assert req.ranges == ((5, 9),)


def test_download_of_wrong_bytes_is_discarded(tmp_path: Path, data: bytes) -> None:
    dl = _download(tmp_path, data, FakeClock())
    forged = bytearray(data)
    forged[5] ^= 1
    plan = dl.plan
    for i in range(plan.n_blocks):  # right transfer id and lengths, wrong content
        start, stop = plan.block_range(i)
        dl.accept(BlockData(plan.transfer_id, i, bytes(forged[start:stop])))
    with pytest.raises(DigestMismatchError):
        dl.finish()
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------- uplink
class Wire:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.offline = False

    def __call__(self, topic: str, payload: bytes) -> None:
        if self.offline:
            raise NotConnectedError("offline")
        self.sent.append((topic, payload))

    def batches(self) -> list[Batch]:
        return [Batch.from_bytes(p) for t, p in self.sent if t.endswith("/telemetry")]


def _report(t: float = 1.0) -> TelemetryReport:
    return TelemetryReport(device_id=DEV, seq=0, window_start=t, window_end=t + 1)


def _event(kind: str = "installed") -> Event:
    return Event(device_id=DEV, seq=0, kind=kind, at=5.0, model="m", version=2)


@pytest.fixture
def box(tmp_path: Path) -> Any:
    with Outbox(tmp_path / "outbox.db", 1 << 20) as b:
        yield b


def _uplink(box: Outbox, wire: Wire, clock: FakeClock, **kw: Any) -> Uplink:
    return Uplink(
        box,
        wire,
        device_id=DEV,
        telemetry_topic="p/devices/dev-a/telemetry",
        clock=clock,
        **kw,
    )


def _ack(upto: int) -> bytes:
    return TelemetryAck(DEV, upto).to_bytes()


def test_uplink_sends_one_batch_at_a_time_and_drains_on_ack(box: Outbox, tmp_path: Path) -> None:
    wire, clock = Wire(), FakeClock()
    up = _uplink(box, wire, clock, max_items=2)
    for i in range(3):
        up.add_report(_report(i))
    stored = up.add_event(_event())
    assert stored.seq == 4
    assert wire.sent == []  # one path: an event leaves only in an acknowledged batch
    assert up.pump()
    assert not up.pump()  # waits for the ack
    first = wire.batches()[0]
    assert [i.seq for i in first.items] == [1, 2]
    assert first.floor == 1
    up.on_ack(_ack(2))  # deletes 1-2 and sends the next batch at once
    second = wire.batches()[1]
    assert [i.seq for i in second.items] == [3, 4]
    assert second.floor == 3
    assert isinstance(second.items[1], Event)
    assert second.items[1].kind == "installed"
    up.on_ack(_ack(4))
    assert box.pending() == []
    assert len(wire.batches()) == 2
    assert up.stats().acked_entries == 4


def test_uplink_resends_when_no_ack_comes(box: Outbox) -> None:
    wire, clock = Wire(), FakeClock()
    up = _uplink(box, wire, clock, ack_timeout=5.0)
    up.add_report(_report())
    assert up.pump()
    clock.now += 4.9
    assert not up.pump()
    clock.now += 0.2
    assert up.pump()
    assert up.stats().resends == 1
    assert [b.items[0].seq for b in wire.batches()] == [1, 1]


def test_uplink_offline_keeps_everything(box: Outbox) -> None:
    wire, clock = Wire(), FakeClock()
    wire.offline = True
    up = _uplink(box, wire, clock)
    up.add_report(_report())
    up.add_event(_event())
    assert not up.pump()
    assert up.stats().publish_failures == 1
    wire.offline = False
    assert up.pump()
    assert [i.seq for i in wire.batches()[0].items] == [1, 2]


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        TelemetryAck("dev-b", 1).to_bytes(),  # someone else's ack
        TelemetryAck(DEV, 99).to_bytes(),  # beyond any seq assigned
    ],
)
def test_uplink_refuses_bad_acks(box: Outbox, payload: bytes) -> None:
    wire, clock = Wire(), FakeClock()
    up = _uplink(box, wire, clock)
    up.add_report(_report())
    up.pump()
    up.on_ack(payload)
    assert up.stats().bad_acks == 1
    assert len(box.pending()) == 1


@pytest.mark.parametrize(
    "entry",
    [
        b"{broken",
        b"[1]",  # JSON, but not an object
        b"1e400",
        b"[" * 5000 + b"]" * 5000,  # deeper than any JSON reader recurses
        b'{"type": "report", "n": 1' + b"0" * 5000 + b"}",
        b"\xff\xfe",
    ],
)
def test_uplink_skips_an_unreadable_entry_and_moves_the_floor(box: Outbox, entry: bytes) -> None:
    wire, clock = Wire(), FakeClock()
    up = _uplink(box, wire, clock)
    box.append("report", entry, "report")
    up.add_report(_report())
    assert up.pump()
    batch = wire.batches()[0]
    assert [i.seq for i in batch.items] == [2]
    assert batch.floor == 2
    assert up.stats().unreadable_entries == 1


# ------------------------------------------------------------------------------- reported
def _reported() -> ReportedState:
    return ReportedState(
        device_id=DEV,
        at=12.5,
        agent_version="0.1.0",
        desired_version=3,
        models={
            "digits": ModelReport(2, (2, 1), 3, "downloading", "", TransferReport(3, 2, 5, 300000)),
            "other": ModelReport(None, (), 1, "failed", "digest mismatch"),
        },
    )


def test_reported_state_round_trips_and_matches_its_schema() -> None:
    state = _reported()
    data = state.to_bytes()
    assert ReportedState.from_bytes(data) == state
    schema = json.loads(
        resources.files("edge_agent").joinpath("schemas/reported.schema.json").read_text()
    )
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(json.loads(data), schema)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("schema_version",), 2),
        (("type",), "report"),
        (("device_id",), "Dev_A"),
        (("models", "digits", "outcome"), "exploded"),
        (("models", "digits", "active"), -1),
        (("models", "digits", "transfer", "received_blocks"), 6),
        (("models", "digits", "kept"), list(range(17))),
    ],
)
def test_reported_state_refuses_bad_fields(path: tuple[str, ...], value: object) -> None:
    d = _reported().to_dict()
    node = d
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ContractError):
        ReportedState.from_bytes(json.dumps(d).encode())


def test_reported_state_refuses_oversized_payloads() -> None:
    with pytest.raises(ContractError):
        ReportedState.from_bytes(b" " * (64 * 1024 + 1))


def test_uplink_never_jams_on_a_window_of_unsendable_entries(box: Outbox) -> None:
    wire, clock = Wire(), FakeClock()
    up = _uplink(box, wire, clock, max_items=2)
    box.append("report", b"{broken", "report")  # seq 1: unreadable
    box.append("report", b"x" * (MAX_ITEM_BYTES + 1), "report")  # seq 2: can never be sent
    up.add_report(_report())  # seq 3
    sent = [up.pump() for _ in range(3)]  # unsendable windows are dropped, a pump at a time
    assert sent == [False, False, True]
    assert box.pending()[0].seq == 3
    batch = wire.batches()[0]
    assert [i.seq for i in batch.items] == [3]
    assert batch.floor == 3  # the server counts 1 and 2 lost
    stats = up.stats()
    assert stats.unreadable_entries == 1
    assert stats.oversized_entries == 1
    assert stats.unsendable_dropped == 2
