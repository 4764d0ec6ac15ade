"""edge-agent against MLServer and KServe's ModelServer on the same ONNX file (issue 13).

Each peer is installed from the package index into its OWN virtualenv under a cache directory
(``~/.cache/edgefleet-bench/<peer>``, or ``$EDGEFLEET_BENCH_CACHE``; never the project's
environment) together with onnxruntime and numpy, and serves the bundle's model with a minimal
onnxruntime runtime that does what edge-agent does per request minus validation, drift and
metrics: decode, the bundle's scale/offset, ``session.run`` (one intra-op thread), encode.

- MLServer: ``bench/peers/mlserver_runtime.py``, a custom ``MLModel``, started with
  ``mlserver start`` (``parallel_workers = 0``: inference in the server process, as a single
  small model is served; ``debug = false``). REST and gRPC.
- KServe: ``bench/peers/kserve_server.py``, a ``kserve.Model`` subclass in KServe's Python
  ``ModelServer`` (one uvicorn worker; ``--configure_logging false``, so no access and trace
  log line per request as KServe's default writes). REST and gRPC.
- edge-agent: the real daemon (``edge-agent run``) with its REST API and ``[grpc]`` listener,
  configured as in ``bench/bench_agent.py``.

Every server's answer to the request is checked against the others' first. Then REST (JSON,
the one body every server takes, under wrk) and gRPC (``ModelInfer`` with
``raw_input_contents``, under h2load with gRPC framing) at 1, 8 and 64 connections, with the
servers rotating order round by round. Printed: medians and min-max per cell, edge-agent's
requests/s over each peer's in every round, start-to-ready time, RSS after the load, and the
installed versions.

Usage: .venv/bin/python bench/bench_peers.py [--seconds 5] [--rounds 3] [--conns 1,8,64]
       [--peers mlserver,kserve] [--reinstall]
Needs wrk and h2load (Debian: apt-get install wrk nghttp2-client) and the package index.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench_agent import (
    GRPC_INFER,
    INFER_PATH,
    MODEL,
    PEERS,
    Target,
    _spawn,
    alternate,
    build_bundle,
    free_port,
    grpc_answer,
    grpc_body,
    h2load_grpc,
    markdown_rounds,
    model_files,
    rest_answer,
    rest_bodies,
    rss_mb,
    same_answer,
    start_agent,
    summarize,
    wait_grpc_ready,
    wait_ready,
    wrk,
)

CACHE = Path(os.environ.get("EDGEFLEET_BENCH_CACHE", Path.home() / ".cache" / "edgefleet-bench"))
#: What each peer's virtualenv gets from the package index.
REQUIREMENTS = {
    "mlserver": ["mlserver", "onnxruntime", "numpy"],
    "kserve": ["kserve", "onnxruntime", "numpy"],
}
#: Distributions whose versions the report names.
REPORTED = (
    "mlserver",
    "kserve",
    "onnxruntime",
    "grpcio",
    "protobuf",
    "fastapi",
    "uvicorn",
    "uvloop",
)


class InstallError(RuntimeError):
    """A peer's virtualenv could not be created or its packages installed."""


def install(peer: str, reinstall: bool) -> tuple[Path, dict[str, str]]:
    """The peer's virtualenv (created and filled on first use); returns (its python, versions
    of ``REPORTED`` distributions in it).

    Raises:
        InstallError: with pip's (or venv's) own output, when a step fails.
    """
    env = CACHE / peer
    py = env / "bin" / "python"
    marker = env / "edgefleet-bench.json"
    wanted = REQUIREMENTS[peer]
    if reinstall and env.exists():
        shutil.rmtree(env)
    if not (marker.exists() and json.loads(marker.read_text()) == wanted):
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(env)],
            [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *wanted],
        ]
        for argv in steps:
            print(
                f"  {peer}: {' '.join(argv[-len(wanted) - 1 :] if 'pip' in argv else argv)}",
                file=sys.stderr,
                flush=True,
            )
            done = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
            if done.returncode != 0:
                tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
                raise InstallError(f"{' '.join(argv)} failed:\n" + "\n".join(tail))
        marker.write_text(json.dumps(wanted))
    listing = subprocess.run(
        [str(py), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    versions = {d["name"].lower(): d["version"] for d in json.loads(listing)}
    return py, {k: versions[k] for k in REPORTED if k in versions}


def start_mlserver(
    py: Path, model: Path, pre: str, work: Path
) -> tuple[subprocess.Popen, int, int]:
    """``mlserver start`` on a repository of one model; returns (process, HTTP, gRPC port)."""
    home = work / "mlserver"
    (home / MODEL).mkdir(parents=True)
    shutil.copy(PEERS / "mlserver_runtime.py", home / "mlserver_runtime.py")
    port, gport, mport = free_port(), free_port(), free_port()
    (home / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "http_port": port,
                "grpc_port": gport,
                "metrics_port": mport,
                "parallel_workers": 0,
                "debug": False,
            }
        )
    )
    (home / MODEL / "model-settings.json").write_text(
        json.dumps(
            {
                "name": MODEL,
                "implementation": "mlserver_runtime.OnnxRuntime",
                "parameters": {"uri": str(model), "extra": json.loads(pre)},
            }
        )
    )
    proc = _spawn(
        [str(py.parent / "mlserver"), "start", str(home)],
        lambda: wait_ready(f"http://127.0.0.1:{port}/v2/models/{MODEL}/ready", 120),
        work / "mlserver.log",
        env={"PYTHONPATH": str(home)},
    )
    return proc, port, gport


def start_kserve(py: Path, model: Path, pre: str, work: Path) -> tuple[subprocess.Popen, int, int]:
    """``bench/peers/kserve_server.py`` in KServe's virtualenv; returns (process, HTTP port,
    gRPC port)."""
    port, gport = free_port(), free_port()
    argv = [
        str(py),
        str(PEERS / "kserve_server.py"),
        "--model_name",
        MODEL,
        "--model_path",
        str(model),
        "--preprocessing",
        pre,
        "--http_port",
        str(port),
        "--grpc_port",
        str(gport),
        "--configure_logging",
        "false",
    ]
    url = f"http://127.0.0.1:{port}/v2/models/{MODEL}/ready"
    return _spawn(argv, lambda: wait_ready(url, 120), work / "kserve.log"), port, gport


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=int, default=5, help="duration of one load run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", default="1,8,64")
    ap.add_argument("--peers", default="mlserver,kserve")
    ap.add_argument("--reinstall", action="store_true", help="recreate the peers' virtualenvs")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    conns = [int(c) for c in args.conns.split(",")]
    missing = [tool for tool in ("wrk", "h2load") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"needs {' and '.join(missing)} (apt-get install wrk nghttp2-client)")
    installed: dict[str, tuple[Path, dict[str, str]]] = {}
    failed: dict[str, str] = {}
    for peer in args.peers.split(","):
        try:
            installed[peer] = install(peer, args.reinstall)
        except (InstallError, subprocess.SubprocessError, OSError) as exc:
            failed[peer] = str(exc)
    starters: dict[str, Callable[..., tuple[subprocess.Popen, int, int]]] = {
        "mlserver": start_mlserver,
        "kserve": start_kserve,
    }
    procs: dict[str, subprocess.Popen] = {}
    ready_s: dict[str, float] = {}
    result: dict = {"versions": {p: v for p, (_, v) in installed.items()}, "install_failed": failed}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle, root, x_eval = build_bundle(work)
        model, pre = model_files(bundle, root, work)
        x1 = x_eval[:1]
        body, headers = rest_bodies(x1)["json"]
        gbody = grpc_body(x1)
        try:
            agent, port, gport, ready_s["edge-agent"] = start_agent(bundle, root, work)
            procs["edge-agent"] = agent
            servers = {"edge-agent": (port, gport)}
            for peer, (py, _) in installed.items():
                start = time.monotonic()
                proc, p, g = starters[peer](py, model, pre, work)
                procs[peer] = proc
                ready_s[peer] = time.monotonic() - start
                wait_grpc_ready(f"127.0.0.1:{g}", 60)
                servers[peer] = (p, g)
            expected = rest_answer(f"http://127.0.0.1:{port}{INFER_PATH}", body, headers)
            targets = []
            for name, (p, g) in servers.items():
                url = f"http://127.0.0.1:{p}{INFER_PATH}"
                same_answer(f"{name} REST", rest_answer(url, body, headers), expected)
                targets.append(
                    Target(name, "REST json", lambda c, s, u=url: wrk(u, body, headers, c, s, work))
                )
                got, answer_bytes = grpc_answer(f"127.0.0.1:{g}", gbody)
                same_answer(f"{name} gRPC", got, expected)
                targets.append(
                    Target(
                        name,
                        "gRPC",
                        lambda c, s, u=f"http://127.0.0.1:{g}{GRPC_INFER}", n=answer_bytes: (
                            h2load_grpc(u, gbody, n, c, s, work)
                        ),
                    )
                )
            result["rows"] = alternate(targets, conns, args.rounds, args.seconds)
            result["rss_mb"] = {name: rss_mb(p.pid) for name, p in procs.items()}
            result["ready_s"] = ready_s
        finally:
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(markdown(result, args))


def markdown(result: dict, args: argparse.Namespace) -> str:
    lines = [
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {os.cpu_count()} cores, python "
        f"{sys.version.split()[0]}, {args.rounds} rounds of {args.seconds} s per run",
        "",
    ]
    for peer, versions in result["versions"].items():
        lines.append(f"- {peer}: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    for peer, why in result["install_failed"].items():
        lines.append(f"- {peer}: NOT INSTALLED: {why}")
    if "rows" not in result:
        return "\n".join(lines)

    def target(s: dict) -> str:
        ratio = float(np.median(s["ratios"]))
        ok = ratio >= 2.0 and s["p99_ratio"] < 1.0
        return f">= 2x, lower p99: {'ok' if ok else 'MISS'}"

    lines += ["", *markdown_rounds(summarize(result["rows"], "edge-agent"), "edge-agent", target)]
    lines += [
        "",
        "| server | start-to-ready | RSS after the load |",
        "|---|---:|---:|",
        *(
            f"| {name} | {result['ready_s'][name]:.2f} s | {mb:.0f} MB |"
            for name, mb in result["rss_mb"].items()
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
