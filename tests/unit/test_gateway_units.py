"""Unit tests of the gateway's pure parts and its batching ingest worker (real SQLite)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import DataError, OperationalError

from edge_agent.errors import MetadataFormatError
from edge_agent.wire.telemetry import (
    MAX_PAYLOAD_BYTES,
    Batch,
    Event,
    StatusMessage,
    TelemetryReport,
    event_from_registry,
)
from edge_agent.wire.transfer import BlockPlan, BlockRequest
from fleet_server.config import GatewayConfig
from fleet_server.delivery.block_server import Pacer
from fleet_server.delivery.blocks import Entitlements, plan_round
from fleet_server.errors import RegistryUnavailableError, ServerConfigError
from fleet_server.gateway.ingest import IngestWorker, is_data_failure
from fleet_server.gateway.ingest_parse import IngestItem, parse_telemetry
from fleet_server.registry.store import Registry
from fleet_server.registry.values import IngestResult, TelemetryEntry

PLAN_A = BlockPlan(10 * 65536, "a" * 64)
PLAN_B = BlockPlan(3 * 65536, "b" * 64)


def report(device: str, seq: int) -> TelemetryReport:
    return TelemetryReport(device_id=device, seq=seq, window_start=0.0, window_end=1.0)


def event(device: str, seq: int) -> Event:
    return Event(device_id=device, seq=seq, kind="installed", at=1.0)


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "overrides",
    [
        {"prefix": "bad/+/prefix"},
        {"share_group": "a/b"},
        {"block_size": 1000},
        {"broadcast_min_devices": 0},
        {"resend_round_seconds": 0},
        {"max_blocks_per_second": 0},
        {"max_blocks_per_second": float("inf")},
        {"ingest_max_batch": 0},
        {"ingest_max_wait_seconds": -1},
    ],
)
def test_config_validate_refuses_out_of_range_values(overrides: dict[str, Any]) -> None:
    with pytest.raises(ServerConfigError):
        GatewayConfig(**overrides).validate()


def test_default_config_is_valid() -> None:
    GatewayConfig().validate()


# --------------------------------------------------------------------------- parsing
def test_parse_telemetry_accepts_batches_and_single_items() -> None:
    batch = Batch("cam-1", (report("cam-1", 1), event("cam-1", 2)), floor=1)
    item = parse_telemetry("telemetry", "cam-1", batch.to_bytes())
    assert item == IngestItem("cam-1", batch.items, 1)
    assert parse_telemetry("events", "cam-1", event("cam-1", 2).to_bytes()) == IngestItem(
        "cam-1", (event("cam-1", 2),)
    )
    assert parse_telemetry("telemetry", "cam-1", report("cam-1", 3).to_bytes()) == IngestItem(
        "cam-1", (report("cam-1", 3),)
    )


@pytest.mark.parametrize(
    ("kind", "payload", "reason"),
    [
        ("telemetry", b"{nope", "malformed"),
        ("telemetry", b"[]", "malformed"),
        ("telemetry", b'{"type":"batch","schema_version":2}', "malformed"),
        ("telemetry", b" " * (MAX_PAYLOAD_BYTES + 1), "oversized"),
        ("telemetry", Batch("cam-2", (report("cam-2", 1),)).to_bytes(), "device_mismatch"),
        ("events", event("cam-2", 1).to_bytes(), "device_mismatch"),
        ("events", report("cam-1", 1).to_bytes(), "wrong_type"),
        ("events", Batch("cam-1", (event("cam-1", 1),)).to_bytes(), "wrong_type"),
        (
            "telemetry",
            StatusMessage(device_id="cam-1", state="online", at=1.0).to_bytes(),
            "wrong_type",
        ),
    ],
)
def test_parse_telemetry_rejects_with_a_reason(kind: str, payload: bytes, reason: str) -> None:
    assert parse_telemetry(kind, "cam-1", payload) == reason


# --------------------------------------------------------------------------- rounds
def test_plan_round_groups_by_transfer_and_counts_bad_requests() -> None:
    plans = {PLAN_A.transfer_id: PLAN_A, PLAN_B.transfer_id: PLAN_B}
    a, b = PLAN_A.transfer_id, PLAN_B.transfer_id
    requests = [
        ("d1", BlockRequest(a, ((0, 4),))),
        ("d2", BlockRequest(a, ((2, 6),))),
        ("d3", BlockRequest(a, ((3, 4), (8, 9)))),
        ("d1", BlockRequest(b, ((0, 3),))),
        ("d2", BlockRequest("f" * 32, ((0, 1),))),  # unknown transfer
        ("d3", BlockRequest(b, ((2, 4),))),  # beyond the last block of B
    ]
    result = plan_round(requests, plans, broadcast_min_devices=2)
    assert (result.unknown, result.out_of_range) == (1, 1)
    assert result.transfers[a].broadcast == (2, 3)
    assert dict(result.transfers[a].unicast) == {"d1": (0, 1), "d2": (4, 5), "d3": (8,)}
    assert result.transfers[b].broadcast == ()
    assert dict(result.transfers[b].unicast) == {"d1": (0, 1, 2)}


def test_plan_round_min_devices_one_broadcasts_everything() -> None:
    a = PLAN_A.transfer_id
    result = plan_round([("d1", BlockRequest(a, ((0, 2),)))], {a: PLAN_A}, broadcast_min_devices=1)
    assert result.transfers[a].broadcast == (0, 1)
    assert not result.transfers[a].unicast
    assert plan_round([], {a: PLAN_A}, broadcast_min_devices=2).transfers == {}


def test_pacer_limits_the_rate() -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    pacer = Pacer(100.0, burst=5, monotonic=lambda: now[0], sleep=sleep)
    for _ in range(105):
        pacer.acquire()
    # 5 from the initial burst, then 100 more at 100/s: one second of (fake) time.
    assert now[0] == pytest.approx(1.0, abs=0.02)


# --------------------------------------------------------------------------- ingest worker
@pytest.fixture
def reg(tmp_path: Path) -> Iterator[Registry]:
    registry = Registry.open(f"sqlite:///{tmp_path / 'r.db'}")
    registry.upgrade()
    for d in ("cam-1", "cam-2"):
        registry.enroll(d)
    yield registry
    registry.close()


def test_worker_batches_many_messages_in_few_transactions_in_order(reg: Registry) -> None:
    acks: list[tuple[str, int]] = []
    worker = IngestWorker(reg, lambda r: acks.append((r.device_id, r.acked_upto)), max_batch=50)
    for seq in range(1, 101):  # queued before the thread runs: batches fill up
        for d in ("cam-1", "cam-2"):
            assert worker.put(IngestItem(d, (report(d, seq),)))
    worker.put(IngestItem("ghost", (report("ghost", 1),)))
    worker.start()
    worker.close()
    stats = worker.stats()
    assert stats.transactions == 5  # 201 items, 50 per transaction
    assert (stats.stored_messages, stats.inserted) == (200, 200)
    assert dict(stats.refused) == {"unknown_device": 1}
    for d in ("cam-1", "cam-2"):
        assert [upto for dev, upto in acks if dev == d] == list(range(1, 101))
    assert reg.seq_state("cam-1").acked_upto == 100


def test_worker_does_not_ack_when_the_database_fails(reg: Registry) -> None:
    class Failing:
        calls = 0

        def ingest_many(self, batches: Sequence[Any]) -> list[IngestResult]:
            self.calls += 1
            raise RegistryUnavailableError("database is locked")

    acks: list[IngestResult] = []
    failing = Failing()
    worker = IngestWorker(failing, acks.append)  # type: ignore[arg-type]
    worker.put(IngestItem("cam-1", (report("cam-1", 1),)))
    worker.start()
    worker.close()
    assert failing.calls == 1
    assert acks == []
    assert worker.stats().db_failures == 1


def test_worker_flushes_on_close_and_waits_for_max_wait(reg: Registry) -> None:
    stored = threading.Event()
    worker = IngestWorker(reg, lambda _r: stored.set(), max_batch=500, max_wait=0.01)
    worker.start()
    worker.put(IngestItem("cam-1", (report("cam-1", 1),)))
    assert stored.wait(5.0)  # a lone message is not held back for a full batch
    worker.put(IngestItem("cam-1", (report("cam-1", 2),)))
    worker.close()
    assert reg.seq_state("cam-1").acked_upto == 2


def test_drain_waits_for_the_batch_being_stored_and_its_ack(reg: Registry) -> None:
    """``drain`` (what gateway tests wait on instead of sleeping) returns only once the
    item is out of the queue *and* its ack callback has returned."""
    entered, release = threading.Event(), threading.Event()
    acks: list[int] = []

    def on_stored(result: IngestResult) -> None:
        entered.set()
        release.wait(5.0)
        acks.append(result.acked_upto)

    worker = IngestWorker(reg, on_stored)
    assert worker.drain(0)  # nothing queued: idle at once
    assert worker.put(IngestItem("cam-1", (report("cam-1", 1),)))
    assert not worker.drain(0)  # queued, and no thread to store it yet
    worker.start()
    try:
        assert entered.wait(5.0)
        assert worker.pending() == 0
        assert not worker.drain(0)  # taken, but its ack is not handed over yet
        release.set()
        assert worker.drain(5.0)
        assert acks == [1]
        assert reg.seq_state("cam-1").acked_upto == 1
    finally:
        release.set()
        worker.close()


# --------------------------------------------------------------------------- fairness
class Recording:
    """A registry stand-in that records each transaction's devices and stores nothing."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def ingest_many(self, batches: Sequence[Any]) -> list[IngestResult]:
        self.batches.append([d for d, _e, _f in batches])
        return [IngestResult(d, 0, 0, 0, 0, 0, 0) for d, _e, _f in batches]


def test_a_devices_backlog_does_not_delay_another_device_by_more_than_a_turn() -> None:
    recording = Recording()
    worker = IngestWorker(recording, lambda _r: None, max_batch=10, per_device=150)  # type: ignore[arg-type]
    for seq in range(1, 151):
        assert worker.put(IngestItem("noisy", (report("noisy", seq),)))
    assert not worker.put(IngestItem("noisy", (report("noisy", 151),)))  # beyond its share
    assert worker.put(IngestItem("cam-1", (report("cam-1", 1),)))  # others still get in
    worker.start()
    worker.close()
    assert "cam-1" in recording.batches[0]  # round-robin: its first turn, not after 150
    assert sum(len(b) for b in recording.batches) == 151
    assert worker.stats().dropped_queue_full == 1


def test_put_never_blocks_when_the_queue_is_full() -> None:
    worker = IngestWorker(Recording(), lambda _r: None, capacity=3, per_device=3)  # type: ignore[arg-type]
    assert all(worker.put(IngestItem(f"d-{i}", (report(f"d-{i}", 1),))) for i in range(3))
    assert not worker.put(IngestItem("d-9", (report("d-9", 1),)))  # at once, not after 5 s
    assert worker.pending() == 3


# --------------------------------------------------------------------------- isolation
class DataRefusing:
    """Refuses (as PostgreSQL would, with a DataError) any transaction holding a marked entry."""

    def __init__(self, *, down: bool = False) -> None:
        self.calls = 0
        self.down = down

    def ingest_many(self, batches: Sequence[Any]) -> list[IngestResult]:
        self.calls += 1
        if self.down:
            raise RegistryUnavailableError("down") from OperationalError("x", {}, Exception())
        for _d, entries, _f in batches:
            if any(isinstance(e, TelemetryEntry) and e.payload.get("bad") for e in entries):
                raise RegistryUnavailableError("refused") from DataError("x", {}, Exception())
        return [IngestResult(d, e[-1].seq, 0, len(e), 0, 0, 0) for d, e, _f in batches]


def test_a_batch_the_database_refuses_is_bisected_to_the_one_bad_message() -> None:
    registry = DataRefusing()
    acks: list[tuple[str, int]] = []
    refused: list[tuple[str, str, int]] = []
    worker = IngestWorker(
        registry,  # type: ignore[arg-type]
        lambda r: acks.append((r.device_id, r.acked_upto)),
        on_refused=lambda d, reason, n: refused.append((d, reason, n)),
    )
    items = [IngestItem(f"d-{i}", (TelemetryEntry(1, "event", {}),)) for i in range(16)]
    items[11] = IngestItem("d-11", (TelemetryEntry(1, "event", {"bad": True}),))
    worker.store(items)
    assert sorted(acks) == sorted((f"d-{i}", 1) for i in range(16))  # all, the bad one too
    assert refused == [("d-11", "unstorable", 1)]
    assert registry.calls <= 2 * 4 + 2  # a bisection, not one transaction per message
    assert worker.stats().db_failures == 0


def test_a_database_that_is_down_is_not_bisected() -> None:
    registry = DataRefusing(down=True)
    worker = IngestWorker(registry, lambda _r: None)  # type: ignore[arg-type]
    worker.store([IngestItem(f"d-{i}", (TelemetryEntry(1, "event", {}),)) for i in range(16)])
    assert registry.calls == 1
    assert worker.stats().db_failures == 1
    assert is_data_failure(RegistryUnavailableError("x")) is False


# --------------------------------------------------------------------------- entitlements
def test_entitlements_are_cached_forgotten_on_a_new_desired_state_and_fail_closed() -> None:
    calls: list[str] = []
    answers = {"cam-1": frozenset({"a" * 64})}

    def load(device_id: str) -> frozenset[str]:
        calls.append(device_id)
        if device_id == "broken":
            raise MetadataFormatError("unreadable")
        return answers.get(device_id, frozenset())

    clock = [0.0]
    ent = Entitlements(load, ttl=5.0, monotonic=lambda: clock[0])
    assert ent.allows("cam-1", "a" * 64)
    assert not ent.allows("cam-1", "b" * 64)
    assert calls == ["cam-1"]  # cached
    answers["cam-1"] = frozenset({"b" * 64})
    ent.forget("cam-1")
    assert ent.allows("cam-1", "b" * 64)
    assert not ent.allows("cam-2", "a" * 64)  # nothing assigned: nothing served
    assert not ent.allows("broken", "a" * 64)
    assert not ent.allows("broken", "a" * 64)
    assert calls.count("broken") == 2  # a failure is not cached
    clock[0] = 6.0
    ent.allows("cam-1", "b" * 64)
    assert calls.count("cam-1") == 3  # expired after ttl


def test_an_agent_event_built_from_free_text_is_always_sendable() -> None:
    """The device's own event (e.g. an exception text with NUL or an undecodable file name)
    keeps its detail, made storable, instead of being refused by every receiver."""
    entry = {"event": "install_failed", "detail": "bad\x00 \udcff" + "x" * 2000, "model": "m"}
    event = event_from_registry("cam-1", 1, entry)
    assert event is not None
    assert event.detail.startswith("bad\ufffd \ufffd")
    assert len(event.detail) == 1024
    assert Event.from_bytes(event.to_bytes()) == event
