"""The telemetry outbox: order, seq continuity, byte bound with priority drops, acks, crashes."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import edge_agent
from clock import FakeClock
from edge_agent.errors import EdgefleetError
from edge_agent.sync.outbox import (
    CORRUPT_KIND,
    SEQ_BLOCK,
    AckOutOfRangeError,
    DropCount,
    Outbox,
    OutboxCorruptError,
    OutboxError,
    PayloadTooLargeError,
)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "outbox.db"


def test_entries_come_back_in_seq_order_with_their_fields(db: Path) -> None:
    clock = FakeClock(1_700_000_000.0)
    with Outbox(db, 10_000, clock) as box:
        seqs = []
        for i in range(5):
            clock.now += 1
            seqs.append(box.append(f"k{i}", bytes([i]) * 3, "event" if i % 2 else "report"))
        assert seqs == [1, 2, 3, 4, 5]
        got = box.pending(limit=10)
        assert [e.seq for e in got] == seqs
        assert [e.kind for e in got] == ["k0", "k1", "k2", "k3", "k4"]
        assert [e.priority for e in got] == ["report", "event", "report", "event", "report"]
        assert got[2].payload == b"\x02\x02\x02"
        assert got[0].created == 1_700_000_001.0


def test_seq_continues_across_reopen_and_after_acking_everything(db: Path) -> None:
    with Outbox(db, 10_000) as box:
        for _ in range(3):
            box.append("r", b"x")
        box.ack(3)
        assert box.pending() == []
    with Outbox(db, 10_000) as box:
        assert box.append("r", b"y") == 4
        assert box.stats().next_seq == 5
    # Even without a clean close (a crash), seq never goes back.
    box = Outbox(db, 10_000)
    assert box.append("r", b"z") == 5
    reopened = Outbox(db, 10_000)
    assert reopened.append("r", b"w") == 6
    assert [e.payload for e in reopened.pending()] == [b"y", b"z", b"w"]
    reopened.close()
    box.close()


def test_full_outbox_drops_oldest_reports_before_any_event(db: Path) -> None:
    with Outbox(db, 100) as box:
        box.append("alarm", b"e" * 20, "event")  # seq 1
        for _ in range(4):  # seq 2..5
            box.append("window", b"r" * 20, "report")
        # 100 bytes held; a 30-byte event must evict the two oldest reports (2, 3), no event.
        box.append("alarm", b"E" * 30, "event")  # seq 6
        assert [e.seq for e in box.pending()] == [1, 4, 5, 6]
        assert box.dropped() == {("report", "window"): DropCount(entries=2, bytes=40)}
        stats = box.stats()
        assert (stats.entries, stats.bytes) == (4, 90)


def test_new_report_is_itself_dropped_when_only_events_are_older(db: Path) -> None:
    with Outbox(db, 60) as box:
        for _ in range(3):
            box.append("alarm", b"e" * 20, "event")
        seq = box.append("window", b"r" * 10, "report")
        assert seq == 4  # assigned (a seq gap the server will see), then dropped and counted
        assert [e.seq for e in box.pending()] == [1, 2, 3]
        assert box.dropped() == {("report", "window"): DropCount(entries=1, bytes=10)}


def test_oldest_events_go_when_only_events_remain(db: Path) -> None:
    with Outbox(db, 60) as box:
        box.append("window", b"r" * 20, "report")
        box.append("alarm", b"a" * 20, "event")
        box.append("crash", b"c" * 20, "event")
        box.append("crash", b"d" * 50, "event")  # needs 50: report (20) + both old events (40)
        assert [e.payload for e in box.pending()] == [b"d" * 50]
        assert box.dropped() == {
            ("event", "alarm"): DropCount(1, 20),
            ("event", "crash"): DropCount(1, 20),
            ("report", "window"): DropCount(1, 20),
        }


def test_drop_counters_survive_reopen_and_accumulate(db: Path) -> None:
    with Outbox(db, 10) as box:
        for _ in range(3):
            box.append("window", b"r" * 10)
    with Outbox(db, 10) as box:
        box.append("window", b"r" * 10)
        assert box.dropped() == {("report", "window"): DropCount(3, 30)}
        assert box.stats().dropped == box.dropped()


def test_payload_larger_than_the_bound_is_refused_and_nothing_changes(db: Path) -> None:
    with Outbox(db, 100) as box:
        box.append("window", b"r" * 50)
        with pytest.raises(PayloadTooLargeError) as info:
            box.append("window", b"x" * 101)
        assert isinstance(info.value, EdgefleetError)
        assert box.stats().next_seq == 2
        assert box.dropped() == {}
        assert box.append("window", b"x" * 100) == 2  # exactly the bound fits, evicting seq 1


def test_unknown_priority_and_bad_bounds_are_refused(db: Path) -> None:
    with pytest.raises(OutboxError):
        Outbox(db, 0)
    with Outbox(db, 100) as box:
        with pytest.raises(OutboxError):
            box.append("x", b"1", "urgent")  # type: ignore[arg-type]
        with pytest.raises(OutboxError):
            box.pending(limit=0)


def test_ack_is_partial_idempotent_and_ignores_regressions(db: Path) -> None:
    with Outbox(db, 10_000) as box:
        for _ in range(6):
            box.append("r", b"12345")
        assert box.ack(0) == 0
        assert box.ack(2) == 2
        assert [e.seq for e in box.pending()] == [3, 4, 5, 6]
        assert box.ack(2) == 0
        assert box.ack(1) == 0
        assert box.ack(4) == 2
        stats = box.stats()
        assert (stats.entries, stats.bytes, stats.acked_upto, stats.oldest_seq) == (2, 10, 4, 5)
    with Outbox(db, 10_000) as box:  # the ack mark is persistent
        assert box.ack(3) == 0
        assert box.stats().acked_upto == 4


def test_ack_beyond_the_highest_assigned_seq_is_refused(db: Path) -> None:
    with Outbox(db, 10_000) as box:
        with pytest.raises(AckOutOfRangeError):
            box.ack(1)
        box.append("r", b"1")
        box.append("r", b"2")
        with pytest.raises(AckOutOfRangeError):
            box.ack(3)
        assert len(box.pending()) == 2  # the refused ack deleted nothing
        assert box.ack(2) == 2


def test_ack_across_dropped_seqs_frees_exactly_what_is_held(db: Path) -> None:
    with Outbox(db, 30) as box:
        for _ in range(5):
            box.append("r", b"x" * 10)  # seqs 1, 2 dropped
        assert box.ack(4) == 2
        assert box.stats().bytes == 10
        box.append("r", b"y" * 20)  # fits without drops: the byte counter is right
        assert box.dropped()[("report", "r")] == DropCount(2, 20)


def test_pending_respects_count_and_byte_limits(db: Path) -> None:
    with Outbox(db, 10_000) as box:
        for size in (10, 20, 30, 40, 500):
            box.append("r", b"x" * size)
        assert [e.seq for e in box.pending(limit=2)] == [1, 2]
        assert [e.seq for e in box.pending(limit=10, max_batch_bytes=60)] == [1, 2, 3]
        assert [e.seq for e in box.pending(limit=10, max_batch_bytes=59)] == [1, 2]
        assert [e.seq for e in box.pending(limit=2, max_batch_bytes=1_000)] == [1, 2]
        box.ack(4)
        # An entry larger than the batch limit still goes out alone rather than jamming.
        assert [e.seq for e in box.pending(limit=10, max_batch_bytes=100)] == [5]
        assert box.pending() == box.pending()  # reading does not consume


def test_stats_report_age_size_and_position(db: Path) -> None:
    clock = FakeClock(1_700_000_000.0)
    with Outbox(db, 1_000, clock) as box:
        empty = box.stats()
        assert (empty.entries, empty.bytes, empty.oldest_age, empty.oldest_seq) == (
            0,
            0,
            None,
            None,
        )
        assert empty.next_seq == 1
        box.append("r", b"abc")
        clock.now += 42.5
        box.append("e", b"de", "event")
        stats = box.stats()
        assert (stats.entries, stats.bytes, stats.oldest_seq, stats.next_seq) == (2, 5, 1, 3)
        assert stats.oldest_age == pytest.approx(42.5)


def test_database_is_wal_with_full_sync(db: Path) -> None:
    with Outbox(db, 100) as box:
        box.append("r", b"x")
        con = sqlite3.connect(db)
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        con.close()
        assert box._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_concurrent_appends_get_unique_contiguous_seqs(db: Path) -> None:
    with Outbox(db, 1_000_000) as box:
        got: list[int] = []
        lock = threading.Lock()

        def work() -> None:
            for _ in range(25):
                seq = box.append("r", b"x")
                with lock:
                    got.append(seq)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(got) == list(range(1, 101))


def test_garbage_file_is_a_typed_error_and_recover_counts_the_loss(db: Path) -> None:
    with Outbox(db, 1_000) as box:
        for _ in range(3):
            box.append("r", b"x")
    db.with_name(db.name + "-wal").unlink(missing_ok=True)
    db.write_bytes(b"this is not a database" * 200)
    with pytest.raises(OutboxCorruptError):
        Outbox(db, 1_000)
    clock = FakeClock(1_700_000_000.0)
    with Outbox.recover(db, 1_000, clock) as box:
        assert box.pending() == []
        assert box.dropped() == {("event", CORRUPT_KIND): DropCount(1, 4_400)}
        # seq continues after everything ever reserved, so the server never sees a reused seq.
        assert box.append("r", b"new") > 3
        assert box.append("r", b"new") == SEQ_BLOCK + 2
    quarantined = db.with_name(f"{db.name}.corrupt-{int(clock.now)}")
    assert quarantined.read_bytes().startswith(b"this is not")


def test_damaged_pages_inside_a_valid_file_are_detected(db: Path) -> None:
    with Outbox(db, 10_000_000) as box:
        for i in range(200):
            box.append("r", bytes([i % 256]) * 1_000)
        box._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = db.stat().st_size
    with db.open("r+b") as f:  # leave the header page, trash the b-tree pages after it
        f.seek(4096)
        f.write(os.urandom(size - 4096))
    with pytest.raises(OutboxCorruptError):
        Outbox(db, 10_000_000)


def test_seq_is_not_reused_when_the_database_disappears(db: Path) -> None:
    with Outbox(db, 1_000) as box:
        last = [box.append("r", b"x") for _ in range(5)][-1]
    for suffix in ("", "-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    with Outbox(db, 1_000) as box:
        assert box.append("r", b"y") > last


_WRITER = """
import sys
from pathlib import Path
from edge_agent.sync.outbox import Outbox

box = Outbox(Path(sys.argv[1]), 50_000_000)
tag = sys.argv[2]
i = 0
while True:
    seq = box.append("window", f"{tag}:{i}".encode(), "event" if i % 7 == 0 else "report")
    print("S", seq, i, flush=True)
    if i % 40 == 39:
        box.ack(seq - 20)
        print("A", seq - 20, flush=True)
    i += 1
"""


def test_sigkill_at_random_times_loses_no_committed_entry_and_reuses_no_seq(db: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(edge_agent.__file__).parents[1])}
    rng = random.Random(4)
    expected: dict[int, bytes] = {}  # every append that returned, across all rounds
    acked = 0
    next_seq = 1
    for round_no in range(10):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(db), f"r{round_no}"],
            stdout=subprocess.PIPE,
            env=env,
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()  # at least one append committed before the kill
        # Not a wait for something: the kill lands at a random point of the writes (the test).
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        out = first + proc.stdout.read()
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        seqs = []
        for line in out.decode().splitlines(keepends=True):
            if not line.endswith("\n"):
                continue  # torn print at the kill
            fields = line.split()
            if fields[0] == "S":
                seqs.append(int(fields[1]))
                expected[int(fields[1])] = f"r{round_no}:{fields[2]}".encode()
            else:
                acked = max(acked, int(fields[1]))
        assert seqs[0] == next_seq, "seq did not continue after the highest ever assigned"
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))

        with Outbox(db, 50_000_000) as box:
            stats = box.stats()
            assert stats.acked_upto >= acked
            assert stats.next_seq > max(seqs)
            held = {e.seq: e.payload for e in box.pending(limit=1_000_000)}
            # Nothing vanished: the held seqs are exactly those assigned and not yet acked.
            assert sorted(held) == list(range(stats.acked_upto + 1, stats.next_seq))
            for seq, payload in expected.items():
                if seq > stats.acked_upto:
                    assert held[seq] == payload
            assert box.dropped() == {}
            next_seq = stats.next_seq
