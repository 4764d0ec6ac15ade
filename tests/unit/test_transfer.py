"""Block transfer: plan math, wire format, progress, the on-disk partial download, serving."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest

from edge_agent.common import durable
from edge_agent.errors import (
    ContractError,
    DigestMismatchError,
    LengthMismatchError,
    TransferIncompleteError,
    TransferMismatchError,
)
from edge_agent.sync import transfer_store
from edge_agent.sync.transfer_store import PartialDownload
from edge_agent.trust.assignment import ModelAssignment
from edge_agent.wire.transfer import (
    MAX_BLOCK_SIZE,
    MAX_MESSAGE_BYTES,
    MAX_RANGES,
    MIN_BLOCK_SIZE,
    BlockData,
    BlockPlan,
    BlockRequest,
)
from edge_agent.wire.transfer_progress import Progress
from fleet_server.delivery.blocks import BlockSource, plan_resend

K = 1024
BS = MIN_BLOCK_SIZE


def _bundle(length: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(length)


def _plan(data: bytes, block_size: int = BS) -> BlockPlan:
    return BlockPlan(len(data), hashlib.sha256(data).hexdigest(), block_size)


def _block(data: bytes, plan: BlockPlan, i: int) -> bytes:
    start, stop = plan.block_range(i)
    return data[start:stop]


def _frame(header: dict[str, object], payload: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(2, "big") + raw + payload


# --- plan math --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "block_size", "n_blocks", "last"),
    [
        (4 * BS, BS, 4, BS),  # exact multiple
        (4 * BS + 1, BS, 5, 1),  # one byte over
        (3 * BS - 7, BS, 3, BS - 7),  # short last block
        (1, BS, 1, 1),  # 1-byte file
        (BS, BS, 1, BS),
        (300 * K, 128 * K, 3, 44 * K),
    ],
)
def test_plan_math(length: int, block_size: int, n_blocks: int, last: int) -> None:
    plan = BlockPlan(length, "a" * 64, block_size)
    assert plan.n_blocks == n_blocks
    assert plan.block_length(n_blocks - 1) == last
    assert plan.block_range(0) == (0, min(block_size, length))
    assert plan.block_range(n_blocks - 1)[1] == length
    assert sum(plan.block_length(i) for i in range(n_blocks)) == length
    with pytest.raises(LengthMismatchError):
        plan.block_range(n_blocks)
    with pytest.raises(LengthMismatchError):
        plan.block_range(-1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"length": 0, "sha256": "a" * 64},
        {"length": 10, "sha256": "A" * 64},
        {"length": 10, "sha256": "a" * 63},
        {"length": 10, "sha256": "a" * 64, "block_size": MIN_BLOCK_SIZE - 1},
        {"length": 10, "sha256": "a" * 64, "block_size": MAX_BLOCK_SIZE + 1},
        {"length": True, "sha256": "a" * 64},
    ],
)
def test_plan_refuses_bad_fields(kwargs: dict[str, object]) -> None:
    with pytest.raises(ContractError):
        BlockPlan(**kwargs)  # type: ignore[arg-type]


def test_plan_from_assignment_and_transfer_id_binding() -> None:
    a = ModelAssignment(3, "stable", "b" * 64, 1000, "c" * 64)
    plan = BlockPlan.from_assignment(a)
    assert (plan.length, plan.sha256) == (1000, "b" * 64)
    ids = {
        plan.transfer_id,
        BlockPlan(1001, "b" * 64).transfer_id,
        BlockPlan(1000, "d" * 64).transfer_id,
        BlockPlan(1000, "b" * 64, 128 * K).transfer_id,
    }
    assert len(ids) == 4


# --- wire format ------------------------------------------------------------------------------


def test_round_trips() -> None:
    plan = BlockPlan(5 * BS - 3, "e" * 64)
    req = BlockRequest(plan.transfer_id, ((0, 2), (3, 5)))
    assert BlockRequest.from_bytes(req.to_bytes(), plan) == req
    assert req.blocks(plan) == [0, 1, 3, 4]
    payload = b"x" * (BS - 3)
    msg = BlockData(plan.transfer_id, 4, payload)
    wire = msg.to_bytes()
    assert len(wire) < len(payload) + 150  # compact: a small header plus raw bytes
    assert BlockData.from_bytes(wire, plan) == msg
    assert BlockData.from_bytes(bytearray(wire)) == msg


def _good_data_header(plan: BlockPlan, **over: object) -> dict[str, object]:
    header: dict[str, object] = {
        "schema_version": 1,
        "type": "block_data",
        "transfer_id": plan.transfer_id,
        "index": 0,
        "length": 4,
    }
    header.update(over)
    return header


@pytest.mark.parametrize(
    "mutate",
    [
        lambda w: w[:1],  # truncated before header length
        lambda w: w[:10],  # truncated inside header
        lambda w: w[:-1],  # payload shorter than header length
        lambda w: w + b"!",  # payload longer than header length
        lambda w: b"\x00\x00" + w[2:],  # zero header length
        lambda w: b"\xff\xff" + w[2:],  # header length beyond the cap
        lambda w: w[:2] + b"\xff" * (len(w) - 2),  # garbage header
        lambda w: w + b"\x00" * MAX_MESSAGE_BYTES,  # oversize message
        lambda w: b"",
    ],
)
def test_malformed_data_refused(mutate: object) -> None:
    plan = BlockPlan(4, "f" * 64)
    wire = BlockData(plan.transfer_id, 0, b"abcd").to_bytes()
    with pytest.raises(ContractError):
        BlockData.from_bytes(mutate(wire))  # type: ignore[operator]


@pytest.mark.parametrize(
    "over",
    [
        {"schema_version": 2},
        {"schema_version": True},
        {"type": "block_request"},
        {"transfer_id": "zz"},
        {"index": -1},
        {"index": 1.0},
        {"length": 5},
        {"extra": 1},
    ],
)
def test_bad_data_header_refused(over: dict[str, object]) -> None:
    plan = BlockPlan(4, "f" * 64)
    with pytest.raises(ContractError):
        BlockData.from_bytes(_frame(_good_data_header(plan, **over), b"abcd"))


def test_duplicate_keys_and_nan_refused() -> None:
    plan = BlockPlan(4, "f" * 64)
    raw = json.dumps(_good_data_header(plan))[:-1] + ', "index": 0}'
    with pytest.raises(ContractError, match="duplicate"):
        BlockData.from_bytes(len(raw).to_bytes(2, "big") + raw.encode() + b"abcd")
    raw = json.dumps(_good_data_header(plan)).replace('"index": 0', '"index": NaN')
    with pytest.raises(ContractError):
        BlockData.from_bytes(len(raw).to_bytes(2, "big") + raw.encode() + b"abcd")


def test_data_checked_against_plan() -> None:
    plan = BlockPlan(BS + 10, "1" * 64)
    other = BlockPlan(BS + 10, "2" * 64)
    with pytest.raises(TransferMismatchError):
        BlockData.from_bytes(BlockData(other.transfer_id, 0, b"x" * BS).to_bytes(), plan)
    with pytest.raises(LengthMismatchError):  # index out of range
        BlockData.from_bytes(BlockData(plan.transfer_id, 2, b"x" * 10).to_bytes(), plan)
    with pytest.raises(LengthMismatchError):  # last block longer than its range
        BlockData.from_bytes(BlockData(plan.transfer_id, 1, b"x" * 11).to_bytes(), plan)
    with pytest.raises(LengthMismatchError):  # full block short
        BlockData.from_bytes(BlockData(plan.transfer_id, 0, b"x" * (BS - 1)).to_bytes(), plan)
    with pytest.raises(ContractError):  # a payload above the block cap never constructs
        BlockData(plan.transfer_id, 0, b"x" * (MAX_BLOCK_SIZE + 1))


@pytest.mark.parametrize(
    "ranges",
    [
        (),
        ((2, 2),),
        ((3, 1),),
        ((0, 2), (1, 4)),  # overlapping
        ((0, 2), (2, 4)),  # touching: must be merged
        ((4, 6), (0, 2)),  # unsorted
        ((-1, 2),),
        ((0, 1, 2),),
        tuple((2 * i, 2 * i + 1) for i in range(MAX_RANGES + 1)),
    ],
)
def test_bad_request_ranges_refused(ranges: tuple[tuple[int, ...], ...]) -> None:
    tid = BlockPlan(10, "3" * 64).transfer_id
    with pytest.raises(ContractError):
        BlockRequest(tid, ranges)  # type: ignore[arg-type]
    raw = {"schema_version": 1, "type": "block_request", "transfer_id": tid}
    with pytest.raises(ContractError):
        BlockRequest.from_bytes(_frame({**raw, "ranges": [list(r) for r in ranges]}))


def test_request_checked_against_plan() -> None:
    plan = BlockPlan(3 * BS, "4" * 64)
    ok = BlockRequest(plan.transfer_id, ((0, 3),))
    assert BlockRequest.from_bytes(ok.to_bytes(), plan) == ok
    with pytest.raises(LengthMismatchError):
        BlockRequest.from_bytes(BlockRequest(plan.transfer_id, ((2, 4),)).to_bytes(), plan)
    other = BlockPlan(3 * BS, "5" * 64)
    with pytest.raises(TransferMismatchError):
        BlockRequest.from_bytes(BlockRequest(other.transfer_id, ((0, 1),)).to_bytes(), plan)
    with pytest.raises(ContractError):  # trailing bytes after a request
        BlockRequest.from_bytes(ok.to_bytes() + b"x")
    with pytest.raises(ContractError):  # a data message is not a request
        BlockRequest.from_bytes(BlockData(plan.transfer_id, 0, b"x").to_bytes())


# --- progress ---------------------------------------------------------------------------------


def test_progress_bitmap_and_ranges() -> None:
    plan = BlockPlan(20 * BS - 5, "6" * 64)
    p = Progress(plan)
    assert p.missing_ranges() == ((0, 20),)
    for i in [*range(8), 9, 10, 15]:
        assert p.accept(i, plan.block_length(i))
    assert not p.accept(9, BS)  # duplicate
    assert p.received == 11
    assert p.missing_ranges() == ((8, 9), (11, 15), (16, 20))
    assert p.missing_ranges(limit=2) == ((8, 9), (11, 15))
    req = p.request(limit=1)
    assert req is not None
    assert req.ranges == ((8, 9),)
    with pytest.raises(LengthMismatchError):
        p.accept(20, 1)
    with pytest.raises(LengthMismatchError):
        p.accept(19, BS)  # last block is short: BS - 5
    with pytest.raises(ContractError):
        p.missing_ranges(limit=0)
    restored = Progress(plan, p.to_bytes())
    assert restored.missing_ranges() == p.missing_ranges()
    for i in (8, 11, 12, 13, 14, 16, 17, 18):
        p.accept(i, BS)
    p.accept(19, BS - 5)
    assert p.complete
    assert p.received_bytes == plan.length
    assert p.request() is None


def test_progress_refuses_bad_bitmap() -> None:
    plan = BlockPlan(3 * BS, "7" * 64)  # 3 blocks, 1 byte of bitmap
    with pytest.raises(ContractError):
        Progress(plan, b"\x00\x00")
    with pytest.raises(ContractError):
        Progress(plan, b"\x08")  # marks block 3, beyond the last block
    assert Progress(plan, b"\x07").complete


# --- partial download on disk -----------------------------------------------------------------


def test_full_transfer_random_order_with_duplicates(tmp_path: Path) -> None:
    data = _bundle(7 * BS + 123)
    plan = _plan(data)
    order = list(range(plan.n_blocks)) * 2
    random.Random(7).shuffle(order)
    with PartialDownload(tmp_path, plan, persist_every=3) as pd:
        written = [pd.accept(BlockData.from_bytes(_wire(data, plan, i), plan)) for i in order]
        assert sum(written) == plan.n_blocks  # duplicates are not rewritten
        assert pd.part_path.stat().st_size == plan.length
        assert not pd.final_path.exists()
        final = pd.finish()
    assert final.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{plan.sha256}.bundle"]


def _wire(data: bytes, plan: BlockPlan, i: int) -> bytes:
    return BlockData(plan.transfer_id, i, _block(data, plan, i)).to_bytes()


def test_one_byte_bundle(tmp_path: Path) -> None:
    plan = _plan(b"z")
    with PartialDownload(tmp_path, plan) as pd:
        with pytest.raises(LengthMismatchError):
            pd.write_block(0, b"zz")
        assert pd.write_block(0, b"z")
        assert pd.finish().read_bytes() == b"z"


def test_resume_after_restart_does_not_rerequest(tmp_path: Path) -> None:
    data = _bundle(10 * BS - 1)
    plan = _plan(data)
    first = PartialDownload(tmp_path, plan, persist_every=100)
    for i in (0, 1, 2, 5, 9):
        first.write_block(i, _block(data, plan, i))
    first.close()  # orderly stop: persists the bitmap
    second = PartialDownload(tmp_path, plan)
    assert second.resumed_blocks == 5
    req = second.progress.request()
    assert req is not None
    assert req.ranges == ((3, 5), (6, 9))
    for i in req.blocks(plan):
        second.write_block(i, _block(data, plan, i))
    assert second.finish().read_bytes() == data


def test_crash_between_block_write_and_bitmap_persist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _bundle(6 * BS)
    plan = _plan(data)
    pd = PartialDownload(tmp_path, plan, persist_every=2)
    pd.write_block(0, _block(data, plan, 0))
    pd.write_block(1, _block(data, plan, 1))  # checkpoint: blocks 0 and 1 are durable

    def crash(*_: object, **__: object) -> None:
        raise OSError("power lost")

    monkeypatch.setattr(transfer_store, "write_atomic", crash)
    pd.write_block(2, _block(data, plan, 2))
    with pytest.raises(OSError, match="power lost"):
        pd.write_block(3, _block(data, plan, 3))  # written, but its mark never persisted
    with pytest.raises(OSError, match="power lost"):
        pd.close()
    monkeypatch.undo()
    after = PartialDownload(tmp_path, plan)
    assert after.resumed_blocks == 2
    assert after.progress.missing_ranges() == ((2, 6),)  # 2 and 3 are simply asked again
    for i in range(2, 6):
        after.write_block(i, _block(data, plan, i))
    assert after.finish().read_bytes() == data


def test_data_is_fsynced_before_bitmap_is_persisted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _bundle(4 * BS)
    plan = _plan(data)
    events: list[str] = []
    pd = PartialDownload(tmp_path, plan, persist_every=2)
    real_fsync, real_write = os.fsync, durable.write_atomic
    part_fd = pd._fd  # the part file's descriptor

    def fsync(fd: int) -> None:
        if fd == part_fd:
            events.append("fsync-data")
        real_fsync(fd)

    def write_atomic(path: Path, blob: bytes, mode: int = 0o644) -> None:
        events.append("bitmap")
        real_write(path, blob, mode)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(transfer_store, "write_atomic", write_atomic)
    for i in range(4):
        pd.write_block(i, _block(data, plan, i))
    pd.close()
    assert events == ["fsync-data", "bitmap", "fsync-data", "bitmap"]


def test_bitmap_without_part_file_is_ignored(tmp_path: Path) -> None:
    data = _bundle(3 * BS)
    plan = _plan(data)
    with PartialDownload(tmp_path, plan, persist_every=1) as pd:
        pd.write_block(0, _block(data, plan, 0))
    (tmp_path / f"{plan.sha256}.part").unlink()
    with PartialDownload(tmp_path, plan) as again:
        assert again.resumed_blocks == 0
        assert not again.bitmap_path.exists()


def test_foreign_or_corrupt_bitmap_is_ignored(tmp_path: Path) -> None:
    data = _bundle(3 * BS)
    plan = _plan(data)
    with PartialDownload(tmp_path, plan, persist_every=1) as pd:
        pd.write_block(0, _block(data, plan, 0))
    bitmap = tmp_path / f"{plan.sha256}.bitmap"
    for junk in (b"garbage", bitmap.read_bytes().replace(plan.transfer_id.encode(), b"0" * 32)):
        bitmap.write_bytes(junk)
        with PartialDownload(tmp_path, plan) as again:
            assert again.resumed_blocks == 0


def test_oversized_part_file_restarts(tmp_path: Path) -> None:
    data = _bundle(2 * BS)
    plan = _plan(data)
    (tmp_path / f"{plan.sha256}.part").write_bytes(b"\x00" * (plan.length + 5))
    with PartialDownload(tmp_path, plan) as pd:
        assert pd.part_path.stat().st_size == plan.length
        assert pd.resumed_blocks == 0


def test_digest_mismatch_discards(tmp_path: Path) -> None:
    data = _bundle(3 * BS + 5)
    plan = _plan(data)
    pd = PartialDownload(tmp_path, plan)
    for i in range(plan.n_blocks):
        block = _block(data, plan, i)
        pd.write_block(i, block if i != 1 else bytes(len(block)))  # tampered block
    with pytest.raises(DigestMismatchError):
        pd.finish()
    assert list(tmp_path.iterdir()) == []  # nothing an installer could pick up
    with pytest.raises(ContractError):
        pd.write_block(0, _block(data, plan, 0))  # closed


def test_finish_incomplete_refused(tmp_path: Path) -> None:
    data = _bundle(2 * BS)
    plan = _plan(data)
    with PartialDownload(tmp_path, plan) as pd:
        pd.write_block(0, _block(data, plan, 0))
        with pytest.raises(TransferIncompleteError):
            pd.finish()
        assert not pd.final_path.exists()


def test_endless_data_refused(tmp_path: Path) -> None:
    data = _bundle(2 * BS + 10)
    plan = _plan(data)
    with PartialDownload(tmp_path, plan) as pd:
        with pytest.raises(LengthMismatchError):
            pd.write_block(plan.n_blocks, b"x" * BS)  # a block beyond the last
        with pytest.raises(LengthMismatchError):
            pd.write_block(2, b"x" * 11)  # longer than the last block's range
        with pytest.raises(LengthMismatchError):
            pd.write_block(0, b"x" * (BS + 1))
        with pytest.raises(TransferMismatchError):
            pd.accept(BlockData(_plan(b"other").transfer_id, 0, b"x" * BS))
        assert pd.part_path.stat().st_size == plan.length
        assert pd.progress.received == 0


def test_abandon_removes_everything(tmp_path: Path) -> None:
    data = _bundle(2 * BS)
    plan = _plan(data)
    pd = PartialDownload(tmp_path, plan, persist_every=1)
    pd.write_block(0, _block(data, plan, 0))
    pd.abandon()
    assert list(tmp_path.iterdir()) == []


# --- server side ------------------------------------------------------------------------------


def test_block_source_serves_exact_blocks(tmp_path: Path) -> None:
    data = _bundle(3 * 128 * K + 77)
    plan = _plan(data, 128 * K)
    path = tmp_path / "bundle.tar"
    path.write_bytes(data)
    with BlockSource(path, plan) as src:
        src.verify()
        joined = b"".join(src.block(i) for i in range(plan.n_blocks))
        assert joined == data
        msg = BlockData.from_bytes(src.message(3).to_bytes(), plan)
        assert msg.payload == data[3 * 128 * K :]
        with pytest.raises(LengthMismatchError):
            src.block(plan.n_blocks)
    with pytest.raises(LengthMismatchError):
        BlockSource(path, _plan(data + b"x", 128 * K))
    wrong = BlockPlan(plan.length, "0" * 64, 128 * K)
    with BlockSource(path, wrong) as src, pytest.raises(DigestMismatchError):
        src.verify()


def test_end_to_end_server_to_device(tmp_path: Path) -> None:
    data = _bundle(9 * BS + 3)
    plan = _plan(data)
    (tmp_path / "srv").mkdir()
    src_path = tmp_path / "srv" / "b"
    src_path.write_bytes(data)
    rng = random.Random(3)
    with BlockSource(src_path, plan) as src:
        with PartialDownload(tmp_path / "dev", plan) as pd:  # the broadcast wave loses blocks
            for i in range(plan.n_blocks):
                if rng.random() < 0.5:
                    pd.accept(BlockData.from_bytes(src.message(i).to_bytes(), plan))
        pd = PartialDownload(tmp_path / "dev", plan)  # agent restart
        while (req := pd.progress.request(limit=2)) is not None:
            served = BlockRequest.from_bytes(req.to_bytes(), plan)
            for i in served.blocks(plan):
                pd.accept(BlockData.from_bytes(src.message(i).to_bytes(), plan))
        assert pd.finish().read_bytes() == data


def test_plan_resend_merges_requests() -> None:
    plan = BlockPlan(10 * BS, "8" * 64)
    tid = plan.transfer_id
    other = BlockPlan(10 * BS, "9" * 64).transfer_id
    result = plan_resend(
        [
            ("a", BlockRequest(tid, ((0, 3),))),
            ("b", BlockRequest(tid, ((2, 4),))),
            ("b", BlockRequest(tid, ((2, 3), (8, 9)))),  # merged with b's first request
            ("c", BlockRequest(tid, ((2, 3), (9, 10)))),
            ("d", BlockRequest(other, ((0, 1),))),  # another transfer
            ("e", BlockRequest(tid, ((5, 11),))),  # beyond the last block
        ],
        plan,
        broadcast_min_devices=2,
    )
    assert result.broadcast == (2,)  # a, b, c  (0,1 only a; 3 only b)
    assert result.unicast == {"a": (0, 1), "b": (3, 8), "c": (9,)}
    assert result.rejected == {"d": 1, "e": 1}
    high = plan_resend([("a", BlockRequest(tid, ((0, 2),)))], plan, broadcast_min_devices=1)
    assert high.broadcast == (0, 1)
    assert high.unicast == {}
    assert plan_resend([], plan).broadcast == ()
    with pytest.raises(ContractError):
        plan_resend([], plan, broadcast_min_devices=0)


def test_request_blocks_refuses_ranges_beyond_the_plan_before_expanding() -> None:
    plan = BlockPlan(3 * BS, "f" * 64)
    huge = BlockRequest(plan.transfer_id, ((0, 1 << 24),))
    with pytest.raises(LengthMismatchError):
        huge.blocks(plan)
