"""Benchmark telemetry ingest with 1, 2 and 4 gateway workers (shared subscription, PostgreSQL)
against a bare paho consumer, at the real message shape.

The devices (``fleetsim`` worker processes, one TLS client and certificate per device, connected
once for the whole run) send one real agent report per message (``ingest_shape``: the reports
the agent builds at ``--traffic`` requests/s with the example config's drift windows, so some
messages carry tier-A windows and most do not, as on a real device), as canonical JSON and as
packed-1 (``--encodings``). Per encoding and round, alternating: the bare baseline (the same
devices flood the same messages at a paho ``$share`` consumer that only counts, no database),
then 1, 2 and 4 gateway worker processes (``--workers``) on one throwaway PostgreSQL, each its
own process with its own certificate and client id (``fleet.server``, ``fleet-2.server``, ...;
``BrokerConfig(worker_cns=...)``), its own ``MqttClient`` + ``Gateway`` + ``Registry`` engine,
in the same share group, so Mosquitto splits ``$share/fleet/.../telemetry`` between them.

Per run and phase (``closed``: every device sends its next message as soon as the previous one
is acknowledged; ``rate``: ``--rate`` messages/s offered by the whole fleet): messages/s stored
(sum of the workers' gateway counters over the measured window) and its ratio to the bare
consumer's rate and to one worker's, ingest lag p50/p99/max (device send -> ``TelemetryAck``),
CPU of each gateway worker process and of its threads, of PostgreSQL, Mosquitto and the device
processes, the host's busy CPU (all processes, other tenants included), and CPU microseconds
per stored message of each part (what a capacity model extrapolates from). After each run every
``(device, seq)`` row is read back: the run's seqs must be stored exactly once (zero lost, zero
duplicates).

Usage:
    .venv/bin/python bench/bench_ingest_workers.py [--quick] [--devices 1000] [--processes 1]
        [--duration 15] [--rate 500] [--workers 1,2,4] [--encodings json,packed-1]
        [--traffic 10] [--rounds 1] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fleet import WARMUP, fmt, pct, telemetry_phase
from fleet_server.registry.store import Registry
from fleetbench import PREFIX, SERVER, BareConsumer, device_ids, make_pki, raise_nofile
from fleetworkers import GatewayWorkers, PgCluster, broker_with_workers, worker_identities
from ingest_shape import Shape, ShapedPool, real_reports

EXTRA_WORKERS = ("fleet-2.server", "fleet-3.server", "fleet-4.server")
THREADS = ("fleet-ingest", "mqtt-network", "mqtt-handlers")
PARTS = ("pg_cpu", "mosquitto_cpu", "devices_cpu")


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


def clear_sessions(broker: Any, identities: dict[str, Any]) -> None:
    """End the workers' persistent sessions (clean start, no expiry) so that their shared
    subscription stops queueing: a bare run's flood would otherwise wait for the next worker
    with that identity and reach the registry."""
    from paho.mqtt import client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    for name, c in identities.items():
        done = threading.Event()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=name, protocol=MQTTProtocolVersion.MQTTv5
        )
        client.tls_set(c.ca, c.cert, c.key)
        client.on_connect = lambda *_a, e=done: e.set()
        client.connect(broker.host, broker.port, keepalive=30, clean_start=True)
        client.loop_start()
        try:
            if not done.wait(30):
                raise RuntimeError(f"could not clear the session of {name}")
        finally:
            client.disconnect()
            client.loop_stop()


def run_bare(args: Any, pool: ShapedPool, broker: Any, pg: PgCluster) -> dict[str, Any]:
    """The baseline: the same devices flood the same messages at a counting paho consumer."""
    consumer = BareConsumer(broker, f"$share/bare/{PREFIX}/devices/+/telemetry")
    try:
        start = time.time() + 0.5
        end = start + args.duration
        params = {"start": start, "end": end, "batch": 1, "window": 2, "drain": 0, "interval": 0.0}
        pool.send(("flood", params))
        time.sleep(max(0.0, start + WARMUP - time.time()))
        c0, t0, m0, d0 = consumer.count, time.monotonic(), broker.cpu_seconds(), pool.cpu_seconds()
        p0, h0 = pg.cpu_seconds(), host_busy_seconds()
        time.sleep(max(0.0, end - time.time()))
        c1, t1, m1, d1 = consumer.count, time.monotonic(), broker.cpu_seconds(), pool.cpu_seconds()
        p1, h1 = pg.cpu_seconds(), host_busy_seconds()
        pool.gather("telemetry", 60)
    finally:
        consumer.close()
    span = t1 - t0
    msgs = (c1 - c0) / span
    phase = {
        "msgs_s": msgs,
        "mosquitto_cpu": (m1 - m0) / span,
        "devices_cpu": (d1 - d0) / span,
        "pg_cpu": (p1 - p0) / span,
        "host_cpu": (h1 - h0) / span,
    }
    print(f"# bare: {phase}", file=sys.stderr)
    return {"workers": 0, "bare": phase}


def run_workers(
    args: Any,
    n: int,
    pool: ShapedPool,
    broker: Any,
    pg: PgCluster,
    url: str,
    identities: dict[str, Any],
    floor: dict[str, int],
) -> tuple[dict[str, Any], dict[str, int]]:
    """The phases (closed loop, offered rate) with ``n`` gateway workers."""
    res: dict[str, Any] = {"workers": n}
    chosen = dict(list(identities.items())[:n])
    workers = GatewayWorkers(chosen, broker, url)
    stat_engine = create_engine(url, poolclass=NullPool)
    try:
        last_seq: dict[str, int] = dict(floor)
        for phase in args.phases:
            start, end, params = telemetry_phase(args, 0.0 if phase == "closed" else args.rate)
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
            acks = [b["acks_sent"] - a["acks_sent"] for a, b in zip(s0, s1, strict=True)]
            threads = {
                k: sum(
                    b["threads"].get(k, 0.0) - a["threads"].get(k, 0.0)
                    for a, b in zip(s0, s1, strict=True)
                )
                / span
                for k in THREADS
            }
            res[phase] = {
                "msgs_s": sum(acks) / span,
                "items_s": (_sum(s1, "items_inserted") - _sum(s0, "items_inserted")) / span,
                "share": [i / max(1, sum(acks)) for i in acks],
                "offered_msgs_s": sum(o["sent_batches"] for o in out) / args.duration,
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


def _us(cpu: float, msgs: float) -> str:
    return f"{cpu / msgs * 1e6:,.0f}" if msgs else "n/a"


def per_message(p: dict[str, Any]) -> str:
    """CPU microseconds per stored message: all workers, then each of ``PARTS``."""
    parts = (sum(p["worker_cpu"]), *(p[k] for k in PARTS))
    return " / ".join(_us(c, p["msgs_s"]) for c in parts)


def table(args: Any, encoding: str, runs: list[dict[str, Any]]) -> str:
    """One encoding's runs (bare and worker runs, in the order they ran)."""
    bares = [r["bare"] for r in runs if r["workers"] == 0]
    counts = sorted({r["workers"] for r in runs if r["workers"]})
    heads = " | ".join(f"{n} worker{'s' if n > 1 else ''}" for n in counts)
    lines = [
        f"| {encoding}: phase | metric | {heads} |",
        "|---|---|" + "---:|" * len(counts),
    ]
    bare = sum(b["msgs_s"] for b in bares) / len(bares) if bares else float("nan")

    def of(n: int) -> list[dict[str, Any]]:
        return [r for r in runs if r["workers"] == n]

    def row(phase: str, metric: str, cell: Any) -> None:
        cells = []
        for n in counts:
            vals = [cell(r[phase]) for r in of(n) if phase in r]
            cells.append(" ; ".join(vals) if vals else "n/a")
        lines.append(f"| {phase} | {metric} | " + " | ".join(cells) + " |")

    one = [r[p]["msgs_s"] for r in of(1) for p in ("closed",) if p in r]
    one_rate = sum(one) / len(one) if one else float("nan")
    for phase in args.phases:
        row(phase, "offered msgs/s (sent)", lambda p: fmt(p["offered_msgs_s"], 0))
        row(phase, "msgs/s stored and acked (1 report each)", lambda p: fmt(p["msgs_s"], 0))
        row(phase, "ratio to the bare consumer", lambda p: _ratio(bare, p["msgs_s"]))
        if phase == "closed":
            row(phase, "ratio to 1 worker", lambda p: _ratio(one_rate, p["msgs_s"]))
        row(phase, "ingest lag p50 / p99 / max (s)",
            lambda p: f"{p['lag_p50']:.3f} / {p['lag_p99']:.3f} / {p['lag_max']:.2f}")  # fmt: skip
        row(phase, "share of messages per worker",
            lambda p: " / ".join(f"{x:.2f}" for x in p["share"]))  # fmt: skip
        row(phase, "CPU per worker process (cores)",
            lambda p: " + ".join(f"{x:.2f}" for x in p["worker_cpu"]))  # fmt: skip
        row(phase, "worker threads (cores): ingest / mqtt-net / handlers",
            lambda p: " / ".join(f"{p['threads_cpu'][k]:.2f}" for k in THREADS))  # fmt: skip
        row(phase, "CPU (cores): PostgreSQL / mosquitto / device sims",
            lambda p: " / ".join(f"{p[k]:.2f}" for k in PARTS))  # fmt: skip
        row(phase, "CPU µs per message: workers / PostgreSQL / mosquitto / device sims",
            per_message)  # fmt: skip
        row(phase, "PostgreSQL commits/s (msgs per commit)",
            lambda p: f"{p['commits_s']:,.0f} ({p['msgs_s'] / p['commits_s']:.1f})"
            if p["commits_s"] else "n/a")  # fmt: skip
        row(phase, f"host busy CPU, all processes (cores of {os.cpu_count()})",
            lambda p: f"{p['host_cpu']:.2f}")  # fmt: skip
        row(phase, "resends (ack timeout) / unacked at end",
            lambda p: f"{p['resends']} / {p['unacked']}")  # fmt: skip
    for metric, cell in (
        ("rows stored / seqs sent",
         lambda r: f"{r['check']['stored_rows']:,} / {r['check']['expected_rows']:,}"),
        ("lost seqs / duplicate rows / unexpected / devices mismatched",
         lambda r: f"{r['check']['missing_seqs']} / {r['check']['duplicate_rows']} / "
         f"{r['check']['unexpected_seqs']} / {r['check']['devices_mismatch']}"),
        ("server: duplicates / lost / rejected / db failures",
         lambda r: f"{r['server']['duplicates']} / {r['server']['lost']} / "
         f"{r['server']['rejected']} / {r['server']['db_failures']}"),
        ("0 lost, 0 dup", lambda r: "yes" if r["check"]["ok"] else "NO"),
    ):  # fmt: skip
        cells = [" ; ".join(cell(r) for r in of(n)) for n in counts]
        lines.append(f"| check | {metric} | " + " | ".join(cells) + " |")
    if bares:
        b = bares
        lines.append("")
        lines.append(
            f"Bare paho consumer, same devices and messages ({encoding}): "
            + " ; ".join(
                f"{x['msgs_s']:,.0f} msgs/s (mosquitto {x['mosquitto_cpu']:.2f} cores, "
                f"{_us(x['mosquitto_cpu'], x['msgs_s'])} µs/msg; device sims "
                f"{x['devices_cpu']:.2f} cores; host {x['host_cpu']:.2f})"
                for x in b
            )
        )
    return "\n".join(lines)


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwind through the finally blocks: tear everything down


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    # One: with two or more processes of real-shaped devices, a device process's connect failed
    # here (fleetsim's selector: "... is already registered"; see docs/benchmarks-fleet.md).
    ap.add_argument("--processes", type=int, default=1, help="device simulator processes")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per phase")
    ap.add_argument("--rate", type=float, default=500.0, help="offered msgs/s (phase rate)")
    ap.add_argument("--phases", default="closed,rate", help="closed and/or rate")
    ap.add_argument("--workers", default="1,2,4", help="worker counts, in order")
    ap.add_argument("--encodings", default="json,packed-1")
    ap.add_argument("--traffic", type=float, default=10.0, help="agent requests/s (reports)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds")
    ap.add_argument("--quick", action="store_true", help="50 devices, 5 s phases")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    args.batch = 1  # one report per message: the agent's shape (telemetry_phase reads it)
    if args.quick:
        args.devices, args.duration, args.rate = 50, 5.0, 100.0
    args.phases = [p for p in args.phases.split(",") if p]
    counts = [int(x) for x in args.workers.split(",") if x]
    encodings = [e for e in args.encodings.split(",") if e]
    if not (1 <= args.devices <= 5000 and 1 <= args.processes <= 16):
        ap.error("--devices 1..5000, --processes 1..16")
    if not (1.0 <= args.duration <= 120.0 and args.rate > 0 and 1 <= args.rounds <= 5):
        ap.error("--duration 1..120 s, --rate > 0, --rounds 1..5")
    if not set(args.phases) <= {"closed", "rate"} or not args.phases:
        ap.error("--phases: closed and/or rate")
    if not counts or not set(counts) <= {1, 2, 3, 4}:
        ap.error("--workers: counts from 1 to 4")
    if not encodings or not set(encodings) <= {"json", "packed-1"}:
        ap.error("--encodings: json and/or packed-1")
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
    reports = real_reports(args.traffic, 30.0)
    shapes = {e: Shape.of(reports, e == "packed-1") for e in encodings}
    for e, shape in shapes.items():
        print(
            f"# {e}: {len(reports)} reports at {args.traffic:g} req/s, mean "
            f"{shape.mean_bytes():,.0f} B/msg, {shape.windows_share():.0%} with drift windows",
            file=sys.stderr,
        )
    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in encodings}
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
        extra = EXTRA_WORKERS[: max(counts) - 1]
        identities = {SERVER: creds[SERVER], **worker_identities(ca, root / "pki", extra)}
        broker = broker_with_workers(root, ca, creds[SERVER], SERVER, extra)
        broker.start()
        print(f"# setup (PostgreSQL, PKI, broker) {time.monotonic() - t:.1f}s", file=sys.stderr)
        t = time.monotonic()
        pool = ShapedPool(args.processes, broker, creds, ids, shapes[encodings[0]])
        pool.send(("connect", 120.0))
        connected = sum(pool.gather("connected", 300))
        print(f"# {connected} devices connected in {time.monotonic() - t:.1f}s", file=sys.stderr)
        if connected != args.devices:
            raise RuntimeError(f"only {connected} of {args.devices} devices connected")
        floor = dict.fromkeys(ids, 0)
        for _round in range(args.rounds):
            for e in encodings:
                pool.send(("shape", shapes[e]))
                pool.gather("shape", 60)
                clear_sessions(broker, identities)
                runs[e].append(run_bare(args, pool, broker, pg))
                time.sleep(1.0)
                for n in counts:
                    res, floor = run_workers(args, n, pool, broker, pg, url, identities, floor)
                    print(f"# {e} {n} worker(s): check {res['check']} {res['server']}",
                          file=sys.stderr)  # fmt: skip
                    runs[e].append(res)
                    time.sleep(1.0)
    finally:
        if pool is not None:
            pool.close()
        if broker is not None:
            broker.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    for e in encodings:
        shape = shapes[e]
        print(
            f"\n{e}: one report per message, {shape.mean_bytes():,.0f} B mean, "
            f"{shape.windows_share():.0%} with drift windows (agent at {args.traffic:g} req/s), "
            f"{args.devices} devices, {args.duration:g} s phases, rate phase {args.rate:g} msgs/s\n"
        )
        out = table(args, e, runs[e])
        print(out if args.markdown else out.replace("|", " ").strip())
    ok = all(r["check"]["ok"] for rs in runs.values() for r in rs if r["workers"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
