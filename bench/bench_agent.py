"""edge-agent benchmarks, each against its raw baseline in the same run.

1. In-process overhead of the agent's pipeline (validation + preprocessing + drift sketching +
   counters) over bare ``onnxruntime.InferenceSession.run`` on the same quantized digits MLP,
   at batch 1 and 64, with drift sketched inline (worst case) and on the background worker.
2. The local Open Inference Protocol API of the real daemon process at 1, 8 and 64
   connections, like for like against bare servers doing only decode, scale/offset,
   ``session.run`` and encode on the same model file (``bench/peers/bare_rest.py``,
   ``bench/peers/bare_grpc.py``): REST JSON against bare JSON and REST binary (the binary tensor
   extension) against bare binary, both under wrk; gRPC (the daemon's ``[grpc]`` listener)
   against a bare grpcio + onnxruntime servicer of the same protobuf service, under h2load with
   gRPC framing. Every server is checked to give the same answer first. The servers alternate
   round by round (order swapped each round); printed are medians and min-max per cell and the
   edge-agent/bare ratio of each round.
3. The daemon's RSS with one model loaded (and the bare servers'), and its start-to-ready time.

TFLite float vs static int8 through the agent's runtime adapter and the bare interpreter is
measured by ``bench/bench_tflite.py`` (table in docs/tflite.md).

Usage: .venv/bin/python bench/bench_agent.py [--seconds 5] [--rounds 3] [--conns 1,8,64]
       [--skip-in-process | --in-process-only] [--in-process-rounds 7] [--clock wall|cpu]
       [--markdown]
Needs wrk and h2load (Debian: apt-get install wrk nghttp2-client) for part 2; part 1 runs
without them. MLServer and KServe are measured by ``bench/bench_peers.py``.
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
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

#: Issue 13, like for like against the bare servers: (min req/s, max p50, max p99) ratios.
API_TARGETS = {"REST": (0.95, 1.1, 1.3), "gRPC": (0.90, float("inf"), float("inf"))}

TARGETS = {
    # Issue 13: the in-process pipeline at most this many times a bare ``session.run``.
    "b1_ratio": 1.5,
    "b64_ratio": 1.3,
    "rss_mb": 150.0,
    "ready_s": 2.0,
}


def build_bundle(
    work: Path, example: str = "digits_mlp", name: str = "digits", **kw: int
) -> tuple[Path, Path, np.ndarray]:
    """Train, quantize and sign ``model_builder.examples.<example>(**kw)`` (default: the digits
    MLP) as model ``name`` version 1 with a new key store in ``work``; returns (bundle, root,
    eval inputs)."""
    from model_builder import examples
    from model_builder.build import build_bundle as build
    from model_builder.config import BuildConfig
    from model_builder.data import Dataset
    from model_builder.keystore import KeyStore

    ex = getattr(examples, example)(**kw)
    now = datetime.now(UTC)
    keys = KeyStore.init(work / "keys", now=now)
    res = build(
        ex.model_bytes,
        "onnx",
        Dataset({"input": ex.x_calib}, None),
        Dataset({"input": ex.x_eval}, ex.y_eval),
        (ex.input_contract(max_batch=64), ex.output_contract()),
        BuildConfig(name=name, version=1, measure_latency=False, arch=("any",)),
        keys,
        now=now,
    )
    bundle = work / f"{name}-1.efb"
    bundle.write_bytes(res.bundle)
    root = work / "root.json"
    root.write_bytes(keys.root_bytes())
    return bundle, root, ex.x_eval.astype(np.float32)


#: ``--clock`` of the in-process part: wall time, or the process's CPU time (every thread:
#: the drift worker's sketching counts too), which waiting for a CPU another process holds
#: does not inflate: the steadier of the two on a shared machine.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn, n: int, clock: Callable[[], float] = time.perf_counter) -> float:  # type: ignore[no-untyped-def]
    t = clock()
    for _ in range(n):
        fn()
    return (clock() - t) / n


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (``/proc/loadavg``), printed beside the figures."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def in_process(
    bundle: Path,
    root: Path,
    x_eval: np.ndarray,
    rounds: int = 7,
    clock: Callable[[], float] = time.perf_counter,
) -> list[dict]:
    import onnxruntime as ort

    from edge_agent.bundle import read_bundle
    from edge_agent.config import DriftConfig, ModelPolicy
    from edge_agent.runtime.base import RuntimeOptions
    from edge_agent.runtime.loader import load_runtime
    from edge_agent.serving.pipeline import BLOCK, DriftWorker, ModelPipeline
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
        variants: list[tuple[str, Callable[[], object]]] = [
            ("bare", lambda px=px: sess.run(None, {"input": px})),
            *((name, lambda p=p, x=x: p.run({"input": x})) for name, p in pipes.items()),
        ]
        # Rows the drift budget let through to sketching (the rest are sampled out): the
        # budget is rows per wall second, so a slower (busier) run sketches a larger share.
        before = {name: (p.rows, p.sketch_sampled_out, worker.dropped) for name, p in pipes.items()}
        for r in range(rounds):  # alternate, so background noise hits every variant alike
            for name, fn in variants if r % 2 == 0 else variants[::-1]:
                samples[name].append(timed(fn, n, clock))
                worker.drain()
        sketched = {}
        for name, p in pipes.items():
            rows0, sampled0, dropped0 = before[name]
            tensors = len(p.manifest.baseline.inputs) + len(p.manifest.baseline.outputs)
            buffered = (p.rows - rows0) * tensors
            lost = p.sketch_sampled_out - sampled0
            if name == "worker":
                lost += (worker.dropped - dropped0) * BLOCK
            sketched[name] = 1 - lost / buffered if buffered else 0.0
        bare = statistics.median(samples["bare"])
        for name in ("inline", "worker"):
            # The ratio of each round (bare and pipeline measured seconds apart), then medians.
            ratios = [t / b for t, b in zip(samples[name], samples["bare"], strict=True)]
            t = statistics.median(samples[name])
            rows.append(
                {
                    "batch": batch,
                    "drift": name,
                    "bare_us": bare * 1e6,
                    "pipeline_us": t * 1e6,
                    "overhead_us": (t - bare) * 1e6,
                    "overhead_us_per_row": (t - bare) * 1e6 / batch,
                    "ratio": statistics.median(ratios),
                    "ratio_min": min(ratios),
                    "ratio_max": max(ratios),
                    "sketched": sketched[name],
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


PEERS = ROOT / "bench" / "peers"
MODEL = "digits"
INFER_PATH = f"/v2/models/{MODEL}/infer"
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"


def model_files(bundle: Path, root: Path, work: Path) -> tuple[Path, str]:
    """The bundle's ONNX artifact as ``work/model.onnx`` and its input's scale/offset as JSON
    (what a bare or peer server needs to do the same preprocessing as the agent)."""
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
    return model, json.dumps({"scale": list(pre.scale), "offset": list(pre.offset)})


def _spawn(
    argv: list[str], ready: Callable[[], object], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start ``argv`` (output to ``log``, ``env`` added to the environment) and wait until
    ``ready()`` returns; terminate it and raise ``RuntimeError`` (with the log's tail) if it
    never does."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    try:
        ready()
    except (RuntimeError, OSError) as exc:
        proc.terminate()
        proc.wait(timeout=30)
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{argv[:2]} did not start: {exc}\n{tail}") from exc
    return proc


def start_bare_server(bundle: Path, root: Path, work: Path) -> tuple[subprocess.Popen, int]:
    """Start ``bench/peers/bare_rest.py`` on the bundle's model and preprocessing; returns
    (process, port) once it answers ready (the caller terminates it)."""
    model, pre = model_files(bundle, root, work)
    port = free_port()
    argv = [sys.executable, str(PEERS / "bare_rest.py"), str(model), str(port), pre, MODEL]
    url = f"http://127.0.0.1:{port}/v2/health/ready"
    return _spawn(argv, lambda: wait_ready(url), work / "bare-rest.log"), port


def start_bare_grpc(bundle: Path, root: Path, work: Path) -> tuple[subprocess.Popen, int]:
    """Start ``bench/peers/bare_grpc.py`` (8 worker threads, like the agent's default); returns
    (process, port) once ``ServerReady`` answers."""
    model, pre = model_files(bundle, root, work)
    port = free_port()
    argv = [sys.executable, str(PEERS / "bare_grpc.py"), str(model), str(port), pre]
    target = f"127.0.0.1:{port}"
    return _spawn(argv, lambda: wait_grpc_ready(target), work / "bare-grpc.log"), port


def wait_grpc_ready(target: str, timeout: float = 60) -> float:
    """Seconds until ``ServerReady`` on ``target`` answers ready."""
    import grpc

    from edge_agent.api.grpc_v2.messages import METHODS

    start = time.monotonic()
    req_cls, resp_cls = METHODS["ServerReady"]
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ServerReady",
            request_serializer=req_cls.SerializeToString,
            response_deserializer=resp_cls.FromString,
        )
        while time.monotonic() - start < timeout:
            try:
                if call(req_cls(), timeout=1).ready:
                    return time.monotonic() - start
            except grpc.RpcError:
                time.sleep(0.05)
    raise RuntimeError(f"gRPC {target} never became ready")


# --- request bodies and one checked call per server -----------------------------------------


def rest_bodies(x1: np.ndarray) -> dict[str, tuple[bytes, dict[str, str]]]:
    """The batch-1 request in JSON and in the binary tensor extension, with their headers."""
    shape = list(x1.shape)
    json_body = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": shape, "datatype": "FP32", "data": x1.ravel().tolist()}
            ]
        }
    ).encode()
    raw = x1.astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": shape,
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return {
        "json": (json_body, {"Content-Type": "application/json"}),
        "binary": (
            header + raw,
            {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(header)),
            },
        ),
    }


def grpc_body(x1: np.ndarray, *, typed: bool = False) -> bytes:
    """A serialized ``ModelInferRequest`` for ``x1``: ``raw_input_contents`` (what tritonclient
    sends) or, with ``typed``, ``fp32_contents``."""
    from edge_agent.api.grpc_v2.messages import METHODS

    request = METHODS["ModelInfer"][0](model_name=MODEL)
    t = request.inputs.add()
    t.name, t.datatype = "input", "FP32"
    t.shape.extend(x1.shape)
    if typed:
        t.contents.fp32_contents.extend(x1.ravel().tolist())
    else:
        request.raw_input_contents.append(x1.astype("<f4").tobytes())
    return bytes(request.SerializeToString())


def rest_answer(url: str, body: bytes, headers: dict[str, str]) -> np.ndarray:
    """POST one request and return its first output (JSON or binary answer).

    Raises ``RuntimeError`` on a non-200 answer (urllib's ``HTTPError`` is an ``OSError``)."""
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        data = r.read()
        n = r.headers.get("Inference-Header-Content-Length")
    if n is None:
        out = json.loads(data)["outputs"][0]
        return np.asarray(out["data"], np.float32).reshape(out["shape"])
    out = json.loads(data[: int(n)])["outputs"][0]
    return np.frombuffer(data, "<f4", offset=int(n)).reshape(out["shape"])


def grpc_answer(target: str, body: bytes) -> tuple[np.ndarray, int]:
    """Send the serialized ``ModelInferRequest`` ``body``; returns (first output, size of the
    answer's gRPC DATA payload: 5 framing bytes + the message)."""
    import grpc

    from edge_agent.api.grpc_v2.messages import METHODS

    with grpc.insecure_channel(target) as channel:
        raw = channel.unary_unary(GRPC_INFER)(body, timeout=10)
    response = METHODS["ModelInfer"][1].FromString(raw)
    out = response.outputs[0]
    if response.raw_output_contents:
        y = np.frombuffer(response.raw_output_contents[0], "<f4")
    else:
        y = np.asarray(out.contents.fp32_contents, np.float32)
    return y.reshape(tuple(out.shape)), 5 + len(raw)


def same_answer(what: str, got: np.ndarray, expected: np.ndarray) -> None:
    if got.shape != expected.shape or not np.allclose(got, expected, atol=1e-4):
        raise RuntimeError(f"{what} answered {got!r}, expected {expected!r}")


# --- load generators ----------------------------------------------------------------------


def _ms(text: str, label: str) -> float:
    m = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", text)
    if not m:
        return float("nan")
    v = float(m.group(1))
    return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v


def wrk(
    url: str, body: bytes, headers: dict[str, str], conns: int, seconds: int, work: Path
) -> dict:
    """``wrk`` POSTing ``body`` over ``conns`` keep-alive connections (one request in flight on
    each) for ``seconds``; requests/s, p50/p99 in ms, and errors (non-2xx answers plus socket
    errors)."""
    script = work / f"req-{conns}-{len(body)}.lua"
    body_file = work / f"body-{len(body)}.bin"
    body_file.write_bytes(body)
    hdr = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    script.write_text(
        f'local f = io.open("{body_file}", "rb")\nwrk.body = f:read("*all")\n'
        f'f:close()\nwrk.method = "POST"\n{hdr}\n'
    )
    argv = ["wrk", "-t", str(min(conns, 2)), "-c", str(conns), "-d", f"{seconds}s"]
    out = subprocess.run(
        [*argv, "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": _ms(out, "50%"),
        "p99_ms": _ms(out, "99%"),
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "errors": (int(non_2xx.group(1)) if non_2xx else 0)
        + (sum(int(g) for g in sock.groups()) if sock else 0),
    }


def h2load_grpc(
    url: str, body: bytes, answer_bytes: int, conns: int, seconds: int, work: Path
) -> dict:
    """``h2load`` sending the gRPC unary call ``body`` (a serialized request) to ``url`` over
    ``conns`` HTTP/2 connections, one stream in flight on each, for ``seconds``.

    h2load speaks plain HTTP/2: the body file is the length-prefixed gRPC message and the
    headers are gRPC's (``content-type: application/grpc``, ``te: trailers``). A gRPC error
    still answers HTTP 200 (its status is in the trailers), so errors are counted from the
    DATA bytes received: every successful answer carries exactly ``answer_bytes`` (measured on
    one checked call), an error none. Latency percentiles come from h2load's per-request log.
    """
    body_file = work / f"grpc-body-{len(body)}.bin"
    body_file.write_bytes(b"\x00" + len(body).to_bytes(4, "big") + body)
    log = work / f"h2load-{conns}.log"
    log.unlink(missing_ok=True)
    argv = [
        "h2load",
        "-t",
        str(min(conns, 2)),
        "-c",
        str(conns),
        "-m",
        "1",
        "-D",
        str(seconds),
        "-d",
        str(body_file),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        f"--log-file={log}",
        url,
    ]
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + 30, check=True
    ).stdout
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    data = re.search(r"\((\d+)\) data", out)
    if done is None or data is None:
        raise RuntimeError(f"cannot read h2load's output:\n{out}")
    finished, succeeded = int(done.group(1)), int(done.group(2))
    answered = round(int(data.group(1)) / answer_bytes)
    lat = np.array(
        [float(line.split("\t")[2]) for line in log.read_text().splitlines() if line.strip()]
    )
    return {
        "rps": succeeded / seconds,
        "p50_ms": float(np.percentile(lat, 50)) / 1000 if lat.size else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) / 1000 if lat.size else float("nan"),
        "non_2xx": finished - succeeded,
        "errors": max(finished - succeeded, 0) + max(succeeded - answered, 0),
    }


# --- alternating rounds -------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One server speaking one protocol: ``run(conns, seconds)`` loads it once."""

    server: str
    protocol: str
    run: Callable[[int, int], dict]


def alternate(
    targets: list[Target], conns: list[int], rounds: int, seconds: int, warmup: int = 1
) -> list[dict]:
    """Load every target at every connection count, ``rounds`` times. Within a round, the
    servers of one protocol and connection count run back to back, in an order rotated every
    round (two servers: swapped), so slow drifts of a shared machine hit them alike; a round's
    ratio compares runs seconds apart. Each target is warmed up first (not recorded)."""
    for t in targets:
        t.run(8, warmup)
    protocols = list(dict.fromkeys(t.protocol for t in targets))
    rows = []
    for r in range(rounds):
        for protocol in protocols:
            group = [t for t in targets if t.protocol == protocol]
            k = r % len(group)
            for c in conns:
                for t in group[k:] + group[:k]:
                    res = t.run(c, seconds)
                    rows.append(
                        {"round": r, "server": t.server, "protocol": protocol, "conns": c, **res}
                    )
                    print(
                        f"  round {r + 1} {protocol:11} {c:3} conns {t.server:16} "
                        f"{res['rps']:9,.0f}/s p50 {res['p50_ms']:6.2f} ms "
                        f"p99 {res['p99_ms']:6.2f} ms errors {res['errors']}",
                        file=sys.stderr,
                        flush=True,
                    )
    return rows


def summarize(rows: list[dict], reference: str) -> list[dict]:
    """Per protocol, connection count and server: medians and min-max over the rounds, and,
    for every server but ``reference``, ``reference``'s requests/s over its own in each round
    (with the medians of the per-round p50 and p99 ratios)."""
    cells: dict[tuple[str, int, str], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["protocol"], r["conns"], r["server"]), []).append(r)
    out = []
    for (protocol, conns, server), mine in cells.items():
        ref = {r["round"]: r for r in cells.get((protocol, conns, reference), [])}
        paired = (
            [] if server == reference else [(ref[m["round"]], m) for m in mine if m["round"] in ref]
        )
        rps = [m["rps"] for m in mine]
        p99 = [m["p99_ms"] for m in mine]
        nan = float("nan")
        out.append(
            {
                "protocol": protocol,
                "conns": conns,
                "server": server,
                "rps": statistics.median(rps),
                "rps_min": min(rps),
                "rps_max": max(rps),
                "p50_ms": statistics.median(m["p50_ms"] for m in mine),
                "p99_ms": statistics.median(p99),
                "p99_min": min(p99),
                "p99_max": max(p99),
                "errors": sum(m["errors"] for m in mine),
                "ratios": [a["rps"] / b["rps"] for a, b in paired],
                "p50_ratio": statistics.median(a["p50_ms"] / b["p50_ms"] for a, b in paired)
                if paired
                else nan,
                "p99_ratio": statistics.median(a["p99_ms"] / b["p99_ms"] for a, b in paired)
                if paired
                else nan,
            }
        )
    return out


def markdown_rounds(
    summary: list[dict],
    reference: str,
    target: Callable[[dict], str] = lambda s: "",
) -> list[str]:
    """The per-server table and the per-round ratio table of ``summarize``'s rows, with
    ``target(summary row)`` as the last column of the ratio table."""
    lines = [
        "| protocol | conns | server | req/s median (min-max) | p50 median | "
        "p99 median (min-max) | errors |",
        "|---|---:|---|---|---:|---|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s['protocol']} | {s['conns']} | {s['server']} | {s['rps']:,.0f} "
            f"({s['rps_min']:,.0f}-{s['rps_max']:,.0f}) | {s['p50_ms']:.2f} ms | "
            f"{s['p99_ms']:.2f} ms ({s['p99_min']:.2f}-{s['p99_max']:.2f}) | {s['errors']} |"
        )
    lines += [
        "",
        f"| protocol | conns | {reference} over | req/s ratio per round | median | "
        "p50 ratio | p99 ratio | target |",
        "|---|---:|---|---|---:|---:|---:|---|",
    ]
    for s in summary:
        if not s["ratios"]:
            continue
        per_round = " ".join(f"{x:.2f}" for x in s["ratios"])
        lines.append(
            f"| {s['protocol']} | {s['conns']} | {s['server']} | {per_round} | "
            f"{statistics.median(s['ratios']):.2f}x | {s['p50_ratio']:.2f}x | "
            f"{s['p99_ratio']:.2f}x | {target(s)} |"
        )
    return lines


# --- part 2 and 3: the daemon against the bare floor ---------------------------------------


def start_agent(bundle: Path, root: Path, work: Path) -> tuple[subprocess.Popen, int, int, float]:
    """Install ``bundle`` and start the daemon with its REST API and its gRPC listener (up to
    128 calls admitted at once, so 64 connections are never refused); returns (process, HTTP
    port, gRPC port, start-to-ready seconds)."""
    port, gport = free_port(), free_port()
    home = work / "agent"
    home.mkdir(exist_ok=True)
    cfg = home / "agent.toml"
    cfg.write_text(
        f"[api]\nport = {port}\nrate_limit_per_second = 1000000.0\n"
        f"rate_limit_burst = 1000000\n[grpc]\nenabled = true\nport = {gport}\n"
        f"max_concurrent_rpcs = 128\n"
        f'[store]\nstate_dir = "{home / "state"}"\n'
        f'root_path = "{root}"\n[model_defaults]\nprobation_requests = 1\n'
    )
    subprocess.run(
        [str(BIN / "edge-agent"), "install", str(bundle), "--config", str(cfg)],
        check=True,
        capture_output=True,
    )
    start = time.monotonic()
    proc = _spawn(
        [str(BIN / "edge-agent"), "run", "--config", str(cfg)],
        lambda: wait_ready(f"http://127.0.0.1:{port}/v2/health/ready"),
        home / "agent.log",
    )
    ready_s = time.monotonic() - start
    wait_grpc_ready(f"127.0.0.1:{gport}")
    return proc, port, gport, ready_s


def api(
    bundle: Path,
    root: Path,
    x_eval: np.ndarray,
    seconds: int,
    rounds: int,
    conns: list[int],
    work: Path,
) -> dict:
    """Part 2 and 3: edge-agent's REST (JSON and binary) and gRPC against the bare servers,
    alternating round by round; the daemon's start-to-ready time and RSS."""
    missing = [tool for tool in ("wrk", "h2load") if shutil.which(tool) is None]
    if missing:
        return {"missing": missing}
    x1 = x_eval[:1]
    rest = rest_bodies(x1)
    gbody = grpc_body(x1)
    procs: list[subprocess.Popen] = []
    result: dict = {}
    try:
        agent, port, gport, result["ready_s"] = start_agent(bundle, root, work)
        procs.append(agent)
        time.sleep(1.0)  # let start-up work settle before the idle reading
        result["rss_mb_idle"] = rss_mb(agent.pid)
        bare, bport = start_bare_server(bundle, root, work)
        procs.append(bare)
        bare_g, bgport = start_bare_grpc(bundle, root, work)
        procs.append(bare_g)
        servers = {
            "edge-agent": (f"http://127.0.0.1:{port}", f"127.0.0.1:{gport}"),
            "bare": (f"http://127.0.0.1:{bport}", f"127.0.0.1:{bgport}"),
        }
        expected = rest_answer(servers["bare"][0] + INFER_PATH, *rest["json"])
        targets = []
        for name, (http, grpc_target) in servers.items():
            for encoding, (body, headers) in rest.items():
                same_answer(
                    f"{name} REST {encoding}",
                    rest_answer(http + INFER_PATH, body, headers),
                    expected,
                )
                targets.append(
                    Target(
                        name,
                        f"REST {encoding}",
                        lambda c, s, u=http + INFER_PATH, b=body, h=headers: wrk(
                            u, b, h, c, s, work
                        ),
                    )
                )
            got, answer_bytes = grpc_answer(grpc_target, gbody)
            same_answer(f"{name} gRPC", got, expected)
            targets.append(
                Target(
                    name,
                    "gRPC",
                    lambda c, s, u=f"http://{grpc_target}{GRPC_INFER}", n=answer_bytes: h2load_grpc(
                        u, gbody, n, c, s, work
                    ),
                )
            )
        result["rows"] = alternate(targets, conns, rounds, seconds)
        result["rss_mb_after_load"] = rss_mb(agent.pid)
        result["rss_mb_bare_rest"] = rss_mb(bare.pid)
        result["rss_mb_bare_grpc"] = rss_mb(bare_g.pid)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    return result


def against_bare(s: dict) -> str:
    """Issue 13's like-for-like target for a ratio row of ``summarize`` (medians of rounds)."""
    rps, p50, p99 = API_TARGETS[s["protocol"].split()[0]]
    ratio = statistics.median(s["ratios"])
    want = f">= {rps:.0%}" + (f", p50 <= {p50}x, p99 <= {p99}x" if p50 != float("inf") else "")
    ok = ratio >= rps and s["p50_ratio"] <= p50 and s["p99_ratio"] <= p99
    return f"{want}: {'ok' if ok else 'MISS'}"


def markdown(proc_rows: list[dict], api_res: dict) -> str:
    lines = (
        []
        if not proc_rows
        else [
            "In-process (digits MLP, int8, 1 thread; medians of alternating rounds, the "
            "ratio per round):",
            "",
            "| batch | drift sketching | rows sketched | bare ort.run | pipeline | "
            "pipeline/bare (min-max) | overhead/request | overhead/row | target |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    )
    for r in proc_rows:
        if "batch" not in r:
            continue
        limit = TARGETS["b1_ratio"] if r["batch"] == 1 else TARGETS["b64_ratio"]
        target = f"<= {limit}x: " + ("ok" if r["ratio"] <= limit else "MISS")
        lines.append(
            f"| {r['batch']} | {r['drift']} | {r['sketched']:.0%} | {r['bare_us']:.1f} us | "
            f"{r['pipeline_us']:.1f} us | {r['ratio']:.2f}x ({r['ratio_min']:.2f}-"
            f"{r['ratio_max']:.2f}) | {r['overhead_us']:.1f} us | "
            f"{r['overhead_us_per_row']:.2f} us | {target} |"
        )
    dropped = next((r for r in proc_rows if "drift_blocks_dropped_by_worker" in r), None)
    if dropped is not None:
        lines += [
            "",
            f"Drift blocks the background worker dropped (sampled out): "
            f"{dropped['drift_blocks_dropped_by_worker']}",
            "",
        ]
    if not api_res:
        return "\n".join(lines)
    if "missing" in api_res:
        lines.append(f"Local API: not measured, {', '.join(api_res['missing'])} not installed")
    elif "rows" in api_res:
        lines += [
            "Local API, batch-1 requests on loopback: edge-agent against the bare servers "
            "(REST: uvicorn + Starlette + onnxruntime, JSON and binary; gRPC: a grpcio + "
            "onnxruntime servicer), alternating rounds; REST under wrk, gRPC under h2load:",
            "",
            *markdown_rounds(summarize(api_res["rows"], "edge-agent"), "edge-agent", against_bare),
        ]
    lines += [
        "",
        f"Daemon: start-to-ready {api_res.get('ready_s', float('nan')):.2f} s (target "
        f"<= {TARGETS['ready_s']} s), RSS {api_res.get('rss_mb_idle', float('nan')):.0f} MB "
        f"idle / {api_res.get('rss_mb_after_load', float('nan')):.0f} MB after the load "
        f"test (target <= {TARGETS['rss_mb']:.0f} MB); bare REST server "
        f"{api_res.get('rss_mb_bare_rest', float('nan')):.0f} MB, bare gRPC servicer "
        f"{api_res.get('rss_mb_bare_grpc', float('nan')):.0f} MB after the load test",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=5, help="duration of one load run")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the API part")
    ap.add_argument("--conns", default="1,8,64", help="connection counts of the API part")
    ap.add_argument("--skip-in-process", action="store_true", help="only parts 2 and 3")
    ap.add_argument("--in-process-only", action="store_true", help="only part 1")
    ap.add_argument("--in-process-rounds", type=int, default=7)
    ap.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="clock of the in-process part"
    )
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    conns = [int(c) for c in args.conns.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle, root, x_eval = build_bundle(work)
        load_before = load_average()
        proc_rows = (
            []
            if args.skip_in_process
            else in_process(bundle, root, x_eval, args.in_process_rounds, CLOCKS[args.clock])
        )
        api_res = (
            {}
            if args.in_process_only
            else api(bundle, root, x_eval, args.seconds, args.rounds, conns, work)
        )
    print(
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {os.cpu_count()} cores, python "
        f"{sys.version.split()[0]}, in-process clock {args.clock}"
        + ("" if args.in_process_only else f", {args.rounds} rounds of {args.seconds:g} s per run")
        + f"; load average {load_before} before, {load_average()} after"
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
