"""Profile one gateway worker's ingest path at the real message shape, without MQTT.

What a worker does per telemetry message, timed part by part on one thread against a throwaway
PostgreSQL (``fleetworkers.PgCluster``) with ``--devices`` enrolled devices: ``parse_telemetry``
(the MQTT handler thread's work: unpack packed-1, strict JSON, the report's ``from_dict``), then
``Registry.ingest_many`` in batches of ``--batch`` messages (the ingest thread's transaction),
then the ack payload of each stored message (``TelemetryAck.to_bytes``). Messages are one real
report each (``ingest_shape``: the agent's reports at ``--traffic`` requests/s, drift windows
included), as JSON and as packed-1. Prints CPU microseconds per message of each part (this
process's thread CPU; PostgreSQL's CPU separately from its processes), and with ``--profile``
the top functions of a cProfile of the whole path.

Usage:
    .venv/bin/python bench/profile_ingest.py [--devices 1000] [--messages 4000] [--batch 100]
        [--traffic 10] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from edge_agent.wire.telemetry import TelemetryAck
from fleet_server.gateway.ingest_parse import ACCEPTED_ENCODINGS, IngestItem, parse_telemetry
from fleet_server.registry.store import Registry
from fleetbench import device_ids
from fleetworkers import PgCluster
from ingest_shape import Shape, real_reports


def run(
    registry: Registry, shape: Shape, ids: list[str], start: int, n: int, batch: int
) -> dict[str, float]:
    msgs = []
    for i in range(n):
        device = ids[i % len(ids)]
        seq = start + i // len(ids) + 1
        msgs.append((device, shape.message(device, seq)))
    t0 = time.thread_time()
    items = []
    for device, payload in msgs:
        item = parse_telemetry("telemetry", device, payload)
        assert isinstance(item, IngestItem), item
        items.append(item)
    t1 = time.thread_time()
    w0 = time.monotonic()
    results = []
    for i in range(0, len(items), batch):
        part = items[i : i + batch]
        results.extend(registry.ingest_many([(x.device_id, x.entries, x.floor) for x in part]))
    w1 = time.monotonic()
    t2 = time.thread_time()
    for r in results:
        TelemetryAck(r.device_id, r.acked_upto, accepts=ACCEPTED_ENCODINGS).to_bytes()  # type: ignore[union-attr]
    t3 = time.thread_time()
    return {
        "parse_us": (t1 - t0) / n * 1e6,
        "ingest_us": (t2 - t1) / n * 1e6,
        "ingest_wall_us": (w1 - w0) / n * 1e6,
        "ack_us": (t3 - t2) / n * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--traffic", type=float, default=10.0, help="agent requests/s (reports)")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    reports = real_reports(args.traffic, 30.0)
    pg = PgCluster()
    pg.start()
    try:
        url = pg.create_database("registry")
        registry = Registry.open(url)
        registry.upgrade()
        ids = device_ids(args.devices)
        for d in ids:
            registry.enroll(d, group="bench")
        start = 0
        for packed in (False, True, False, True):
            shape = Shape.of(reports, packed)
            prof = cProfile.Profile() if args.profile else None
            p0 = pg.cpu_seconds()
            if prof:
                prof.enable()
            res = run(registry, shape, ids, start, args.messages, args.batch)
            if prof:
                prof.disable()
            res["pg_us"] = (pg.cpu_seconds() - p0) / args.messages * 1e6
            start += args.messages // len(ids) + 1
            name = "packed-1" if packed else "json"
            print(
                f"{name:8} {shape.mean_bytes():7,.0f} B/msg windows {shape.windows_share():.2f}: "
                + "  ".join(f"{k} {v:7.1f}" for k, v in res.items()),
                flush=True,
            )
            if prof:
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
                print(out.getvalue())
        registry.close()
    finally:
        pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
