"""``Registry.ingest_many`` (set-wise) gives exactly what sequential ``Registry.ingest`` gives.

Property-style: seeded random rounds of items (duplicates within and across items, gaps,
floors, invalid floors, entries of another device, unknown and revoked devices, a re-enrolled
device in its second epoch, several items of one device per round) go through ``ingest_many``
on one fresh registry and through one ``ingest`` call per item on another; every result, the
final ``seq_state``, ``last_seen`` and the stored rows must match. The helpers are shared with
``tests/integration/test_ingest_many_postgres.py``.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from edge_agent.wire.telemetry import Event
from fleet_server.errors import RegistryError
from fleet_server.registry.store import Registry
from fleet_server.registry.tables.core import TelemetryRow
from fleet_server.registry.values import IngestResult, TelemetryEntry

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
LIVE = ("dev-a", "dev-b", "dev-c", "dev-d")
REVOKED = "dev-r"
REENROLLED = "dev-e"
UNKNOWN = "dev-x"
Item = tuple[str, list[TelemetryEntry | Event], int | None]


def prepared(url: str) -> Registry:
    """A migrated registry with the fixture devices (same operations on every registry)."""
    reg = Registry.open(url, clock=lambda: NOW)
    reg.upgrade()
    for d in (*LIVE, REVOKED, REENROLLED):
        reg.enroll(d)
    # Epoch 1 rows of the re-enrolled device must not count for its epoch 2.
    reg.ingest(REENROLLED, [TelemetryEntry(s, "report", {"old": s}) for s in (1, 2, 3, 7)])
    reg.revoke(REENROLLED)
    reg.enroll(REENROLLED)
    reg.revoke(REVOKED)
    return reg


def random_item(rng: random.Random, frontier: dict[str, int], index: int) -> Item:
    """One item; ``frontier`` (per device, roughly its highest seq so far) moves forward."""
    device = rng.choice([*LIVE, *LIVE, REENROLLED, REENROLLED, REVOKED, UNKNOWN])
    top = frontier.get(device, 0)
    n = rng.choice([0, 1, 1, 2, 3, 5, 8])
    lo = max(1, top - 4)
    seqs = [rng.randint(lo, top + 6) for _ in range(n)]
    if seqs and rng.random() < 0.3:
        seqs.append(rng.choice(seqs))  # a duplicate within the item
    frontier[device] = max([top, *seqs])
    floor: int | None = None
    roll = rng.random()
    if roll < 0.25:
        floor = rng.randint(1, min(seqs) if seqs else top + 5)
    elif roll < 0.28:
        floor = (min(seqs) + 1) if seqs else 0  # invalid: above a seq, or below 1
    entries = [TelemetryEntry(s, "report", {"seq": s, "item": index}) for s in seqs]
    mixed: list[TelemetryEntry | Event] = list(entries)
    if rng.random() < 0.03:  # an entry of another device: the whole item is refused
        mixed.append(Event(device_id="dev-other", seq=top + 1, kind="installed", at=1.0))
    elif rng.random() < 0.1:  # a real event of this device
        mixed.append(Event(device_id=device, seq=top + 1, kind="installed", at=1.0))
        frontier[device] = max(frontier[device], top + 1)
    return device, mixed, floor


def outcome(r: IngestResult | RegistryError) -> Any:
    return r if isinstance(r, IngestResult) else (type(r).__name__, str(r))


def sequential(reg: Registry, items: list[Item]) -> list[Any]:
    out: list[Any] = []
    for device, entries, floor in items:
        try:
            out.append(outcome(reg.ingest(device, entries, floor=floor)))
        except RegistryError as exc:
            out.append(outcome(exc))
    return out


def snapshot(reg: Registry) -> tuple[Any, ...]:
    states = [reg.seq_state(d) for d in (*LIVE, REVOKED, REENROLLED)]
    seen = [reg.get_device(d).last_seen for d in (*LIVE, REVOKED, REENROLLED)]
    cols = (TelemetryRow.device_id, TelemetryRow.epoch, TelemetryRow.seq, TelemetryRow.kind)
    with reg.engine.connect() as conn:
        rows = [
            (*r[:4], r[4])
            for r in conn.execute(select(*cols, TelemetryRow.payload).order_by(TelemetryRow.id))
        ]
    return states, seen, rows


def check_equivalent(url_batched: str, url_sequential: str, seed: int, rounds: int) -> None:
    """Run ``rounds`` random rounds through both paths and compare everything after each."""
    rng = random.Random(seed)
    batched, reference = prepared(url_batched), prepared(url_sequential)
    try:
        frontier: dict[str, int] = {REENROLLED: 0}
        index = 0
        for _ in range(rounds):
            items = []
            for _ in range(rng.randint(1, 25)):
                items.append(random_item(rng, frontier, index))
                index += 1
            got = [outcome(r) for r in batched.ingest_many(items)]
            want = sequential(reference, items)
            assert got == want, f"seed {seed}"
            assert snapshot(batched) == snapshot(reference), f"seed {seed}"
    finally:
        batched.close()
        reference.close()


@pytest.fixture
def two_sqlite(tmp_path: Path) -> tuple[str, str]:
    return f"sqlite:///{tmp_path}/batched.db", f"sqlite:///{tmp_path}/sequential.db"


@pytest.mark.parametrize("seed", range(12))
def test_ingest_many_matches_sequential_ingest_sqlite(
    two_sqlite: tuple[str, str], seed: int
) -> None:
    check_equivalent(*two_sqlite, seed=seed, rounds=15)


def test_several_items_of_one_device_in_one_batch(two_sqlite: tuple[str, str]) -> None:
    """A hand-written case: gap, fill, floor and a recovered seq of one device in one batch."""
    batched, reference = prepared(two_sqlite[0]), prepared(two_sqlite[1])

    def e(*seqs: int) -> list[TelemetryEntry | Event]:
        return [TelemetryEntry(s, "report", {"s": s}) for s in seqs]

    items: list[Item] = [
        ("dev-a", e(1, 2, 4), None),  # gap at 3
        ("dev-a", e(6), 6),  # floor 6: 3 and 5 lost, mark 6
        ("dev-a", e(3, 3, 7), None),  # 3 recovered (and a duplicate), mark 7
        (UNKNOWN, e(1), None),
        ("dev-a", e(), 9),  # floor only: 8 lost
    ]
    got = [outcome(r) for r in batched.ingest_many(items)]
    assert got == sequential(reference, items)
    assert got[0] == IngestResult("dev-a", 2, 1, 3, 0, 0, 0)
    assert got[1] == IngestResult("dev-a", 6, 0, 1, 0, 2, 0)
    assert got[2] == IngestResult("dev-a", 7, 0, 2, 1, 0, 1)
    assert got[3] == ("UnknownDeviceError", "device 'dev-x' is not enrolled")
    assert got[4] == IngestResult("dev-a", 8, 0, 0, 0, 1, 0)
    assert snapshot(batched) == snapshot(reference)
    assert batched.seq_state("dev-a").lost == 2  # 3, 5 lost, 3 recovered, 8 lost
    batched.close()
    reference.close()
