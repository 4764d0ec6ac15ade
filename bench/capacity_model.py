"""Capacity model of an edgefleet deployment from 1,000 to 1,000,000 devices: pure arithmetic.

Holds every input of the model in one place with its source, and prints the tables of
"Capacity model: 1,000 to 1,000,000 devices" in ``docs/scale-out.md``. It imports nothing from
the project and measures nothing: change an input here, run it, and paste the tables.

Each input is tagged with where it comes from:

- ``measured``: a figure this repository's bench scripts printed on the 2-core development VM
  (the doc quotes the command next to the table it comes from);
- ``config``: a default of ``deploy/agent.example.toml`` or of the server's config;
- ``fixture``: the size of a golden payload in ``tests/`` (``wc -c``);
- ``public``: a published figure, cited in the doc;
- ``assumed``: a planning assumption made here, not measured anywhere.

    .venv/bin/python bench/capacity_model.py [--level 1] [--inputs]

``--level`` is the traffic per device whose measured telemetry bytes are used: ``idle``, ``1``
or ``10`` requests per second (the three levels of ``bench/bench_telemetry_bytes.py``).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

DAY = 86_400.0


@dataclass(frozen=True)
class Input:
    value: float
    source: str  # measured | config | fixture | public | assumed
    note: str


# --------------------------------------------------------------------------- device side
REPORT_INTERVAL_S = Input(30.0, "config", "[sync] report_interval_seconds, agent.example.toml")
RECONNECTS_PER_DEVICE_DAY = Input(
    1.0, "assumed", "MQTT reconnects per device per day (status online + will, reported state)"
)

# Report coalescing ([sync] report_coalesce_seconds = 120 in agent.example.toml): plain reports
# wait up to 120 s to share one Batch. Messages per device per day as the uplink's own rule sends
# them, per traffic level: bench/bench_telemetry_bytes.py, "window budget, coalesced 120 s" row
# (2,880 reports a day in 576 messages: 5 reports a message at idle, 1 and 10 req/s).
MESSAGES_PER_DEVICE_DAY = {
    "idle": Input(576.0, "measured", "bench_telemetry_bytes.py, coalesced 120 s, idle"),
    "1": Input(576.0, "measured", "bench_telemetry_bytes.py, coalesced 120 s, 1 req/s"),
    "10": Input(576.0, "measured", "bench_telemetry_bytes.py, coalesced 120 s, 10 req/s"),
}

# Mean payload bytes per report interval at the example config (window budget), per traffic
# level: bench/bench_telemetry_bytes.py (docs/telemetry.md, "What it costs per device"; these
# are the run of 2026-12-08, within 0-4 % of the one tabled there).
# JSON: one report per message; a coalesced JSON message carries k of them (k x these bytes:
# each report is its own JSON object, only the Batch envelope is shared). Packed-1: the
# "coalesced as configured" row, i.e. already k reports per DEFLATE stream.
PAYLOAD_JSON_B = {
    "idle": Input(789.0, "measured", "bench_telemetry_bytes.py, json, idle, B/report"),
    "1": Input(3_172.0, "measured", "bench_telemetry_bytes.py, json, 1 req/s, B/report"),
    "10": Input(4_157.0, "measured", "bench_telemetry_bytes.py, json, 10 req/s, B/report"),
}
PAYLOAD_PACKED_B = {
    "idle": Input(32.0, "measured", "bench_telemetry_bytes.py, packed-1 coalesced, idle, B/report"),
    "1": Input(
        342.0, "measured", "bench_telemetry_bytes.py, packed-1 coalesced, 1 req/s, B/report"
    ),
    "10": Input(
        514.0, "measured", "bench_telemetry_bytes.py, packed-1 coalesced, 10 req/s, B/report"
    ),
}
ACK_B = Input(101.0, "measured", "TelemetryAck with accepts (docs/telemetry.md)")
STATUS_B = Input(139.0, "fixture", "tests/fixtures/telemetry/status-v1.json")
DESIRED_B = Input(845.0, "fixture", "tests/compat/desired-shadow-v1-2026-12/message.json")

# Per-message framing on the wire, on top of the payload.
TOPIC_B = Input(40.0, "measured", "topic length, bench_telemetry_bytes.py docstring")
MQTT_HEADER_B = Input(10.0, "assumed", "fixed header, packet id, property length (MQTT 5)")
TLS_RECORD_B = Input(22.0, "public", "TLS 1.3 AES-GCM record: 5 header + 1 type + 16 tag")

# --------------------------------------------------------------------------- server side
WORKER_MSGS_S = Input(
    525.0,
    "measured",
    "lowest one-worker PostgreSQL rate, bench_ingest_workers.py (5 reports of ~1 KB a message);"
    " below the 625 msgs/s that WORKER_CPU_MS_PER_MSG allows one core at the real shape",
)
WORKER_CPU_MS_PER_MSG = Input(
    1.6,
    "measured",
    "gateway worker process CPU per stored message, 1 report of 5.1 KB JSON (10 req/s, drift"
    " windows), highest of twelve phases (JSON and packed-1), bench_ingest_workers.py."
    " Used per report (a coalesced message costs reports x this): an upper bound",
)
DB_ONLY_ROWS_S = Input(
    1_613.0, "measured", "Registry.ingest_many on PostgreSQL, bench_history.py --ingest"
)
HEADROOM = Input(0.5, "assumed", "plan each worker at this share of its measured rate")
MIN_WORKERS = Input(2.0, "assumed", "two workers for availability (a dead one costs nothing)")
PG_CONNS_PER_WORKER = Input(15.0, "config", "SQLAlchemy pool 5 + 10 overflow (scale-out.md)")
PG_CPU_MS_PER_MSG = Input(
    0.46,
    "measured",
    "PostgreSQL CPU per stored message, 1 report of 5.1 KB JSON, highest of twelve phases with"
    " 1, 2 and 4 workers and both encodings, bench_ingest_workers.py (fsync=off); used per"
    " report (a row each)",
)

# Storage: bench/bench_history.py, 1,000 devices, PostgreSQL, measured bytes per row (table +
# indexes) with its report payloads (mean 9,826 B of JSON; tier-A windows of the 64-feature
# input and 10-class output on every second report: heavier than the 10 req/s level above).
PG_RAW_B_ROW = Input(7_635.0, "measured", "bench_history.py, postgresql raw B/row")
PG_KEY_B_ROW = Input(150.0, "measured", "bench_history.py --retention, telemetry_keys B/key")
PG_ROLLUP_B_ROW = Input(4_231.0, "measured", "bench_history.py, postgresql rollup B/row")
BENCH_ROW_JSON_B = Input(9_826.0, "measured", "mean JSON of bench_history.py's report payloads")
RAW_DAYS = Input(3.0, "config", "[retention] raw_days")
FINE_DAYS = Input(1.0, "config", "[retention] fine_days")
HOUR_DAYS = Input(400.0, "config", "[retention] hour_days")
FOLD_S_PER_1K = Input(
    3.26, "measured", "one 5-minute bucket of 1,000 devices folded, bench_history.py, postgresql"
)
FOLD_BUDGET_S = Input(300.0, "config", "one bucket every 5 minutes, on one leader (one core)")
PRUNE_S_PER_1K_DAY = Input(
    55.0, "measured", "24,000 keys pruned in 0.46 s (bench_history.py --retention) x 2.88 M keys"
)

# --------------------------------------------------------------------------- broker
MOSQUITTO_US_PER_MSG = Input(
    55.0,
    "measured",
    "Mosquitto 0.09 cores at 1,579 msgs/s of 8.4 KB JSON in+out to a bare consumer,"
    " bench_ingest_workers.py (packed-1: 48; 5-report batches of ~1 KB: 39); per message",
)
MOSQUITTO_TESTED_CONNECTIONS = Input(
    10_000.0, "measured", "10,000 TLS devices on one Mosquitto, bench_fleet.py --devices 10000"
)
# The next two are listed with the inputs but not used by the tables: they size a broker's
# memory and the CPU of a full reconnect (a restart), quoted in docs/scale-out.md.
MOSQUITTO_KIB_PER_CONNECTION = Input(
    27.0, "measured", "Mosquitto RSS 36 / 88 / 270 MiB at 1k / 3k / 10k TLS devices, bench_fleet.py"
)
MOSQUITTO_MS_PER_CONNECT = Input(
    3.4,
    "measured",
    "Mosquitto CPU per TLS connect + subscribe, 10k devices, saturated host (1.7 ms when quieter)",
)

FLEETS = (1_000, 10_000, 100_000, 1_000_000)


@dataclass(frozen=True)
class PerThousand:
    reports_per_msg: float  # reports in one telemetry message (coalescing)
    telemetry_msgs_s: float  # device -> broker, and again broker -> workers
    ack_msgs_s: float  # worker -> broker, and again broker -> device
    status_msgs_s: float  # device -> broker; delivered to every worker (plain subscription)
    wire_in_json_b_s: float  # device -> broker, telemetry payload + framing
    wire_in_packed_b_s: float
    wire_out_b_s: float  # broker -> devices, acks + framing
    raw_rows_s: float  # one row per report, however many reports a message holds
    key_rows_s: float
    fine_rollups_s: float
    hour_rollups_s: float
    raw_gb_day: float  # measured bytes per row (bench_history payloads)
    key_gb_day: float
    fine_gb_day: float
    hour_gb_day: float


def per_thousand(level: str) -> PerThousand:
    devices = 1_000.0
    reports_day = DAY / REPORT_INTERVAL_S.value
    msgs_day = MESSAGES_PER_DEVICE_DAY[level].value
    k = reports_day / msgs_day
    msgs = devices * msgs_day / DAY
    reports = devices * reports_day / DAY
    frame = TOPIC_B.value + MQTT_HEADER_B.value + TLS_RECORD_B.value
    status = devices * RECONNECTS_PER_DEVICE_DAY.value / DAY
    rows_day = reports * DAY
    return PerThousand(
        reports_per_msg=k,
        telemetry_msgs_s=msgs,
        ack_msgs_s=msgs,
        status_msgs_s=status,
        wire_in_json_b_s=msgs * (k * PAYLOAD_JSON_B[level].value + frame),
        wire_in_packed_b_s=msgs * (k * PAYLOAD_PACKED_B[level].value + frame),
        wire_out_b_s=msgs * (ACK_B.value + frame),
        raw_rows_s=reports,
        key_rows_s=reports,
        fine_rollups_s=devices / 300.0,
        hour_rollups_s=devices / 3_600.0,
        raw_gb_day=rows_day * PG_RAW_B_ROW.value / 1e9,
        key_gb_day=rows_day * PG_KEY_B_ROW.value / 1e9,
        fine_gb_day=devices * 288 * PG_ROLLUP_B_ROW.value / 1e9,
        hour_gb_day=devices * 24 * PG_ROLLUP_B_ROW.value / 1e9,
    )


def retained_gb(p: PerThousand) -> float:
    """Steady-state database size per 1,000 devices after ``HOUR_DAYS``: raw rows live up to
    ``raw_days`` + 1 day on PostgreSQL (a partition goes only when its whole day is past the
    cut); keys and 5-minute rollups go in batches at the cut."""
    raw = (RAW_DAYS.value + 1) * p.raw_gb_day + RAW_DAYS.value * p.key_gb_day
    return raw + FINE_DAYS.value * p.fine_gb_day + HOUR_DAYS.value * p.hour_gb_day


def worker_reports_s(reports_per_msg: float) -> float:
    """One worker's reports/s at ``reports_per_msg``: the measured message rate (5 small
    reports a message) times the reports a message holds, at most one core's worth of its CPU
    per report (a worker process runs one core of Python: the GIL; each report costs what a
    whole message of one 8.4 KB report did, an upper bound)."""
    measured = WORKER_MSGS_S.value * min(reports_per_msg, 5.0)
    return min(measured, 1_000 / WORKER_CPU_MS_PER_MSG.value)


def workers_needed(reports_s: float, reports_per_msg: float) -> int:
    per_worker = worker_reports_s(reports_per_msg) * HEADROOM.value
    return max(int(MIN_WORKERS.value), math.ceil(reports_s / per_worker))


def mosquitto_cores(deliveries_s: float) -> float:
    """One Mosquitto thread's CPU for ``deliveries_s`` messages received and delivered once."""
    return deliveries_s * MOSQUITTO_US_PER_MSG.value / 1e6


def broker_for(devices: int, deliveries_s: float) -> str:
    core = mosquitto_cores(deliveries_s)
    if devices <= MOSQUITTO_TESTED_CONNECTIONS.value:
        return f"one Mosquitto (~{core:.3f} core at the measured cost)"
    if devices <= 100_000:
        return f"cluster of 2-3 (HA); one Mosquitto ~{core:.1f} core, connections untested"
    return f"cluster of 3-5 nodes; one Mosquitto would need ~{core:.1f} cores"


def our_limit(fold_share: float, prune_share: float) -> str:
    """The first of the server's own single-leader jobs past ``HEADROOM`` of its budget."""
    worst = max(("history fold", fold_share), ("key pruning", prune_share), key=lambda x: x[1])
    if worst[1] <= HEADROOM.value:
        return f"none past {HEADROOM.value:.0%} ({worst[0]} {worst[1]:.0%})"
    return f"{worst[0]} at {worst[1]:.0%} of its one core"


def fmt(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def print_inputs() -> None:
    print("| input | value | source | note |")
    print("|---|---:|---|---|")
    for name, item in globals().items():
        if isinstance(item, Input):
            print(f"| `{name}` | {fmt(item.value)} | {item.source} | {item.note} |")
        elif isinstance(item, dict):
            for level, it in item.items():
                print(f"| `{name}[{level}]` | {fmt(it.value)} | {it.source} | {it.note} |")


def print_per_thousand() -> None:
    print("| per 1,000 devices | idle | 1 req/s | 10 req/s |")
    print("|---|---:|---:|---:|")
    ps = [per_thousand(level) for level in ("idle", "1", "10")]
    rows = [
        ("reports per telemetry message (coalesced)", "reports_per_msg"),
        ("telemetry msgs/s, device -> broker (= broker -> workers)", "telemetry_msgs_s"),
        ("ack msgs/s, worker -> broker (= broker -> device)", "ack_msgs_s"),
        ("status msgs/s (x every worker: plain subscription)", "status_msgs_s"),
        ("bytes/s device -> broker, JSON (payload + framing)", "wire_in_json_b_s"),
        ("bytes/s device -> broker, packed-1", "wire_in_packed_b_s"),
        ("bytes/s broker -> devices (acks + framing)", "wire_out_b_s"),
        ("raw telemetry rows/s (one per report)", "raw_rows_s"),
        ("telemetry_keys rows/s", "key_rows_s"),
        ("5-minute rollup rows/s (written in bursts by the job)", "fine_rollups_s"),
        ("hourly rollup rows/s", "hour_rollups_s"),
    ]
    for label, attr in rows:
        print(f"| {label} | " + " | ".join(fmt(getattr(p, attr)) for p in ps) + " |")
    for label, attr in (
        ("MB per device per day up, JSON (payload + framing)", "wire_in_json_b_s"),
        ("MB per device per day up, packed-1 (payload + framing)", "wire_in_packed_b_s"),
        ("MB per device per day down (acks + framing)", "wire_out_b_s"),
    ):
        cells = (fmt(getattr(p, attr) / 1_000 * DAY / 1e6) for p in ps)
        print(f"| {label} | " + " | ".join(cells) + " |")
    p = ps[0]
    print(
        f"\nPostgreSQL storage per day per 1,000 devices (bench_history.py payloads, the same at"
        f" every level above: heavier than 10 req/s): raw {p.raw_gb_day:.1f} GB + keys "
        f"{p.key_gb_day:.2f} GB + 5-minute rollups {p.fine_gb_day:.2f} GB + hourly "
        f"{p.hour_gb_day * 1000:.0f} MB; kept forever {p.raw_gb_day + p.key_gb_day:.1f} GB/day;"
        f" with retention the growth is the hourly rollups and the database settles at "
        f"{retained_gb(p):.0f} GB after {HOUR_DAYS.value:.0f} days."
    )
    scaled = [
        f"{level}: {p.raw_gb_day * json_b.value / BENCH_ROW_JSON_B.value:.1f}"
        for level, json_b in PAYLOAD_JSON_B.items()
    ]
    print(
        "Raw rows per day if row bytes scaled with the JSON stored (assumed, not measured), "
        f"GB/day at idle / 1 / 10 req/s: {', '.join(scaled)}."
    )


def print_fleets(level: str) -> None:
    p = per_thousand(level)
    per_worker = worker_reports_s(p.reports_per_msg) * HEADROOM.value
    print(
        f"| devices | telemetry msgs/s ({p.reports_per_msg:.0f} reports each) | reports/s | "
        f"broker deliveries/s (telemetry + acks) | device -> broker, JSON / packed-1 | "
        f"workers ({per_worker:.0f} reports/s each) | broker |"
    )
    print("|---:|---:|---:|---:|---:|---:|---|")
    for n in FLEETS:
        k = n / 1_000
        msgs = p.telemetry_msgs_s * k
        reports = p.raw_rows_s * k
        deliveries = msgs + p.ack_msgs_s * k
        mbit = 8 / 1e6
        print(
            f"| {n:,} | {fmt(msgs)} | {fmt(reports)} | {fmt(deliveries)} | "
            f"{fmt(p.wire_in_json_b_s * k * mbit)} / {fmt(p.wire_in_packed_b_s * k * mbit)} "
            f"Mbit/s | {workers_needed(reports, p.reports_per_msg)} | "
            f"{broker_for(n, deliveries)} |"
        )
    print()
    print(
        "| devices | rows/s (raw + keys) | table MB/s | size/day, no retention | size with "
        "retention (day 400) | connections | CPU (cores, fsync=off) | history fold | key "
        "pruning | our first limit |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for n in FLEETS:
        k = n / 1_000
        reports = p.raw_rows_s * k
        rows = (p.raw_rows_s + p.key_rows_s) * k
        table_mb_s = p.raw_rows_s * k * (PG_RAW_B_ROW.value + PG_KEY_B_ROW.value) / 1e6
        day_tb = (p.raw_gb_day + p.key_gb_day) * k / 1_000
        size_tb = retained_gb(p) * k / 1_000
        conns = workers_needed(reports, p.reports_per_msg) * PG_CONNS_PER_WORKER.value
        pg_cores = reports * PG_CPU_MS_PER_MSG.value / 1_000
        fold = FOLD_S_PER_1K.value * k / FOLD_BUDGET_S.value
        prune = PRUNE_S_PER_1K_DAY.value * k / DAY
        print(
            f"| {n:,} | {fmt(rows)} | {fmt(table_mb_s)} | {fmt(day_tb)} TB | {fmt(size_tb)} TB"
            f" | {conns:,.0f} | {fmt(pg_cores)} | {fold:.0%} | {prune:.0%} | "
            f"{our_limit(fold, prune)} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--level", choices=("idle", "1", "10"), default="1")
    ap.add_argument("--inputs", action="store_true", help="also print the inputs table")
    a = ap.parse_args()
    if a.inputs:
        print_inputs()
        print()
    print_per_thousand()
    print(f"\nFleets at the {a.level} req/s level (telemetry bytes); storage as above:\n")
    print_fleets(a.level)


if __name__ == "__main__":
    main()
