"""Benchmark telemetry ingest with one gateway worker vs two (shared subscription, PostgreSQL).

Scenario A of ``bench_fleet.py`` (same simulated devices, same ``Batch``es, same closed-loop and
offered-rate phases, same lag and loss measurement) against a throwaway PostgreSQL registry, run
twice in one invocation: first with one gateway worker process, then with two. Each worker is its
own spawned process with its own certificate and client id (``fleet.server``, ``fleet-2.server``;
``BrokerConfig(worker_cns=...)`` grants the second the server's ACL rights) and its own
``MqttClient`` + ``Gateway`` + ``Registry`` engine on the same PostgreSQL URL, in the same share
group, so Mosquitto splits ``$share/fleet/.../telemetry`` between them. The devices (``fleetsim``
worker processes, one TLS client and certificate per device) stay connected across both runs.

Per run and phase: reports/s and MQTT messages/s stored (sum of the workers' gateway counters over
the measured window), offered reports/s, ingest lag p50/p99/max (device send -> ``TelemetryAck``),
CPU per gateway worker process and per gateway thread, CPU of PostgreSQL, Mosquitto and the device
processes, the host's busy CPU (all processes, other tenants included), and the two/one ratio.
After each run every ``(device, seq)`` row is read back: the run's seqs must be stored exactly once
(zero lost, zero duplicates).

Usage:
    .venv/bin/python bench/bench_ingest_workers.py [--quick] [--devices 1000] [--processes 4]
        [--duration 15] [--batch 5] [--rate 3000] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fleet import WARMUP, Pool, fmt, pct, telemetry_phase
from fleet_server.registry.store import Registry
from fleetbench import SERVER, device_ids, make_pki, raise_nofile
from fleetworkers import GatewayWorkers, PgCluster, broker_with_workers, worker_identities

WORKER_2 = "fleet-2.server"
THREADS = ("fleet-ingest", "mqtt-network", "mqtt-handlers")


def host_busy_seconds() -> float:
    """Busy CPU seconds of the whole host (all cores, every process) from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def xact_commits(engine: Any) -> int:
    """Committed transactions of the registry database (``pg_stat_database``)."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
            ).scalar_one()
        )


def _sum(stats: list[dict[str, Any]], key: str) -> int:
    return sum(int(s[key]) for s in stats)


def run_workers(
    args: Any,
    n: int,
    pool: Pool,
    broker: Any,
    pg: PgCluster,
    url: str,
    identities: dict[str, Any],
    floor: dict[str, int],
) -> tuple[dict[str, Any], dict[str, int]]:
    """Scenario A (closed loop, then offered rate) with ``n`` gateway workers."""
    res: dict[str, Any] = {"workers": n}
    chosen = dict(list(identities.items())[:n])
    workers = GatewayWorkers(chosen, broker, url)
    stat_engine = create_engine(url, poolclass=NullPool)
    try:
        last_seq: dict[str, int] = dict(floor)
        for phase, rate in (("closed", 0.0), ("rate", args.rate)):
            start, end, params = telemetry_phase(args, rate)
            pool.send(("telemetry", params))
            time.sleep(max(0.0, start + WARMUP - time.time()))
            s0, t0 = workers.stats(), time.monotonic()
            c0, m0, d0 = workers.cpu_seconds(), broker.cpu_seconds(), pool.cpu_seconds()
            p0, h0, x0 = pg.cpu_seconds(), host_busy_seconds(), xact_commits(stat_engine)
            time.sleep(max(0.0, end - time.time()))
            s1, t1 = workers.stats(), time.monotonic()
            c1, m1, d1 = workers.cpu_seconds(), broker.cpu_seconds(), pool.cpu_seconds()
            p1, h1, x1 = pg.cpu_seconds(), host_busy_seconds(), xact_commits(stat_engine)
            out = pool.gather("telemetry", 120)
            span = t1 - t0
            lags = [x for o in out for x in o["lags"]]
            items = [b["items_inserted"] - a["items_inserted"] for a, b in zip(s0, s1, strict=True)]
            threads = {
                k: sum(
                    b["threads"].get(k, 0.0) - a["threads"].get(k, 0.0)
                    for a, b in zip(s0, s1, strict=True)
                )
                / span
                for k in THREADS
            }
            res[phase] = {
                "msgs_s": (_sum(s1, "acks_sent") - _sum(s0, "acks_sent")) / span,
                "items_s": sum(items) / span,
                "items_share": [i / max(1, sum(items)) for i in items],
                "offered_items_s": sum(o["sent_items"] for o in out) / args.duration,
                "lag_p50": pct(lags, 0.50),
                "lag_p99": pct(lags, 0.99),
                "lag_max": max(lags) if lags else float("nan"),
                "resends": sum(o["resends"] for o in out),
                "unacked": sum(o["unacked"] for o in out),
                "worker_cpu": [(b - a) / span for a, b in zip(c0, c1, strict=True)],
                "threads_cpu": threads,
                "pg_cpu": (p1 - p0) / span,
                "commits_s": (x1 - x0) / span,
                "mosquitto_cpu": (m1 - m0) / span,
                "devices_cpu": (d1 - d0) / span,
                "host_cpu": (h1 - h0) / span,
                "pending_max": max(s["ingest_pending"] for s in s1),
            }
            last_seq = {d: v for o in out for d, v in o["last_seq"].items()}
            print(f"# {n} worker(s) {phase}: {res[phase]}", file=sys.stderr)
        time.sleep(0.5)
        final = workers.stats()
    finally:
        stat_engine.dispose()
        workers.close()
    res["server"] = {
        "duplicates": _sum(final, "duplicates"),
        "lost": _sum(final, "lost"),
        "db_failures": _sum(final, "db_failures"),
        "ack_failures": _sum(final, "ack_failures"),
        "rejected": sum(sum(s["rejected"].values()) for s in final),
    }
    res["check"] = check_rows(url, floor, last_seq)
    return res, last_seq


def check_rows(url: str, floor: dict[str, int], last: dict[str, int]) -> dict[str, Any]:
    """Every seq in ``(floor, last]`` of every device stored exactly once, nothing beyond."""
    registry = Registry.open(url)
    try:
        with registry.engine.connect() as conn:
            rows = conn.execute(text("SELECT device_id, seq FROM telemetry")).all()
    finally:
        registry.close()
    seen: dict[str, list[int]] = {}
    for device, seq in rows:
        if floor.get(device, 0) < seq:
            seen.setdefault(device, []).append(seq)
    expected = stored = dups = missing = extra = 0
    mismatch = 0
    for device, hi in last.items():
        lo = floor.get(device, 0)
        got = seen.get(device, [])
        want = set(range(lo + 1, hi + 1))
        s = set(got)
        expected += len(want)
        stored += sum(1 for x in got if x <= hi)
        dups += len(got) - len(s)
        missing += len(want - s)
        extra += sum(1 for x in s if x > hi)
        mismatch += s != want or len(got) != len(s)
    return {
        "expected_rows": expected,
        "stored_rows": stored,
        "duplicate_rows": dups,
        "missing_seqs": missing,
        "unexpected_seqs": extra,
        "devices_mismatch": mismatch,
        "ok": mismatch == 0 and dups == 0 and missing == 0 and extra == 0,
    }


# --------------------------------------------------------------------------- report
def _ratio(a: float, b: float) -> str:
    return "n/a" if not a or a != a or b != b else f"{b / a:.2f}"


def table(args: Any, runs: list[dict[str, Any]]) -> str:
    lines = ["| Phase | Metric | 1 worker | 2 workers | ratio 2/1 |", "|---|---|---:|---:|---:|"]
    one, two = [*runs, {}, {}][:2]

    def row(phase: str, metric: str, key: Any, show: Any, ratio: bool = True) -> None:
        vals = [key(r) if r else float("nan") for r in (one, two)]
        cells = [show(v) if r else "n/a" for v, r in zip(vals, (one, two), strict=True)]
        rr = _ratio(vals[0], vals[1]) if ratio and one and two else ""
        lines.append(f"| {phase} | {metric} | {cells[0]} | {cells[1]} | {rr} |")

    for phase in ("closed", "rate"):
        label = "closed loop" if phase == "closed" else f"offered {fmt(args.rate, 0)}/s"
        row(label, "offered reports/s (sent)", lambda r, p=phase: r[p]["offered_items_s"],
            lambda v: fmt(v, 0))  # fmt: skip
        row(label, f"reports/s into DB ({args.batch}/msg)", lambda r, p=phase: r[p]["items_s"],
            lambda v: fmt(v, 0))  # fmt: skip
        row(label, "MQTT msgs/s into DB", lambda r, p=phase: r[p]["msgs_s"], lambda v: fmt(v, 0))
        row(label, "ingest lag p50 (s)", lambda r, p=phase: r[p]["lag_p50"], lambda v: fmt(v, 3))
        row(label, "ingest lag p99 (s)", lambda r, p=phase: r[p]["lag_p99"], lambda v: fmt(v, 3))
        row(label, "ingest lag max (s)", lambda r, p=phase: r[p]["lag_max"], lambda v: fmt(v, 2),
            ratio=False)  # fmt: skip
        row(label, "share of stored reports per worker",
            lambda r, p=phase: r[p]["items_share"],
            lambda v: " / ".join(f"{x:.2f}" for x in v), ratio=False)  # fmt: skip
        row(label, "CPU per gateway worker process (cores)",
            lambda r, p=phase: r[p]["worker_cpu"],
            lambda v: " + ".join(f"{x:.2f}" for x in v), ratio=False)  # fmt: skip
        row(label, "CPU all gateway workers (cores)", lambda r, p=phase: sum(r[p]["worker_cpu"]),
            lambda v: f"{v:.2f}")  # fmt: skip
        row(label, "gateway threads (cores): ingest / mqtt-net / handlers",
            lambda r, p=phase: r[p]["threads_cpu"],
            lambda v: " / ".join(f"{v[k]:.2f}" for k in THREADS), ratio=False)  # fmt: skip
        row(label, "CPU (cores): PostgreSQL / mosquitto / device sims",
            lambda r, p=phase: (r[p]["pg_cpu"], r[p]["mosquitto_cpu"], r[p]["devices_cpu"]),
            lambda v: " / ".join(f"{x:.2f}" for x in v), ratio=False)  # fmt: skip
        row(label, "PostgreSQL commits/s (MQTT msgs per commit)",
            lambda r, p=phase: (r[p]["commits_s"], r[p]["msgs_s"]),
            lambda v: f"{v[0]:,.0f} ({v[1] / v[0]:.1f})" if v[0] else "n/a",
            ratio=False)  # fmt: skip
        row(label, "host busy CPU, all processes (cores of 2)" if os.cpu_count() == 2
            else f"host busy CPU, all processes (cores of {os.cpu_count()})",
            lambda r, p=phase: r[p]["host_cpu"], lambda v: f"{v:.2f}", ratio=False)  # fmt: skip
        row(label, "batch resends (ack timeout) / unacked at end",
            lambda r, p=phase: (r[p]["resends"], r[p]["unacked"]),
            lambda v: f"{v[0]} / {v[1]}", ratio=False)  # fmt: skip
    row("check", "rows stored / seqs sent",
        lambda r: (r["check"]["stored_rows"], r["check"]["expected_rows"]),
        lambda v: f"{v[0]:,} / {v[1]:,}", ratio=False)  # fmt: skip
    row("check", "lost seqs / duplicate rows / unexpected / devices mismatched",
        lambda r: r["check"],
        lambda c: f"{c['missing_seqs']} / {c['duplicate_rows']} / {c['unexpected_seqs']} / "
        f"{c['devices_mismatch']}", ratio=False)  # fmt: skip
    row("check", "server counters: duplicates / lost / rejected / db failures",
        lambda r: r["server"],
        lambda s: f"{s['duplicates']} / {s['lost']} / {s['rejected']} / {s['db_failures']}",
        ratio=False)  # fmt: skip
    row("check", "0 lost, 0 dup", lambda r: r["check"]["ok"], lambda ok: "yes" if ok else "NO",
        ratio=False)  # fmt: skip
    return "\n".join(lines)


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwind through the finally blocks: tear everything down


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--processes", type=int, default=4, help="device simulator processes")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per phase")
    ap.add_argument("--rate", type=float, default=3000.0, help="offered reports/s (phase 2)")
    ap.add_argument("--batch", type=int, default=5, help="reports per telemetry message")
    ap.add_argument("--quick", action="store_true", help="50 devices, 2 processes, 5 s phases")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.devices, args.processes, args.duration, args.rate = 50, 2, 5.0, 500.0
    if not (1 <= args.devices <= 5000 and 1 <= args.processes <= 16):
        ap.error("--devices 1..5000, --processes 1..16")
    if not (1.0 <= args.duration <= 120.0 and 1 <= args.batch <= 64 and args.rate > 0):
        ap.error("--duration 1..120 s, --batch 1..64, --rate > 0")
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    nofile = raise_nofile()
    root = Path(tempfile.mkdtemp(prefix="fleetbench-workers-"))
    print(
        f"# {platform.node()} {platform.machine()} cpus={os.cpu_count()} python "
        f"{platform.python_version()} nofile={nofile} devices={args.devices} "
        f"processes={args.processes} dir={root}",
        file=sys.stderr,
    )
    runs: list[dict[str, Any]] = []
    pg = broker = pool = None
    try:
        t = time.monotonic()
        pg = PgCluster()
        pg.start()
        url = pg.create_database("registry")
        ids = device_ids(args.devices)
        registry = Registry.open(url)
        try:
            registry.upgrade()
            for device in ids:
                registry.enroll(device, group="bench")
        finally:
            registry.close()
        ca, creds = make_pki(root / "pki", ids)
        identities = {SERVER: creds[SERVER], **worker_identities(ca, root / "pki", (WORKER_2,))}
        broker = broker_with_workers(root, ca, creds[SERVER], SERVER, (WORKER_2,))
        broker.start()
        print(f"# setup (PostgreSQL, PKI, broker) {time.monotonic() - t:.1f}s", file=sys.stderr)
        t = time.monotonic()
        pool = Pool(args.processes, broker, creds, ids)
        pool.send(("connect", 120.0))
        connected = sum(pool.gather("connected", 300))
        print(f"# {connected} devices connected in {time.monotonic() - t:.1f}s", file=sys.stderr)
        if connected != args.devices:
            raise RuntimeError(f"only {connected} of {args.devices} devices connected")
        floor = dict.fromkeys(ids, 0)
        for n in (1, 2):
            res, floor = run_workers(args, n, pool, broker, pg, url, identities, floor)
            print(f"# {n} worker(s): check {res['check']} server {res['server']}", file=sys.stderr)
            runs.append(res)
            time.sleep(1.0)
    finally:
        if pool is not None:
            pool.close()
        if broker is not None:
            broker.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    out = table(args, runs)
    print(out if args.markdown else out.replace("|", " ").strip())
    return 0 if all(r["check"]["ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
