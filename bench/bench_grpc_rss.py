"""What the gRPC front end costs in memory: the daemon's RSS with ``[grpc] enabled`` off and on.

One model loaded (the quantized digits MLP of ``bench_agent``). Each round starts a fresh daemon
per setting, alternating off/on so a busy machine hurts both alike, sends ``--requests`` REST
inferences (and as many gRPC ones when gRPC is on, so its threads, buffers and message classes
are warm), waits for the daemon to settle and reads ``VmRSS`` from ``/proc/<pid>/status``.
Prints the median and spread per setting and the difference of the medians.

This process maps none of the daemon's libraries and the daemon imports private copies of its
compiled packages (``bench_rss_breakdown``), since a library page another process maps stays
resident in the daemon (``[runtime] release_startup_memory`` cannot page it
out). ``--set section.key=value`` overrides the daemon's config (e.g.
``runtime.release_startup_memory=false`` for the figures without it).

Usage: .venv/bin/python bench/bench_grpc_rss.py [--rounds 5] [--requests 500] [--set ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rss_breakdown import BIN, free_port, grpc_client, prepare, private_libs, wait_ready


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and its anonymous and file-backed parts (MB) from ``/proc/<pid>/status``."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def measure(
    files: dict[str, str], work: Path, grpc_on: bool, n: int, overrides: list[str]
) -> dict[str, float]:
    port, grpc_port = free_port(), free_port()
    state = work / f"state-{time.monotonic_ns()}"
    cfg = work / "agent.toml"
    cfg.write_text(
        f"[api]\nport = {port}\n[grpc]\nenabled = {str(grpc_on).lower()}\nport = {grpc_port}\n"
        f'[store]\nstate_dir = "{state}"\nroot_path = "{files["root"]}"\n'
    )
    env = dict(os.environ)
    lib = work / "daemonlib" if (work / "daemonlib").exists() else private_libs(work)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(lib)]))
    for item in overrides:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        env[f"EDGEFLEET_AGENT__{section.upper()}__{name.upper()}"] = value
    edge_agent = str(BIN / "edge-agent")
    subprocess.run([edge_agent, "install", files["bundle"], "--config", str(cfg)], check=True,
                   capture_output=True, env=env)  # fmt: skip
    log = work / "daemon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([edge_agent, "run", "--config", str(cfg)], env=env,
                                stdout=out, stderr=out)  # fmt: skip
    try:
        try:
            wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", timeout=300)
        except RuntimeError:
            print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        body = Path(files["rest"]).read_bytes()
        url = f"http://127.0.0.1:{port}/v2/models/digits/infer"
        for _ in range(n):
            with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=5):
                pass
        if grpc_on:
            client = grpc_client(work, f"127.0.0.1:{grpc_port}", Path(files["grpc"]), n, 1)
            if client.stdin is not None:
                client.stdin.close()
            if client.wait(timeout=300) != 0:
                raise RuntimeError("the gRPC client failed")
        time.sleep(2.0)  # let the drift worker and allocator settle before reading RSS
        return memory_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = prepare(work)
        results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for _ in range(args.rounds):
            for grpc_on in (False, True):
                results[grpc_on].append(measure(files, work, grpc_on, args.requests, args.set))
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    when = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    print(f"Run {when}, loadavg {load}, overrides {args.set or 'none'}")
    for key in ("VmRSS", "RssAnon", "RssFile"):
        medians = {}
        for grpc_on, rows in results.items():
            values = [row[key] for row in rows]
            medians[grpc_on] = statistics.median(values)
            label = "gRPC on " if grpc_on else "gRPC off"
            spread = f"min {min(values):.1f}, max {max(values):.1f}, {len(values)} daemons"
            print(f"{key:8} {label}: median {medians[grpc_on]:.1f} MB ({spread})")
        print(f"{key:8} gRPC costs {medians[True] - medians[False]:.1f} MB (difference of medians)")


if __name__ == "__main__":
    main()
