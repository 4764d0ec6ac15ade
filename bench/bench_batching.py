"""Adaptive batching (``[models.<name>] batching``) on a model where it should pay, through the
real daemon: requests/s and latency with batching off and on, under wrk at 1, 8 and 64
connections, alternating the two daemons round by round (absolute figures on a shared machine
drift; the ratio within a round does not).

The model is ``model_builder.examples.digits_slow_mlp`` (the digits MLP with ``--depth`` shared
``--width`` x ``--width`` layers in the middle; the defaults, 8 x 2048, give 4.3 M parameters and
~67 MFLOP a row), built (int8, static) and signed like any bundle. Both
daemons serve the same bundle from their own state directory; the only difference is the
model's ``batching`` policy ("off" vs "on" with ``batch_max_delay_ms``). Also printed: what
``batching = "auto"`` decides for this model and for the plain digits MLP on this machine, and
the batch sizes the daemon reports in its metrics.

Usage: .venv/bin/python bench/bench_batching.py [--seconds 5] [--rounds 3] [--conns 1,8,64]
Needs wrk (Debian: apt-get install wrk).
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

from bench_agent import BIN, build_bundle, free_port, wait_ready, wrk

ROOT = Path(__file__).resolve().parents[1]


def start(work: Path, bundle: Path, root: Path, policy: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    work.mkdir(parents=True)
    cfg = work / "agent.toml"
    cfg.write_text(
        f"[api]\nport = {port}\nrate_limit_per_second = 1000000.0\n"
        f'rate_limit_burst = 1000000\n[store]\nstate_dir = "{work / "state"}"\n'
        f'root_path = "{root}"\n[model_defaults]\nprobation_requests = 1\n'
        f"[models.m]\n{policy}\n"
    )
    subprocess.run(
        [str(BIN / "edge-agent"), "install", str(bundle), "--config", str(cfg)],
        check=True,
        capture_output=True,
    )
    log = (work / "agent.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "edge-agent"), "run", "--config", str(cfg)], stdout=log, stderr=log
    )
    wait_ready(f"http://127.0.0.1:{port}/v2/health/ready")
    return proc, port


def batch_metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("edgefleet_agent_batches_total{"):
            what = line.split('what="')[1].split('"')[0]
            out[what] = float(line.rsplit(" ", 1)[1])
    return out


def auto_decision(bundle: Path, root: Path, work: Path) -> str:
    """What ``batching = "auto"`` logs when the daemon loads the model."""
    proc, _ = start(work, bundle, root, 'batching = "auto"')
    proc.terminate()
    proc.wait(30)
    for line in (work / "agent.log").read_text(errors="replace").splitlines():
        if "loaded m v1" in line:
            return line.split("loaded m v1", 1)[1].strip()
    return "(no load line in the log)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", default="1,8,64")
    ap.add_argument("--delay-ms", type=float, default=2.0, help="batch_max_delay_ms")
    ap.add_argument("--width", type=int, default=2048, help="digits_slow_mlp width")
    ap.add_argument("--depth", type=int, default=8, help="digits_slow_mlp depth")
    args = ap.parse_args()
    conns = [int(c) for c in args.conns.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle, root, x_eval = build_bundle(
            work / "slow", "digits_slow_mlp", "m", width=args.width, depth=args.depth
        )
        params = 64 * args.width + args.width**2 + args.width * 10
        plain_bundle, plain_root, _ = build_bundle(work / "plain", "digits_mlp", "m")
        print("auto, digits_slow_mlp:", auto_decision(bundle, root, work / "auto-slow"))
        print("auto, digits_mlp:     ", auto_decision(plain_bundle, plain_root, work / "auto-mlp"))
        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 64],
                        "datatype": "FP32",
                        "data": x_eval[:1].ravel().tolist(),
                    }
                ]
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        servers = {
            "off": start(work / "off", bundle, root, 'batching = "off"'),
            "on": start(
                work / "on",
                bundle,
                root,
                f'batching = "on"\nbatch_max_rows = 64\nbatch_max_delay_ms = {args.delay_ms}',
            ),
        }
        results: dict[tuple[str, int], list[dict]] = {}
        try:
            for c in conns:  # warm both at every concurrency
                for _, port in servers.values():
                    wrk(f"http://127.0.0.1:{port}/v2/models/m/infer", body, headers, c, 1, work)
            for r in range(args.rounds):
                for c in conns:
                    order = ["off", "on"] if r % 2 == 0 else ["on", "off"]
                    for name in order:
                        port = servers[name][1]
                        url = f"http://127.0.0.1:{port}/v2/models/m/infer"
                        res = wrk(url, body, headers, c, args.seconds, work)
                        results.setdefault((name, c), []).append(res)
                        print(
                            f"round {r + 1} {name:>3} c={c:<3} {res['rps']:8.0f} req/s "
                            f"p50 {res['p50_ms']:7.2f} ms p99 {res['p99_ms']:7.2f} ms "
                            f"non-2xx {res['non_2xx']}",
                            flush=True,
                        )
            stats = batch_metrics(servers["on"][1])
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
    print()
    print(
        f"digits_slow_mlp (width {args.width}, depth {args.depth}: {params / 1e6:.1f} M "
        f"parameters), JSON, batch 1 per request, "
        f"{args.rounds} alternating rounds of {args.seconds} s, medians [min-max]; "
        f"batch_max_delay_ms = {args.delay_ms}; {time.strftime('%Y-%m-%d')}"
    )
    print()
    print("| connections | off req/s | on req/s | on / off | off p99 ms | on p99 ms |")
    print("|---|---|---|---|---|---|")

    def med(rows: list[dict], key: str) -> str:
        v = [x[key] for x in rows]
        return f"{statistics.median(v):.1f} [{min(v):.1f}-{max(v):.1f}]"

    for c in conns:
        off, on = results[("off", c)], results[("on", c)]
        ratios = [b["rps"] / a["rps"] for a, b in zip(off, on, strict=True)]
        print(
            f"| {c} | {med(off, 'rps')} | {med(on, 'rps')} | "
            f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] | "
            f"{med(off, 'p99_ms')} | {med(on, 'p99_ms')} |"
        )
    if stats.get("batches"):
        print()
        print(
            f"batching on: {stats.get('requests', 0):.0f} requests in {stats['batches']:.0f} "
            f"batches ({stats.get('requests', 0) / stats['batches']:.1f} requests a batch), "
            f"{stats.get('alone', 0):.0f} alone, {stats.get('reruns', 0):.0f} reruns"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "bench"))
    main()
