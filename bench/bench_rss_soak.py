"""The daemon's resident memory under steady REST traffic, beside a bare server's (issue 13).

Starts a real ``edge-agent run`` daemon (one model, the quantized digits MLP of
``bench_agent``, no sync: closed drift windows are never shipped, the worst case for the
agent's window buffer) and ``bench_agent``'s bare Starlette + uvicorn + onnxruntime server on
the same model, side by side. ``--conns`` client threads per server send ``--batch``-row
JSON inferences back to back for ``--seconds``; every ``--every`` seconds the script reads
``VmRSS`` from ``/proc/<pid>/status`` of both servers and the agent's closed drift windows
from its ``/metrics``. Prints a markdown table of RSS over time. Both servers share the
machine (and its load) alike; the RSS numbers are the point, not throughput.

Which agent code runs is whatever ``edge_agent`` the interpreter imports: to measure another
checkout, put its ``src`` first on ``PYTHONPATH`` (the daemon inherits the environment); the
script prints the path it found.

Usage: .venv/bin/python bench/bench_rss_soak.py [--seconds 300] [--every 10] [--conns 2]
       [--batch 16] [--set drift.buffer_bytes=1048576 ...]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_agent import BIN, build_bundle, free_port, start_bare_server, wait_ready

INFER = "/v2/models/digits/infer"


def memory_mb(pid: int) -> float:
    """``VmRSS`` of ``pid`` in MB (MiB), from ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
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


class Load:
    """``conns`` threads posting ``body`` to one server back to back until stopped."""

    def __init__(self, port: int, body: bytes, conns: int) -> None:
        self.port, self.body = port, body
        self.requests = 0
        self.errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(conns)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = {"Content-Type": "application/json"}
        while not self._stop.is_set():
            ok = False
            try:
                conn.request("POST", INFER, body=self.body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            with self._lock:
                self.requests += 1
                self.errors += not ok
        conn.close()


def start_agent(
    bundle: Path, root: Path, work: Path, overrides: list[str]
) -> tuple[subprocess.Popen[bytes], int]:
    """Install the bundle and start ``edge-agent run``; returns (process, API port) once ready."""
    port = free_port()
    cfg = work / "agent.toml"
    cfg.write_text(
        f"[api]\nport = {port}\nrate_limit_per_second = 1000000.0\n"
        f'rate_limit_burst = 1000000\n[store]\nstate_dir = "{work / "state"}"\n'
        f'root_path = "{root}"\n[model_defaults]\nprobation_requests = 1\n'
    )
    env = dict(os.environ)
    for item in overrides:  # section.key=value, as the agent's own environment overrides
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        env[f"EDGEFLEET_AGENT__{section.upper()}__{name.upper()}"] = value
    edge_agent = str(BIN / "edge-agent")
    subprocess.run([edge_agent, "install", str(bundle), "--config", str(cfg)], check=True,
                   capture_output=True, env=env)  # fmt: skip
    proc = subprocess.Popen([edge_agent, "run", "--config", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}/v2/health/ready")
    except RuntimeError:
        proc.terminate()
        raise
    return proc, port


def soak(args: argparse.Namespace, work: Path) -> list[dict[str, float]]:
    bundle, root, x_eval = build_bundle(work)
    rows = x_eval[: args.batch]
    tensor = {"name": "input", "shape": list(rows.shape), "datatype": "FP32",
              "data": rows.ravel().tolist()}  # fmt: skip
    body = json.dumps({"inputs": [tensor]}).encode()
    agent, port = start_agent(bundle, root, work, args.set)
    try:
        bare, bport = start_bare_server(bundle, root, work)
    except RuntimeError:
        agent.terminate()
        raise
    loads = [Load(port, body, args.conns), Load(bport, body, args.conns)]
    samples: list[dict[str, float]] = []
    try:
        time.sleep(1.0)
        start = time.monotonic()

        def sample() -> None:
            samples.append({
                "t": time.monotonic() - start,
                "agent_mb": memory_mb(agent.pid),
                "bare_mb": memory_mb(bare.pid),
                "windows": drift_windows_closed(port),
                "agent_requests": loads[0].requests,
                "bare_requests": loads[1].requests,
                "errors": loads[0].errors + loads[1].errors,
            })  # fmt: skip

        sample()
        for load in loads:
            load.start()
        for k in range(1, args.seconds // args.every + 1):
            time.sleep(max(0.0, start + k * args.every - time.monotonic()))
            sample()
    finally:
        for load in loads:
            load.stop()
        for proc in (agent, bare):
            proc.terminate()
            proc.wait(timeout=30)
    return samples


def markdown(samples: list[dict[str, float]], args: argparse.Namespace) -> str:
    lines = [
        "| t (s) | edge-agent VmRSS (MB) | drift windows closed | bare server VmRSS (MB) "
        "| agent requests | bare requests |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for s in samples:
        lines.append(
            f"| {s['t']:.0f} | {s['agent_mb']:.1f} | {s['windows']:.0f} | {s['bare_mb']:.1f} "
            f"| {s['agent_requests']:.0f} | {s['bare_requests']:.0f} |"
        )
    first, last = samples[0], samples[-1]
    lines += [
        "",
        f"edge-agent grew {last['agent_mb'] - first['agent_mb']:+.1f} MB, the bare server "
        f"{last['bare_mb'] - first['bare_mb']:+.1f} MB over {last['t']:.0f} s "
        f"({args.conns} connections each, {args.batch} rows per request; "
        f"{last['errors']:.0f} failed requests).",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=300, help="length of the soak")
    ap.add_argument("--every", type=int, default=10, help="seconds between RSS samples")
    ap.add_argument("--conns", type=int, default=2, help="client connections per server")
    ap.add_argument("--batch", type=int, default=16, help="rows per request (1-64)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="agent config override, e.g. drift.buffer_bytes=1048576")  # fmt: skip
    args = ap.parse_args()
    if not 1 <= args.batch <= 64:
        ap.error("--batch must be in [1, 64]")
    import edge_agent

    with tempfile.TemporaryDirectory() as tmp:
        samples = soak(args, Path(tmp))
    print(
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {os.cpu_count()} cores, python "
        f"{sys.version.split()[0]}, numpy {np.__version__}, edge_agent from "
        f"{Path(edge_agent.__file__).parent}, overrides {args.set or 'none'}"
    )
    print(markdown(samples, args))


if __name__ == "__main__":
    main()
