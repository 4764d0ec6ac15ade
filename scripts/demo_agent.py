"""Second half of the demo: run the signed bundle on a local edge-agent daemon.

Installs ``<out>/digits-<v>.efb`` into a fresh agent state directory, starts ``edge-agent run``
on a free loopback port and a Unix socket, sends held-out digits through the local KServe v2 API
(including a malformed request, which must come back as a typed 400), prints a summary and the
agent's status, and stops the daemon with SIGTERM. Leaves nothing running.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edge_agent.client import AgentClient, AgentRequestError
from edge_agent.config import ApiConfig

BIN = Path(sys.executable).parent


def main(out: Path) -> int:
    out = out.resolve()  # the agent config resolves relative paths against its own directory
    bundle = max(out.glob("digits-*.efb"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agent_dir = out / "agent"
    agent_dir.mkdir(exist_ok=True)
    sock = agent_dir / "agent.sock"
    config = agent_dir / "agent.toml"
    config.write_text(
        f'device_id = "demo-device"\n[api]\nport = {port}\nunix_socket = "{sock}"\n'
        f'[store]\nstate_dir = "{agent_dir / "state"}"\n'
        f'root_path = "{out / "keys" / "root.json"}"\n[model_defaults]\nprobation_requests = 50\n'
    )
    print(f"5/6 edge-agent install {bundle.name} (verified against the device's root of trust)")
    res = subprocess.run(
        [str(BIN / "edge-agent"), "install", str(bundle), "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    print("   " + (res.stdout.strip() or res.stderr.strip()))
    if res.returncode not in (0,) and "already installed" not in res.stderr:
        return res.returncode
    log = (agent_dir / "daemon.log").open("w")
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(BIN / "edge-agent"), "run", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        client = AgentClient(ApiConfig(port=port), timeout=5)
        while True:
            try:
                if client.ready():
                    break
            except Exception:  # noqa: S110 - not listening yet
                pass
            if proc.poll() is not None or time.monotonic() - started > 60:
                print((agent_dir / "daemon.log").read_text())
                return 1
            time.sleep(0.05)
        print(
            f"6/6 edge-agent run: ready in {time.monotonic() - started:.2f} s on "
            f"127.0.0.1:{port} and {sock}; sending held-out digits over the v2 API"
        )
        data = np.load(out / "example" / "eval.npz")
        x, y = data["input"], data["y"]
        correct = 0
        latencies = []
        for i in range(0, 256, 8):
            t = time.perf_counter()
            reply = client.infer("digits", {"input": x[i : i + 8]})
            latencies.append((time.perf_counter() - t) * 1000)
            probs = np.asarray(reply["outputs"][0]["data"]).reshape(-1, 10)
            correct += int((probs.argmax(axis=1) == y[i : i + 8]).sum())
        uds = AgentClient(ApiConfig(unix_socket=str(sock)), timeout=5)
        uds_version = uds.infer("digits", {"input": x[:1]})["model_version"]
        bad = x[:1].copy()
        bad[0, 0] = 99.0  # outside the signed input contract (pixels are 0..16)
        try:
            client.infer("digits", {"input": bad})
            refusal = "accepted (unexpected)"
        except AgentRequestError as exc:
            refusal = str(exc)
        metrics = client.request("GET", "/metrics")[1]
        n_metrics = sum(1 for line in str(metrics).splitlines() if line.startswith("edgefleet_"))
        print(
            f"   accuracy {correct}/256 on held-out digits, median request "
            f"{np.median(latencies):.2f} ms (batch 8, JSON), unix socket answered v{uds_version}"
        )
        print(f"   out-of-contract input refused: {refusal}")
        print(f"   /metrics exposes {n_metrics} edgefleet series")
        status = subprocess.run(
            [str(BIN / "edge-agent"), "status", "--config", str(config)],
            capture_output=True,
            text=True,
            check=False,
        )
        print("   " + status.stdout.strip().replace("\n", "\n   "))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        log.close()
    print(f"   daemon stopped cleanly (exit {code}); logs in {agent_dir / 'daemon.log'}")
    summary = {"bundle": bundle.name, "accuracy": correct / 256, "exit": code}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return code


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-out")))
