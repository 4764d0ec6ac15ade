"""What serving a second kept version costs in memory: the daemon's RSS with one version loaded
(``[serving] version_policy = {latest = 1}``, the default) and with two (``{latest = 2}``).

Digits v1 and v2 (the quantized MLP of ``bench_agent``, signed twice) are installed; v2 is
active. Each round starts a fresh daemon per setting, alternating, sends ``--requests`` REST
inferences to the active version (and as many to ``/versions/1`` when it serves), waits for the
daemon to settle and reads ``VmRSS`` from ``/proc/<pid>/status``. Prints the median and spread
per setting and the difference of the medians: the price of one more loaded session of this
model (a larger model costs more: the registry's admission counts each version's measured load
against ``store.memory_budget_mb``).

Usage: .venv/bin/python bench/bench_version_rss.py [--rounds 5] [--requests 300]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_agent import BIN, build_bundle, free_port, wait_ready
from bench_grpc_rss import memory_mb


def build_two_versions(work: Path) -> tuple[list[Path], Path, np.ndarray]:
    """Digits v1 (``bench_agent.build_bundle``) and v2 (the same model signed as another
    version with the same keys); returns (bundles, root, x)."""
    from edge_agent.bundle import read_bundle
    from edge_agent.trust import TrustedRoot
    from model_builder.keystore import KeyStore
    from model_builder.package import package_bundle

    first, root, x = build_bundle(work)
    now = datetime.now(UTC)
    keys = KeyStore.open(work / "keys")
    loaded = read_bundle(
        first,
        TrustedRoot.from_bytes(root.read_bytes()),
        now=now,
        installed_version=None,
        device=None,
    )
    second = work / "digits-2.efb"
    manifest = dataclasses.replace(loaded.manifest, version=2)
    second.write_bytes(package_bundle(manifest, loaded.artifact, keys, now=now))
    return [first, second], root, x


def measure(
    bundles: list[Path], root: Path, x: np.ndarray, work: Path, versions: int, n: int
) -> dict[str, float]:
    port = free_port()
    state = work / f"state-{time.monotonic_ns()}"
    cfg = work / "agent.toml"
    cfg.write_text(
        f"[api]\nport = {port}\n[serving]\nversion_policy = {{ latest = {versions} }}\n"
        f'[store]\nstate_dir = "{state}"\nroot_path = "{root}"\n'
    )
    edge_agent = str(BIN / "edge-agent")
    for bundle in bundles:
        subprocess.run([edge_agent, "install", str(bundle), "--config", str(cfg)], check=True,
                       capture_output=True)  # fmt: skip
    proc = subprocess.Popen([edge_agent, "run", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}/v2/health/ready")
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                       "data": x[:1].ravel().tolist()}]}).encode()  # fmt: skip
        paths = ["/v2/models/digits/infer"]
        if versions > 1:
            paths.append("/v2/models/digits/versions/1/infer")
        for path in paths:
            url = f"http://127.0.0.1:{port}{path}"
            for _ in range(n):
                with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=5):
                    pass
        time.sleep(2.0)  # let the drift worker and allocator settle before reading RSS
        return memory_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundles, root, x_eval = build_two_versions(work)
        results: dict[int, list[dict[str, float]]] = {1: [], 2: []}
        for _ in range(args.rounds):
            for versions in (1, 2):
                results[versions].append(
                    measure(bundles, root, x_eval, work, versions, args.requests)
                )
    for key in ("VmRSS", "RssAnon", "RssFile"):
        medians = {}
        for versions, rows in results.items():
            values = [row[key] for row in rows]
            medians[versions] = statistics.median(values)
            spread = f"min {min(values):.1f}, max {max(values):.1f}, {len(values)} daemons"
            print(f"{key:8} {versions} version(s) loaded: median {medians[versions]:.1f} MB "
                  f"({spread})")  # fmt: skip
        print(f"{key:8} the second version costs {medians[2] - medians[1]:.1f} MB "
              "(difference of medians)")  # fmt: skip


if __name__ == "__main__":
    main()
