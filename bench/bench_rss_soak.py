"""The daemon's resident memory under steady REST traffic, beside a bare server's (issue 13).

Starts a real ``edge-agent run`` daemon (one model, the quantized digits MLP of
``bench_agent``, no sync: closed drift windows are never shipped, the worst case for the
agent's window buffer) and ``bench_agent``'s bare Starlette + uvicorn + onnxruntime server on
the same model, side by side. ``--conns`` client threads per server send ``--batch``-row
JSON inferences back to back for ``--seconds``; every ``--every`` seconds the script reads
``VmRSS`` from ``/proc/<pid>/status`` of both servers and the agent's closed drift windows
from its ``/metrics``. Prints a markdown table of RSS over time. Both servers share the
machine (and its load) alike; the RSS numbers are the point, not throughput.

``--grpc`` turns on the daemon's ``[grpc]`` listener and drives it too: ``--conns`` more
clients send the same rows as a gRPC ``ModelInfer`` (from a child process importing a copy of
grpc, so no library file the daemon maps is mapped by the load generator: a page two processes
map is never paged out). ``--sync`` runs the daemon with fleet sync on, against a real
Mosquitto (TLS, the fleet's ACLs) and the fleet server's gateway and registry (SQLite) in a
child process (``tests/fleet.py``'s ``FleetHarness``), the model published and assigned to the
device; telemetry reports every ``sync.report_interval_seconds`` (30 s by default) are
acknowledged by the gateway, drift windows are shipped with them. ``--no-bare`` leaves the bare
server out (it maps the same onnxruntime and numpy files as the daemon). With ``--warmup`` the
summary gives the steady state after warm-up: the VmRSS at the end of warm-up, the median,
min and max of every later sample, and the last one's drift from the warm-up value.

Which agent code runs is whatever ``edge_agent`` the interpreter imports: to measure another
checkout, put its ``src`` first on ``PYTHONPATH`` (the daemon inherits the environment); the
script prints the path it found.

Usage: .venv/bin/python bench/bench_rss_soak.py [--seconds 300] [--every 10] [--conns 2]
       [--batch 16] [--grpc] [--sync] [--no-bare] [--warmup 300]
       [--set drift.buffer_bytes=1048576 ...]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# bench_rss_breakdown imports no numpy, onnxruntime or grpc: this process maps none of the
# daemon's libraries unless the bare server (``--bare``) is asked for.
from bench_rss_breakdown import (  # noqa: E402
    BIN,
    RestLoad,
    daemon_env,
    free_port,
    grpc_client,
    prepare,
    wait_ready,
)

INFER = "/v2/models/digits/infer"


def memory_mb(pid: int, key: str = "VmRSS") -> float:
    """``key`` (``VmRSS``, ``RssAnon``, ``RssFile``) of ``pid`` in MB (MiB), from
    ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def drift_windows_closed(port: int) -> int:
    """Closed drift windows so far, summed over tensors, from the agent's ``/metrics``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return int(
        sum(
            float(v)
            for v in re.findall(r"^edgefleet_agent_drift_windows_total\{[^}]*\} (\S+)$", text, re.M)
        )
    )


FLEET_CHILD = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from bundles import build_digits_bundles
from fleet import FleetHarness, agent_config
from mosquitto import fleet_broker
work = Path(sys.argv[1])
bundles = build_digits_bundles(work / "bundles")
with fleet_broker(work / "mqtt", ("dev-a",)) as broker:
    fleet = FleetHarness(broker, bundles.keys, work / "fleet")
    record = fleet.publish(bundles.path(1))
    fleet.assign("dev-a", {"digits": record})
    cfg = agent_config(broker, bundles.keys, work / "fleet", "dev-a")
    print(json.dumps({"bundle": str(bundles.path(1)), "root": cfg.store.root_path,
                      "sync": {"host": cfg.sync.host, "port": cfg.sync.port,
                               "identity_dir": cfg.sync.identity_dir,
                               "prefix": cfg.sync.prefix}}), flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    fleet.close()
"""


def start_fleet(work: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """Mosquitto plus the fleet server's gateway and registry, in a child; returns (child,
    {bundle, root, sync: {host, port, identity_dir, prefix}}) once the model is assigned."""
    tests = HERE.parent / "tests"
    child = subprocess.Popen([sys.executable, "-c", FLEET_CHILD, str(work), str(tests)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    line = child.stdout.readline() if child.stdout else ""
    if not line:
        child.wait(timeout=30)
        raise RuntimeError("the fleet child did not start")
    return child, dict(json.loads(line))


def start_agent(
    bundle: Path, root: Path, work: Path, args: argparse.Namespace, sync: dict[str, Any] | None
) -> tuple[subprocess.Popen[bytes], int, int]:
    """Install the bundle and start ``edge-agent run``; returns (process, API port, gRPC port)
    once ready."""
    port, grpc_port = free_port(), free_port()
    cfg = work / "agent.toml"
    text = (
        f'device_id = "dev-a"\n'
        f"[api]\nport = {port}\nrate_limit_per_second = 1000000.0\n"
        f'rate_limit_burst = 1000000\n[store]\nstate_dir = "{work / "state"}"\n'
        f'root_path = "{root}"\n[model_defaults]\nprobation_requests = 1\n'
        f"[grpc]\nenabled = {str(args.grpc).lower()}\nport = {grpc_port}\n"
    )
    if sync is not None:
        text += (
            f'[sync]\nenabled = true\nhost = "{sync["host"]}"\nport = {sync["port"]}\n'
            f'identity_dir = "{sync["identity_dir"]}"\nprefix = "{sync["prefix"]}"\n'
        )
    cfg.write_text(text)
    env = daemon_env(work, args.set, args.env)
    edge_agent = str(BIN / "edge-agent")
    subprocess.run([edge_agent, "install", str(bundle), "--config", str(cfg)], check=True,
                   capture_output=True, env=env)  # fmt: skip
    log = (work / "agent.log").open("ab")
    proc = subprocess.Popen([edge_agent, "run", "--config", str(cfg)], env=env,
                            stdout=log, stderr=log)  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}/v2/health/ready")
    except RuntimeError:
        proc.terminate()
        raise
    return proc, port, grpc_port


def soak(args: argparse.Namespace, work: Path) -> list[dict[str, float]]:
    fleet: subprocess.Popen[str] | None = None
    sync: dict[str, Any] | None = None
    if args.sync:
        fleet, info = start_fleet(work)
        bundle, root, sync = Path(info["bundle"]), Path(info["root"]), info["sync"]
        files = prepare(work / "bodies", args.batch)
    else:
        files = prepare(work, args.batch)
        bundle, root = Path(files["bundle"]), Path(files["root"])
    body = Path(files["rest"]).read_bytes()
    procs: list[subprocess.Popen[Any]] = []
    loads: list[RestLoad] = []
    samples: list[dict[str, float]] = []
    grpc_load: subprocess.Popen[bytes] | None = None
    try:
        agent, port, grpc_port = start_agent(bundle, root, work, args, sync)
        procs.append(agent)
        loads.append(RestLoad(port, INFER, body, args.conns))
        bare = None
        if args.bare:
            from bench_agent import start_bare_server

            bare, bport = start_bare_server(bundle, root, work)
            procs.append(bare)
            loads.append(RestLoad(bport, INFER, body, args.conns))
        time.sleep(1.0)
        start = time.monotonic()

        def sample() -> None:
            samples.append({
                "t": time.monotonic() - start,
                "agent_mb": memory_mb(agent.pid),
                "agent_anon_mb": memory_mb(agent.pid, "RssAnon"),
                "agent_file_mb": memory_mb(agent.pid, "RssFile"),
                "bare_mb": memory_mb(bare.pid) if bare else float("nan"),
                "windows": drift_windows_closed(port),
                "agent_requests": loads[0].requests,
                "bare_requests": loads[1].requests if bare else 0,
                "errors": sum(load.errors for load in loads),
            })  # fmt: skip

        sample()
        for load in loads:
            load.start()
        if args.grpc:
            grpc_load = grpc_client(work, f"127.0.0.1:{grpc_port}", Path(files["grpc"]), 0,
                                    args.conns)  # fmt: skip
        for k in range(1, args.seconds // args.every + 1):
            time.sleep(max(0.0, start + k * args.every - time.monotonic()))
            if grpc_load is not None and grpc_load.poll() is not None:
                raise RuntimeError("the gRPC client stopped")
            sample()
    finally:
        if grpc_load is not None and grpc_load.stdin is not None:
            grpc_load.stdin.close()
            grpc_load.wait(timeout=60)
        for load in loads:
            load.stop()
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
        if fleet is not None and fleet.stdin is not None:
            fleet.stdin.close()
            fleet.wait(timeout=60)
    return samples


def markdown(samples: list[dict[str, float]], args: argparse.Namespace) -> str:
    lines = [
        "| t (s) | edge-agent VmRSS (MB) | RssAnon | RssFile | drift windows closed "
        "| bare server VmRSS (MB) | agent REST requests | bare requests |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in samples:
        lines.append(
            f"| {s['t']:.0f} | {s['agent_mb']:.1f} | {s['agent_anon_mb']:.1f} "
            f"| {s['agent_file_mb']:.1f} | {s['windows']:.0f} | {s['bare_mb']:.1f} "
            f"| {s['agent_requests']:.0f} | {s['bare_requests']:.0f} |"
        )
    first, last = samples[0], samples[-1]
    lines += [
        "",
        f"edge-agent grew {last['agent_mb'] - first['agent_mb']:+.1f} MB over {last['t']:.0f} s"
        + (f", the bare server {last['bare_mb'] - first['bare_mb']:+.1f} MB" if args.bare else "")
        + f" ({args.conns} REST connections{f' and {args.conns} gRPC' if args.grpc else ''} "
        f"per server, {args.batch} rows per request; {last['errors']:.0f} failed REST requests).",
    ]
    after = [s for s in samples if s["t"] >= args.warmup - args.every / 2]
    if args.warmup and len(after) > 1:
        base, rest = after[0], [s["agent_mb"] for s in after[1:]]
        lines.append(
            f"Steady state after {base['t']:.0f} s of warm-up: VmRSS {base['agent_mb']:.1f} MB "
            f"then median {statistics.median(rest):.1f}, min {min(rest):.1f}, max "
            f"{max(rest):.1f} MB over {len(rest)} samples; last {rest[-1]:.1f} MB, "
            f"{rest[-1] - base['agent_mb']:+.1f} MB from the warm-up value (largest distance "
            f"{max(abs(r - base['agent_mb']) for r in rest):.1f} MB)."
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=300, help="length of the soak")
    ap.add_argument("--every", type=int, default=10, help="seconds between RSS samples")
    ap.add_argument("--conns", type=int, default=2, help="client connections per server")
    ap.add_argument("--batch", type=int, default=16, help="rows per request (1-64)")
    ap.add_argument("--grpc", action="store_true", help="gRPC on and driven too")
    ap.add_argument("--sync", action="store_true", help="fleet sync on (Mosquitto + gateway)")
    ap.add_argument("--bare", action=argparse.BooleanOptionalAction, default=True,
                    help="run the bare server beside the agent")  # fmt: skip
    ap.add_argument("--warmup", type=int, default=0, help="seconds of warm-up (summary)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="agent config override, e.g. drift.buffer_bytes=1048576")  # fmt: skip
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="daemon environment variable, e.g. MALLOC_ARENA_MAX=2")  # fmt: skip
    args = ap.parse_args()
    if not 1 <= args.batch <= 64:
        ap.error("--batch must be in [1, 64]")
    import edge_agent

    with tempfile.TemporaryDirectory() as tmp:
        samples = soak(args, Path(tmp))
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {os.cpu_count()} cores, loadavg at the "
        f"end {load}, python {sys.version.split()[0]}, edge_agent from "
        f"{Path(edge_agent.__file__).parent}, gRPC {'on' if args.grpc else 'off'}, sync "
        f"{'on' if args.sync else 'off'}, overrides {args.set or 'none'}, "
        f"env {args.env or 'none'}"
    )
    print(markdown(samples, args))


if __name__ == "__main__":
    main()
