"""Where the gateway's telemetry ingest time goes, without MQTT: parse vs database transaction.

Feeds ``fleet_server.gateway.ingest.parse_telemetry`` and ``Registry.ingest_many`` (SQLite file,
WAL,
the registry's own pragmas) with the same ``Batch`` messages ``fleetsim`` devices send, in
transactions of ``--messages`` messages, and prints per-message wall and CPU cost of each step,
plus the top functions of one profiled run. ``--sync normal`` re-runs the same load with
``PRAGMA synchronous=NORMAL`` set after connect, to show the share of the per-commit fsync.

Usage:
    .venv/bin/python bench/fleetprofile.py [--devices 1000] [--messages 100] [--batch 5]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import event

sys.path.insert(0, str(Path(__file__).resolve().parent))

from edge_agent.wire.telemetry import Batch
from fleet_server.gateway.ingest_parse import IngestItem, parse_telemetry
from fleet_server.registry.store import Registry
from fleetsim import make_report


def run(args: argparse.Namespace, sync: str, profile: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        registry = Registry.open(f"sqlite:///{d}/r.db")
        if sync != "full":

            @event.listens_for(registry.engine, "connect")
            def _sync(dbapi_conn: object, _r: object) -> None:
                cur = dbapi_conn.cursor()  # type: ignore[attr-defined]
                cur.execute(f"PRAGMA synchronous={sync.upper()}")
                cur.close()

        registry.upgrade()
        ids = [f"dev-{i:05d}" for i in range(args.devices)]
        for device in ids:
            registry.enroll(device)
        seq = dict.fromkeys(ids, 0)
        now = time.time()
        payloads: list[tuple[str, bytes]] = []
        for r in range(args.rounds):
            for i in range(args.messages):
                device = ids[(r * args.messages + i) % len(ids)]
                first = seq[device] + 1
                items = tuple(make_report(device, s, now) for s in range(first, first + args.batch))
                seq[device] = first + args.batch - 1
                payloads.append((device, Batch(device, items, floor=first).to_bytes()))
        parse_wall = parse_cpu = db_wall = db_cpu = 0.0
        prof = cProfile.Profile() if profile else None
        for r in range(args.rounds):
            chunk = payloads[r * args.messages : (r + 1) * args.messages]
            t, c = time.perf_counter(), time.thread_time()
            parsed = [parse_telemetry("telemetry", dev, p) for dev, p in chunk]
            parse_wall += time.perf_counter() - t
            parse_cpu += time.thread_time() - c
            batch = [(i.device_id, i.entries, i.floor) for i in parsed if isinstance(i, IngestItem)]
            t, c = time.perf_counter(), time.thread_time()
            if prof is not None:
                prof.enable()
            registry.ingest_many(batch)
            if prof is not None:
                prof.disable()
            db_wall += time.perf_counter() - t
            db_cpu += time.thread_time() - c
        registry.close()
        n = args.rounds * args.messages
        if prof is not None:
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
            print(out.getvalue(), file=sys.stderr)
        return {
            "parse_ms": 1000 * parse_wall / n,
            "parse_cpu_ms": 1000 * parse_cpu / n,
            "db_ms": 1000 * db_wall / n,
            "db_cpu_ms": 1000 * db_cpu / n,
            "commit_ms": 1000 * (db_wall - db_cpu) / args.rounds,
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--messages", type=int, default=100, help="messages per transaction")
    ap.add_argument("--batch", type=int, default=5, help="reports per message")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    print("| sync | reports/msg | msgs/txn | parse ms/msg (cpu) | ingest_many ms/msg (cpu) |")
    print("|---|---:|---:|---:|---:|")
    for sync in ("full", "normal"):
        r = run(args, sync, args.profile and sync == "full")
        print(
            f"| {sync} | {args.batch} | {args.messages} | {r['parse_ms']:.3f} "
            f"({r['parse_cpu_ms']:.3f}) | {r['db_ms']:.3f} ({r['db_cpu_ms']:.3f}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
