"""Capture upload without a broker: the device's uploader over a real ring (sampling, budgets,
field drops, labels, acknowledgement, persistence) and the server's dataset store over a real
SQLite registry (records refused by reason, policy violations, content addressing)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clock import FakeClock
from edge_agent.common.capture_chunk import CaptureRecord, pack_chunk, parse_chunk
from edge_agent.config import CaptureConfig
from edge_agent.errors import CommandFailedError, CommandLimitError
from edge_agent.serving.capture import CaptureRing, label_indices
from edge_agent.sync.ops.capture_upload import CaptureUploader
from edge_agent.sync.ops.upload import UploadServer
from edge_agent.trust.capture_settings import UploadSettings
from edge_agent.trust.command import CaptureUploadArgs
from edge_agent.wire.transfer import BlockData, BlockRequest
from fleet_server.capture.store import DatasetStore
from fleet_server.errors import DatasetUnusableError
from fleet_server.registry.ops.datasets import CapturePolicy
from fleet_server.registry.store import Registry
from support import wait_until

DAY = 86400.0


@dataclasses.dataclass
class World:
    ring: CaptureRing
    uploads: UploadServer
    uploader: CaptureUploader
    sent: list[bytes]
    clock: FakeClock
    directory: Path


def _world(tmp_path: Path, clock: FakeClock, ring: CaptureRing | None = None) -> World:
    ring = ring or CaptureRing(tmp_path / "capture", CaptureConfig(enabled=True, sample_rate=1.0))
    sent: list[bytes] = []
    uploads = UploadServer(
        tmp_path / "sync" / "upload_budget.json", 64 * 1024 * 1024, sent.append, clock=clock.time
    )
    (tmp_path / "sync").mkdir(exist_ok=True)
    uploader = CaptureUploader("cam-7", ring, tmp_path / "sync", uploads, clock=clock.time)
    return World(ring, uploads, uploader, sent, clock, tmp_path)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = _world(tmp_path, FakeClock())
    yield w
    w.ring.close()


def _capture(ring: CaptureRing, n: int, *, labelled: int = 0, start: int = 0) -> None:
    before = ring.captured
    for i in range(start, start + n):
        x = np.full((1, 4), i, dtype=np.float32)
        ring.offer("digits", 1, {"x": x}, {"p": np.ones((1, 3), np.float32)}, f"r{i}")
    for i in range(start, start + labelled):
        ring.label("digits", f"r{i}", [i % 3])
    wait_until(lambda: ring.captured == before + n + labelled, 10, what="ring written")


def _pull(world: World, result: dict[str, Any]) -> bytes:
    """Pull the offered chunk through the block path, as the server does."""
    offer = result["offer"]
    world.sent.clear()
    request = BlockRequest(offer["transfer_id"], ((0, 1 + (offer["length"] - 1) // 65536),))
    world.uploads.on_request(request.to_bytes())
    data = b"".join(BlockData.from_bytes(b).payload for b in world.sent)
    assert hashlib.sha256(data).hexdigest() == offer["sha256"]
    return data


def _args(ack: str = "", max_bytes: int = 65536) -> CaptureUploadArgs:
    return CaptureUploadArgs("digits", ack, max_bytes)


def test_off_until_configured_and_refused_without_a_ring(world: World, tmp_path: Path) -> None:
    with pytest.raises(CommandFailedError):
        world.uploader.upload(_args())
    bare = CaptureUploader("cam-7", None, tmp_path / "sync", world.uploads)
    with pytest.raises(CommandFailedError):
        bare.configure(UploadSettings("digits", True))


def test_chunk_carries_labels_drops_fields_and_waits_for_its_ack(world: World) -> None:
    world.uploader.configure(UploadSettings("digits", True, drop=("metadata", "feature:0")))
    _capture(world.ring, 6, labelled=4)
    result = world.uploader.upload(_args())
    chunk = parse_chunk(_pull(world, result))
    assert chunk.records == 6
    assert chunk.labels.tolist() == [0, 1, 2, 0, -1, -1]  # joined before the ids were dropped
    assert set(chunk.request_ids.tolist()) == {""}
    assert chunk.inputs["x"].shape == (6, 3)  # feature 0 never left the device
    assert result["chunk"]["labelled"] == 4

    again = world.uploader.upload(_args())  # no ack: the same chunk, nothing charged twice
    assert again["resent"] is True
    assert again["offer"]["sha256"] == result["offer"]["sha256"]

    _capture(world.ring, 2, start=6)
    after = world.uploader.upload(_args(ack=result["offer"]["sha256"]))
    assert after["acknowledged"] == 6
    assert parse_chunk(_pull(world, after)).records == 2  # only what came since
    counts = world.uploader.counts("digits")
    assert counts["records_acknowledged"] == 6
    assert counts["records_offered"] == 8


def test_daily_budget_bounds_chunks_and_resets_the_next_day(world: World) -> None:
    world.uploader.configure(UploadSettings("digits", True, bytes_per_day=12_000))
    _capture(world.ring, 40)
    first = world.uploader.upload(_args())
    assert first["chunk"]["length"] <= 12_000
    assert 0 < first["chunk"]["records"] < 40
    with pytest.raises(CommandLimitError):
        world.uploader.upload(_args(ack=first["offer"]["sha256"]))
    assert world.uploader.counts("digits")["budget_deferred"] == 1
    world.clock.advance(DAY)
    nxt = world.uploader.upload(_args())
    assert nxt["chunk"]["records"] > 0


def test_sampling_is_counted_and_settings_survive_a_restart(world: World, tmp_path: Path) -> None:
    world.uploader.configure(UploadSettings("digits", True, sample_ppm=250_000))
    _capture(world.ring, 200)
    result = world.uploader.upload(_args(max_bytes=1 << 20))
    kept, skipped = result["chunk"]["records"], result["counts"]["not_sampled"]
    assert kept + skipped == 200
    assert 20 < kept < 90
    again = CaptureUploader("cam-7", world.ring, tmp_path / "sync", world.uploads)
    assert again.settings("digits") == UploadSettings("digits", True, sample_ppm=250_000)
    assert again.upload(_args(max_bytes=1 << 20))["resent"] is True  # the pending chunk too


def test_acknowledged_segments_are_deleted(tmp_path: Path) -> None:
    clock = FakeClock()
    ring = CaptureRing(tmp_path / "capture", CaptureConfig(True, 1.0, max_bytes=64 * 1024))
    world = _world(tmp_path, clock, ring)
    try:
        world.uploader.configure(UploadSettings("digits", True, bytes_per_day=1 << 30))
        _capture(ring, 120)  # several segments of 8 KiB
        before = len(CaptureRing.segments(ring.dir))
        result = world.uploader.upload(_args(max_bytes=1 << 20))
        world.uploader.upload(_args(ack=result["offer"]["sha256"], max_bytes=1 << 20))
        assert len(CaptureRing.segments(ring.dir)) < before
    finally:
        ring.close()


@pytest.mark.parametrize(
    ("label", "rows", "expected"),
    [(2, False, [2]), ("b", False, [1]), ([None, "c"], True, [-1, 2]), ("z", False, None)],
)
def test_label_indices(label: Any, rows: bool, expected: list[int] | None) -> None:
    assert label_indices(label, rows, ("a", "b", "c")) == expected


# ---------------------------------------------------------------------- the server's store
def _record(i: int, **change: Any) -> CaptureRecord:
    r = CaptureRecord(
        "digits",
        1,
        1_700_000_000.0 + i,
        f"r{i}",
        {"x": np.full((1, 4), i, np.float32)},
        {"p": np.ones((1, 3), np.float32)},
        np.array([i % 2], np.int32),
    )
    return dataclasses.replace(r, **change)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DatasetStore]:
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.upgrade()
    yield DatasetStore(
        tmp_path / "datasets", registry, clock=lambda: datetime(2026, 1, 1, tzinfo=UTC)
    )
    registry.close()


def _policy(drop: tuple[str, ...] = ()) -> CapturePolicy:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return CapturePolicy("digits", True, {"devices": ["cam-7"]}, 10**6, 1 << 24, 65536, drop, now)


def test_bad_records_are_refused_by_reason_and_the_rest_stored(store: DatasetStore) -> None:
    records = [
        _record(0),
        _record(1, version=0),
        _record(2, time=float("nan")),
        _record(3, time=4e9),
        _record(4, request_id="\x1b[31m"),
        _record(5),
    ]
    data, _ = pack_chunk("cam-7", "digits", records)
    result = store.ingest("cam-7", _policy(), data, {"not_sampled": 3})
    assert result.refused_records == {
        "bad_version": 1,
        "bad_time": 2,
        "bad_request_id": 1,
    }
    assert result.dataset is not None
    assert result.dataset.records == 2
    assert result.dataset.provenance["refused_records"] == result.refused_records
    assert store.path_of(result.dataset.sha256).is_file()
    # Content-addressed: the same records from a new chunk give the same dataset.
    again, _ = pack_chunk("cam-7", "digits", [_record(0), _record(5)])
    assert store.ingest("cam-7", _policy(), again, {}).dataset == result.dataset


@pytest.mark.parametrize(
    ("device", "drop", "chunk_drop", "reason"),
    [
        ("cam-8", (), (), "mix_and_match"),
        ("cam-7", ("inputs",), (), "policy_violation"),
        ("cam-7", ("metadata",), ("metadata",), "policy_violation"),  # ids still there
    ],
)
def test_chunks_refused_whole(
    store: DatasetStore,
    device: str,
    drop: tuple[str, ...],
    chunk_drop: tuple[str, ...],
    reason: str,
) -> None:
    data, _ = pack_chunk("cam-7", "digits", [_record(0)], dropped=chunk_drop)
    result = store.ingest(device, _policy(drop), data, {})
    assert result.dataset is None
    assert result.refused == reason


def test_oversized_and_garbled_chunks_are_refused(store: DatasetStore) -> None:
    big, _ = pack_chunk("cam-7", "digits", [_record(i) for i in range(200)])
    assert len(big) > 65536
    assert store.ingest("cam-7", _policy(), big, {}).refused == "oversized"
    assert store.ingest("cam-7", _policy(), b"\0" * 100, {}).refused == "malformed"


def test_export_and_evalset_bytes(store: DatasetStore) -> None:
    data, _ = pack_chunk("cam-7", "digits", [_record(i) for i in range(4)])
    dataset = store.ingest("cam-7", _policy(), data, {}).dataset
    assert dataset is not None
    flat = np.load(io.BytesIO(store.export(dataset.sha256)))
    assert flat["label"].tolist() == [0, 1, 0, 1]
    assert flat["request_id"].tolist() == ["r0", "r1", "r2", "r3"]
    ev = np.load(io.BytesIO(store.evalset_bytes(dataset.sha256)))
    assert ev["x"].dtype == np.float32
    assert ev["y"].tolist() == [0, 1, 0, 1]
    unlabelled, _ = pack_chunk("cam-7", "digits", [_record(9, labels=np.array([-1], np.int32))])
    none = store.ingest("cam-7", _policy(), unlabelled, {}).dataset
    assert none is not None
    with pytest.raises(DatasetUnusableError):
        store.evalset_bytes(none.sha256)
