"""What the gRPC front end costs in memory: the daemon's RSS with ``[grpc] enabled`` off and on.

One model loaded (the quantized digits MLP of ``bench_agent``). Each round starts a fresh daemon
per setting, alternating off/on so a busy machine hurts both alike, sends ``--requests`` REST
inferences (and as many gRPC ones when gRPC is on, so its threads, buffers and message classes
are warm), waits for the daemon to settle and reads ``VmRSS`` from ``/proc/<pid>/status``.
Prints the median and spread per setting and the difference of the medians.

Usage: .venv/bin/python bench/bench_grpc_rss.py [--rounds 5] [--requests 500]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_agent import BIN, build_bundle, free_port, wait_ready


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and its anonymous and file-backed parts (MB) from ``/proc/<pid>/status``."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def measure(
    bundle: Path, root: Path, x: np.ndarray, work: Path, grpc_on: bool, n: int
) -> dict[str, float]:
    port, grpc_port = free_port(), free_port()
    state = work / f"state-{time.monotonic_ns()}"
    cfg = work / "agent.toml"
    cfg.write_text(
        f"[api]\nport = {port}\n[grpc]\nenabled = {str(grpc_on).lower()}\nport = {grpc_port}\n"
        f'[store]\nstate_dir = "{state}"\nroot_path = "{root}"\n'
    )
    edge_agent = str(BIN / "edge-agent")
    subprocess.run([edge_agent, "install", str(bundle), "--config", str(cfg)], check=True,
                   capture_output=True)  # fmt: skip
    proc = subprocess.Popen([edge_agent, "run", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}/v2/health/ready")
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                       "data": x[:1].ravel().tolist()}]}).encode()  # fmt: skip
        url = f"http://127.0.0.1:{port}/v2/models/digits/infer"
        for _ in range(n):
            with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=5):
                pass
        if grpc_on:
            import tritonclient.grpc as tg

            client = tg.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
            tensor = tg.InferInput("input", [1, 64], "FP32")
            tensor.set_data_from_numpy(x[:1].astype(np.float32))
            for _ in range(n):
                client.infer("digits", [tensor])
            client.close()
        time.sleep(2.0)  # let the drift worker and allocator settle before reading RSS
        return memory_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle, root, x_eval = build_bundle(work)
        results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for _ in range(args.rounds):
            for grpc_on in (False, True):
                results[grpc_on].append(measure(bundle, root, x_eval, work, grpc_on, args.requests))
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
