"""``Registry.ingest_many`` equals sequential ``ingest`` on a real, throwaway PostgreSQL.

Same seeded random rounds as ``tests/unit/test_ingest_many_equivalence.py`` (its helpers), on two
fresh databases of the ``pg`` cluster: the PostgreSQL statements (``ON CONFLICT DO NOTHING
RETURNING`` through insertmanyvalues, ``SELECT ... FOR UPDATE`` over the batch's ``device_seq``
rows, the executemany ``UPDATE``) must give exactly the sequential results.
"""

from __future__ import annotations

import threading

import pytest

from fleet_server.registry.store import Registry
from fleet_server.registry.values import TelemetryEntry
from pg import PgCluster
from unit.test_ingest_many_equivalence import check_equivalent

pytest.importorskip("psycopg", reason="psycopg (PostgreSQL driver) is not installed")


@pytest.mark.parametrize("seed", range(4))
def test_ingest_many_matches_sequential_ingest_postgres(pg: PgCluster, seed: int) -> None:
    check_equivalent(pg.new_database(), pg.new_database(), seed=seed, rounds=10)


def test_concurrent_batches_of_overlapping_devices_postgres(pg: PgCluster) -> None:
    """Two workers storing overlapping batches at once: no deadlock, nothing counted twice."""
    reg = Registry.open(pg.new_database())
    reg.upgrade()
    devices = [f"dev-{i:02d}" for i in range(20)]
    for d in devices:
        reg.enroll(d)
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def worker(order: list[str]) -> None:
        try:
            start.wait()
            for base in range(1, 41, 4):
                reg.ingest_many(
                    [
                        (d, [TelemetryEntry(s, "report", {}) for s in range(base, base + 4)], None)
                        for d in order
                    ]
                )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=worker, args=(devices,)),
        threading.Thread(target=worker, args=(devices[::-1],)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    for d in devices:
        state = reg.seq_state(d)
        assert (state.acked_upto, state.gaps, state.lost, state.duplicates) == (40, 0, 0, 40)
    assert len(reg.telemetry(limit=10_000)) == 20 * 40
    reg.close()
