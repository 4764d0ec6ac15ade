"""edge-agent benchmarks, each against its raw baseline in the same run.

1. In-process overhead of the agent's pipeline (validation + preprocessing + drift sketching +
   counters) over bare ``onnxruntime.InferenceSession.run`` on the same quantized digits MLP,
   at batch 1 and 64, with drift sketched inline (worst case) and on the background worker.
2. The local KServe v2 API (the real daemon process) under wrk with 1, 8 and 64 connections,
   JSON and binary tensors, against a bare uvicorn + onnxruntime endpoint (same model, same
   JSON decoding, no validation/drift/metrics) started the same way.
3. The daemon's RSS with one model loaded, and its start-to-ready time.

TFLite float vs static int8 through the agent's runtime adapter and the bare interpreter is
measured by ``bench/bench_tflite.py`` (table in docs/tflite.md).

Usage: .venv/bin/python bench/bench_agent.py [--seconds 5] [--markdown]
Needs wrk (Debian: apt-get install wrk) for part 2; parts 1 and 3 run without it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TARGETS = {
    "b1_overhead_us": 15.0,
    "b64_overhead_us_per_row": 0.5,
    "api_rps_8": 2500.0,
    "api_p99_ms_8": 10.0,
    "rss_mb": 150.0,
    "ready_s": 2.0,
}


def build_bundle(work: Path) -> tuple[Path, Path, np.ndarray]:
    """Train, quantize and sign the digits MLP; returns (bundle, root, eval inputs)."""
    from model_builder.build import build_bundle as build
    from model_builder.config import BuildConfig
    from model_builder.data import Dataset
    from model_builder.examples import digits_mlp
    from model_builder.keystore import KeyStore

    ex = digits_mlp()
    now = datetime.now(UTC)
    keys = KeyStore.init(work / "keys", now=now)
    res = build(
        ex.model_bytes,
        "onnx",
        Dataset({"input": ex.x_calib}, None),
        Dataset({"input": ex.x_eval}, ex.y_eval),
        (ex.input_contract(max_batch=64), ex.output_contract()),
        BuildConfig(name="digits", version=1, measure_latency=False, arch=("any",)),
        keys,
        now=now,
    )
    bundle = work / "digits-1.efb"
    bundle.write_bytes(res.bundle)
    root = work / "root.json"
    root.write_bytes(keys.root_bytes())
    return bundle, root, ex.x_eval.astype(np.float32)


def timed(fn, n: int) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def in_process(bundle: Path, root: Path, x_eval: np.ndarray, rounds: int = 7) -> list[dict]:
    import onnxruntime as ort

    from edge_agent.bundle import read_bundle
    from edge_agent.config import DriftConfig, ModelPolicy
    from edge_agent.runtime.base import RuntimeOptions
    from edge_agent.runtime.loader import load_runtime
    from edge_agent.serving.pipeline import DriftWorker, ModelPipeline
    from edge_agent.trust import TrustedRoot

    loaded = read_bundle(
        bundle,
        TrustedRoot.from_bytes(root.read_bytes()),
        now=datetime.now(UTC),
        installed_version=None,
        device=None,
    )
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(loaded.artifact, so, providers=["CPUExecutionProvider"])
    pre = loaded.manifest.inputs.tensors[0].preprocessing
    worker = DriftWorker()
    pipes = {
        "inline": ModelPipeline(
            loaded.manifest,
            load_runtime(loaded.artifact, "onnx", RuntimeOptions()),
            ModelPolicy(),
            DriftConfig(),
        ),
        "worker": ModelPipeline(
            loaded.manifest,
            load_runtime(loaded.artifact, "onnx", RuntimeOptions()),
            ModelPolicy(),
            DriftConfig(),
            worker=worker,
        ),
    }
    rows = []
    for batch in (1, 64):
        x = x_eval[:batch]
        px = pre.apply(x)
        n = 4000 if batch == 1 else 600
        samples: dict[str, list[float]] = {"bare": [], "inline": [], "worker": []}
        for _ in range(rounds):  # alternate, so background noise hits every variant alike
            samples["bare"].append(timed(lambda px=px: sess.run(None, {"input": px}), n))
            for name, p in pipes.items():
                samples[name].append(timed(lambda p=p, x=x: p.run({"input": x}), n))
                worker.drain()
        bare = statistics.median(samples["bare"])
        for name in ("inline", "worker"):
            t = statistics.median(samples[name])
            rows.append(
                {
                    "batch": batch,
                    "drift": name,
                    "bare_us": bare * 1e6,
                    "pipeline_us": t * 1e6,
                    "overhead_us": (t - bare) * 1e6,
                    "overhead_us_per_row": (t - bare) * 1e6 / batch,
                    "ratio": t / bare,
                }
            )
    worker.close()
    rows.append({"drift_blocks_dropped_by_worker": worker.dropped})
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout: float = 60) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{url} never became ready")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


BARE_SERVER = textwrap.dedent("""
    import json, sys
    import numpy as np, onnxruntime as ort, uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route
    so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
    sess = ort.InferenceSession(open(sys.argv[1], "rb").read(), so,
                                providers=["CPUExecutionProvider"])
    scale = np.asarray(json.loads(sys.argv[3])["scale"], np.float32)
    offset = np.asarray(json.loads(sys.argv[3])["offset"], np.float32)
    async def infer(request):
        body = json.loads(await request.body())
        t = body["inputs"][0]
        x = np.asarray(t["data"], np.float32).reshape(t["shape"]) * scale + offset
        y = sess.run(None, {"input": x})[0]
        return Response(json.dumps({"outputs": [{"name": "probabilities", "datatype": "FP32",
                        "shape": list(y.shape), "data": y.ravel().tolist()}]}),
                        media_type="application/json")
    async def ready(request):
        return Response("{}")
    app = Starlette(routes=[Route("/v2/models/digits/infer", infer, methods=["POST"]),
                            Route("/v2/health/ready", ready)])
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
""")


def start_bare_server(bundle: Path, root: Path, work: Path) -> tuple[subprocess.Popen, int]:
    """Start ``BARE_SERVER`` on the bundle's model and preprocessing; returns (process, port)
    once it answers ready (the caller terminates it)."""
    from edge_agent.bundle import read_bundle
    from edge_agent.trust import TrustedRoot

    loaded = read_bundle(
        bundle,
        TrustedRoot.from_bytes(root.read_bytes()),
        now=datetime.now(UTC),
        installed_version=None,
        device=None,
    )
    model = work / "model.onnx"
    model.write_bytes(loaded.artifact)
    pre = loaded.manifest.inputs.tensors[0].preprocessing
    bport = free_port()
    server = work / "bare_server.py"
    server.write_text(BARE_SERVER)
    bare = subprocess.Popen(
        [
            sys.executable,
            str(server),
            str(model),
            str(bport),
            json.dumps({"scale": list(pre.scale), "offset": list(pre.offset)}),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(f"http://127.0.0.1:{bport}/v2/health/ready")
    except RuntimeError:
        bare.terminate()
        raise
    return bare, bport


def wrk(
    url: str, body: bytes, headers: dict[str, str], conns: int, seconds: int, work: Path
) -> dict:
    script = work / f"req-{conns}-{len(body)}.lua"
    body_file = work / f"body-{len(body)}.bin"
    body_file.write_bytes(body)
    hdr = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    script.write_text(
        f'local f = io.open("{body_file}", "rb")\nwrk.body = f:read("*all")\n'
        f'f:close()\nwrk.method = "POST"\n{hdr}\n'
    )
    out = subprocess.run(
        [
            "wrk",
            "-t",
            str(min(conns, 2)),
            "-c",
            str(conns),
            "-d",
            f"{seconds}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout

    def ms(label: str) -> float:
        m = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out)
        if not m:
            return float("nan")
        v = float(m.group(1))
        return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": ms("50%"),
        "p99_ms": ms("99%"),
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


def api(bundle: Path, root: Path, x_eval: np.ndarray, seconds: int, work: Path) -> dict:
    port = free_port()
    cfg = work / "agent.toml"
    cfg.write_text(
        f"[api]\nport = {port}\nrate_limit_per_second = 1000000.0\n"
        f'rate_limit_burst = 1000000\n[store]\nstate_dir = "{work / "state"}"\n'
        f'root_path = "{root}"\n[model_defaults]\nprobation_requests = 1\n'
    )
    subprocess.run(
        [str(BIN / "edge-agent"), "install", str(bundle), "--config", str(cfg)],
        check=True,
        capture_output=True,
    )
    start = time.monotonic()
    proc = subprocess.Popen(
        [str(BIN / "edge-agent"), "run", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    result: dict = {}
    try:
        wait_ready(f"http://127.0.0.1:{port}/v2/health/ready")
        result["ready_s"] = time.monotonic() - start
        time.sleep(1.0)
        result["rss_mb_idle"] = rss_mb(proc.pid)
        x1 = x_eval[:1]
        json_body = json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 64],
                        "datatype": "FP32",
                        "data": x1.ravel().tolist(),
                    }
                ]
            }
        ).encode()
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 64],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 256},
                    }
                ],
                "parameters": {"binary_data_output": True},
            }
        ).encode()
        bin_body = header + x1.astype("<f4").tobytes()
        url = f"http://127.0.0.1:{port}/v2/models/digits/infer"
        if shutil.which("wrk") is None:
            result["wrk"] = "not installed"
            return result
        rows = []
        for conns in (1, 8, 64):
            rows.append(
                {
                    "server": "edge-agent",
                    "encoding": "json",
                    "conns": conns,
                    **wrk(
                        url, json_body, {"Content-Type": "application/json"}, conns, seconds, work
                    ),
                }
            )
            rows.append(
                {
                    "server": "edge-agent",
                    "encoding": "binary",
                    "conns": conns,
                    **wrk(
                        url,
                        bin_body,
                        {
                            "Content-Type": "application/octet-stream",
                            "Inference-Header-Content-Length": str(len(header)),
                        },
                        conns,
                        seconds,
                        work,
                    ),
                }
            )
        result["rss_mb_after_load"] = rss_mb(proc.pid)
        result["rows"] = rows
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # the bare baseline: same model, JSON in/out, nothing else
    bare, bport = start_bare_server(bundle, root, work)
    try:
        wrk(
            f"http://127.0.0.1:{bport}/v2/models/digits/infer",
            json_body,
            {"Content-Type": "application/json"},
            8,
            2,
            work,
        )  # warm-up, not recorded
        for conns in (1, 8, 64):
            result["rows"].append(
                {
                    "server": "bare uvicorn+ort",
                    "encoding": "json",
                    "conns": conns,
                    **wrk(
                        f"http://127.0.0.1:{bport}/v2/models/digits/infer",
                        json_body,
                        {"Content-Type": "application/json"},
                        conns,
                        seconds,
                        work,
                    ),
                }
            )
    finally:
        bare.terminate()
        bare.wait(timeout=30)
    return result


def markdown(proc_rows: list[dict], api_res: dict) -> str:
    lines = [
        "In-process (digits MLP, int8, 1 thread; median of alternating rounds):",
        "",
        "| batch | drift sketching | bare ort.run | pipeline | pipeline/bare | overhead/request | "
        "overhead/row | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in proc_rows:
        if "batch" not in r:
            continue
        if r["batch"] == 1:
            target = f"<= {TARGETS['b1_overhead_us']:.0f} us/request: " + (
                "ok" if r["overhead_us"] <= TARGETS["b1_overhead_us"] else "MISS"
            )
        else:
            target = f"<= {TARGETS['b64_overhead_us_per_row']} us/row: " + (
                "ok" if r["overhead_us_per_row"] <= TARGETS["b64_overhead_us_per_row"] else "MISS"
            )
        lines.append(
            f"| {r['batch']} | {r['drift']} | {r['bare_us']:.1f} us | "
            f"{r['pipeline_us']:.1f} us | {r['ratio']:.2f}x | {r['overhead_us']:.1f} us | "
            f"{r['overhead_us_per_row']:.2f} us | {target} |"
        )
    dropped = next((r for r in proc_rows if "drift_blocks_dropped_by_worker" in r), {})
    lines += [
        "",
        f"Drift blocks the background worker dropped (sampled out): "
        f"{dropped.get('drift_blocks_dropped_by_worker', 0)}",
        "",
    ]
    if "rows" in api_res:
        lines += [
            "Local API (wrk, batch-1 requests, loopback):",
            "",
            "| server | encoding | connections | requests/s | of bare | p50 | p99 | non-2xx |",
            "|---|---|---|---|---|---|---|---|",
        ]
        bare = {r["conns"]: r["rps"] for r in api_res["rows"] if r["server"] == "bare uvicorn+ort"}
        for r in api_res["rows"]:
            share = r["rps"] / bare[r["conns"]] if bare.get(r["conns"]) else float("nan")
            lines.append(
                f"| {r['server']} | {r['encoding']} | {r['conns']} | {r['rps']:,.0f} | "
                f"{share:.0%} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['non_2xx']} |"
            )
        eight = [r for r in api_res["rows"] if r["server"] == "edge-agent" and r["conns"] == 8]
        best = max(eight, key=lambda r: r["rps"])
        lines += [
            "",
            f"Target at 8 clients: >= {TARGETS['api_rps_8']:,.0f}/s with p99 <= "
            f"{TARGETS['api_p99_ms_8']} ms: best {best['encoding']} {best['rps']:,.0f}/s, "
            f"p99 {best['p99_ms']:.2f} ms -> "
            + (
                "ok"
                if best["rps"] >= TARGETS["api_rps_8"] and best["p99_ms"] <= TARGETS["api_p99_ms_8"]
                else "MISS"
            ),
        ]
    lines += [
        "",
        f"Daemon: start-to-ready {api_res.get('ready_s', float('nan')):.2f} s (target "
        f"<= {TARGETS['ready_s']} s), RSS {api_res.get('rss_mb_idle', float('nan')):.0f} MB "
        f"idle / {api_res.get('rss_mb_after_load', float('nan')):.0f} MB after the load "
        f"test (target <= {TARGETS['rss_mb']:.0f} MB)",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5, help="wrk duration per run")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle, root, x_eval = build_bundle(work)
        proc_rows = in_process(bundle, root, x_eval)
        api_res = api(bundle, root, x_eval, args.seconds, work)
    print(
        f"Run {datetime.now(UTC):%Y-%m-%d}: {os.cpu_count()} cores, python {sys.version.split()[0]}"
    )
    if args.json:
        args.json.write_text(json.dumps({"in_process": proc_rows, "api": api_res}, indent=2))
    print(
        markdown(proc_rows, api_res)
        if args.markdown
        else json.dumps({"in_process": proc_rows, "api": api_res}, indent=2)
    )


if __name__ == "__main__":
    main()
