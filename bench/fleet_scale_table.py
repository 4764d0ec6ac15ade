"""Print how each fleet cost grows with the fleet, from ``bench_fleet.py --json`` files.

Reads one JSON file per fleet size (as written by ``bench_fleet.py --json``), sorts them by
device count and prints one markdown row per figure with a column per size and the growth of
the largest size over the smallest next to the growth of the fleet itself. It measures
nothing; the figures and the conditions they were taken in are the bench runs'.

Usage:
    .venv/bin/python bench/fleet_scale_table.py RUN.json [RUN.json ...]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Getter = Callable[[dict[str, Any]], float | None]


def _get(*keys: str) -> Getter:
    def get(run: dict[str, Any]) -> float | None:
        node: Any = run
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return None
            node = node[k]
        return float(node) if isinstance(node, int | float) else None

    return get


def _per(num: Getter, den: Getter, scale: float = 1.0) -> Getter:
    def get(run: dict[str, Any]) -> float | None:
        a, b = num(run), den(run)
        return None if a is None or not b else scale * a / b

    return get


def _sum(*getters: Getter) -> Getter:
    def get(run: dict[str, Any]) -> float | None:
        vals = [g(run) for g in getters]
        return None if any(v is None for v in vals) else sum(v for v in vals if v is not None)

    return get


def _bytes(run: dict[str, Any]) -> float | None:
    """Bytes delivered to devices in B (blocks received x bundle length / blocks)."""
    b = run.get("b")
    if not b or not b.get("n_blocks"):
        return None
    length = run["args"]["bundle_mb"] * 1024 * 1024
    return float(b["received"]) * length / b["n_blocks"]


def _host(after: str, key: str) -> Getter:
    """The host's load sampled right after scenario ``after`` (other tenants included)."""

    def get(run: dict[str, Any]) -> float | None:
        for h in run.get("host", []):
            if h.get("after") == after:
                return float(h[key])
        return None

    return get


ROWS: list[tuple[str, Getter, int]] = [
    ("connect: time to all connected (s)", _get("connect", "seconds"), 1),
    ("connect: rate (connections/s)", _get("connect", "per_s"), 0),
    ("connect: Mosquitto CPU (s)", _get("connect", "mosquitto_cpu_s"), 1),
    ("connect: device workers CPU (s)", _get("connect", "workers_cpu_s"), 1),
    ("connected: Mosquitto RSS (MiB)", _get("connect", "mosquitto", "rss_mib"), 0),
    ("connected: Mosquitto open fds", _get("connect", "mosquitto", "fds"), 0),
    ("connected: device workers RSS (MiB, all)", _get("connect", "workers", "rss_mib"), 0),
    ("connected: device workers threads (all)", _get("connect", "workers", "threads"), 0),
    (
        "A: reports/s the devices sent (same rate per device)",
        _get("a", "rate", "offered_items_s"),
        0,
    ),
    ("A: reports/s stored", _get("a", "rate", "items_s"), 0),
    ("A: MQTT msgs/s stored", _get("a", "rate", "msgs_s"), 0),
    ("A: ingest lag p50 (s)", _get("a", "rate", "lag_p50"), 3),
    ("A: ingest lag p99 (s)", _get("a", "rate", "lag_p99"), 3),
    ("A: batches resent after the 10 s ack timeout", _get("a", "rate", "resends"), 0),
    ("A: server duplicates dropped (resent batches)", _get("a", "check", "server_duplicates"), 0),
    ("A: Mosquitto CPU (cores)", _get("a", "rate", "mosquitto_cpu"), 2),
    ("A: device workers CPU (cores)", _get("a", "rate", "workers_cpu"), 2),
    ("A: gateway ingest thread CPU (cores)", _get("a", "rate", "threads_cpu", "fleet-ingest"), 2),
    ("A: bare consumer msgs/s (flood baseline)", _get("a", "bare_msgs_s"), 0),
    ("A check: rows stored", _get("a", "check", "stored_rows"), 0),
    ("A check: seqs sent", _get("a", "check", "expected_rows"), 0),
    ("A check: duplicate rows", _get("a", "check", "duplicate_rows"), 0),
    ("R: broker down (s)", _get("r", "broker_down_s"), 2),
    ("R: devices dropped", _get("r", "dropped"), 0),
    ("R: connections lost (more than devices: dropped again)", _get("r", "drops"), 0),
    ("R: all reconnected (s after broker up)", _get("r", "all_reconnected_s"), 1),
    ("R: reconnects/s", _get("r", "reconnects_per_s"), 0),
    ("R: telemetry caught up (s after broker up)", _get("r", "caught_up_s"), 1),
    ("R: ingest lag p99 over the phase (s)", _get("r", "lag_p99"), 2),
    ("R: resends after ack timeout", _get("r", "resends"), 0),
    ("R: Mosquitto CPU after restart (s)", _get("r", "mosquitto_cpu_after_s"), 1),
    ("R check: rows stored", _get("r", "check", "stored_rows"), 0),
    ("R check: seqs sent", _get("r", "check", "expected_rows"), 0),
    ("R check: duplicate rows", _get("r", "check", "duplicate_rows"), 0),
    ("R check: mismatched devices", _get("r", "check", "devices_mismatch"), 0),
    ("B: time to all devices installed (s)", _get("b", "seconds"), 1),
    ("B: bare broadcast, same bytes (s)", _get("b_bare", "seconds"), 1),
    (
        "B: ratio to the bare broadcast (same run)",
        _per(_get("b", "seconds"), _get("b_bare", "seconds")),
        2,
    ),
    ("B: median device installed (s)", _get("b", "p50_seconds"), 1),
    ("B: bare broadcast, median device (s)", _get("b_bare", "p50_seconds"), 1),
    ("B: devices complete, byte-exact", _get("b", "complete"), 0),
    ("B: bare broadcast, devices complete", _get("b_bare", "complete"), 0),
    ("B: bad blocks (system + bare)", _sum(_get("b", "bad"), _get("b_bare", "bad")), 0),
    ("B: stale blocks delivered after all complete", _get("b", "stale_after_done"), 0),
    ("B: bytes delivered (GB)", _per(_bytes, lambda _r: 1.0, 1e-9), 1),
    ("B: Mosquitto CPU (s)", _get("b", "mosquitto_cpu_s"), 1),
    ("B: Mosquitto CPU per GB delivered (s)", _per(_get("b", "mosquitto_cpu_s"), _bytes, 1e9), 2),
    ("B: device workers CPU (s)", _get("b", "workers_cpu_s"), 1),
    ("B: block requests served", _get("b", "block_requests_served"), 0),
    ("B: bare broadcast Mosquitto CPU (s)", _get("b_bare", "mosquitto_cpu_s"), 1),
    ("B: bare broadcast device workers CPU (s)", _get("b_bare", "workers_cpu_s"), 1),
    ("B: device workers peak RSS (MiB, all)", _get("b", "workers", "peak_rss_mib"), 0),
    ("B: Mosquitto peak RSS (MiB)", _get("b", "mosquitto", "peak_rss_mib"), 0),
    ("B: workers' longest loop pass (s)", _get("b", "max_pass_s"), 2),
    ("B: bare broadcast, workers' longest loop pass (s)", _get("b_bare", "max_pass_s"), 2),
    ("B: server blocks broadcast", _get("b", "blocks_broadcast"), 0),
    ("B: server blocks unicast", _get("b", "blocks_unicast"), 0),
    ("host load average (1 min) after connect", _host("connect", "loadavg_1m"), 1),
    ("host load average (1 min) after A", _host("a", "loadavg_1m"), 1),
    ("host load average (1 min) after R", _host("r", "loadavg_1m"), 1),
    ("host load average (1 min) after the bare broadcast", _host("b_bare", "loadavg_1m"), 1),
    ("host load average (1 min) after B", _host("b", "loadavg_1m"), 1),
    ("host CPU pressure (% waiting, 10 s) after connect", _host("connect", "cpu_pressure_10s"), 0),
    ("host CPU pressure (% waiting, 10 s) after A", _host("a", "cpu_pressure_10s"), 0),
    ("host CPU pressure (% waiting, 10 s) after R", _host("r", "cpu_pressure_10s"), 0),
    (
        "host CPU pressure (% waiting, 10 s) after the bare broadcast",
        _host("b_bare", "cpu_pressure_10s"),
        0,
    ),
    ("host CPU pressure (% waiting, 10 s) after B", _host("b", "cpu_pressure_10s"), 0),
]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    runs = sorted(
        (json.loads(Path(p).read_text()) for p in argv), key=lambda r: r["args"]["devices"]
    )
    sizes = [r["args"]["devices"] for r in runs]
    growth = f"x{sizes[-1] / sizes[0]:.0f} devices" if len(sizes) > 1 else ""
    print("| figure | " + " | ".join(f"{n:,} devices" for n in sizes) + f" | {growth} |")
    print("|---|" + "---:|" * len(sizes) + "---:|")
    for label, get, digits in ROWS:
        vals = [get(r) for r in runs]
        if all(v is None for v in vals):
            continue
        cells = ["-" if v is None else f"{v:,.{digits}f}" for v in vals]
        first, last = vals[0], vals[-1]
        ratio = f"x{last / first:.1f}" if first and last is not None and len(vals) > 1 else ""
        print(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
