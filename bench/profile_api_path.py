"""The local REST API's whole per-request path in-process, against the bare endpoint's, profiled.

Both ASGI apps are driven directly (no sockets, no uvicorn/httptools: those are the same for
both servers) with the batch-1 request of ``bench_agent.py``: edge-agent's app as the daemon
builds it (``build_agent`` over an installed digits bundle, ``create_app``, default config, so
validation, drift, metrics, routing and the ground-truth memory are on) and the bare endpoint
of ``bench/peers/bare_rest.py`` (decode, scale/offset, ``session.run``, encode). Printed: the
time per request of each (median of ``--rounds`` alternating rounds) and their ratio, for JSON
and binary bodies, then a cProfile of edge-agent's JSON path: the functions with the most own
time, and the cumulative time of the path's main stages.

Usage: .venv/bin/python bench/profile_api_path.py [--rounds 7] [--requests 3000] [--top 25]
       [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from bench_agent import BIN, INFER_PATH, PEERS, build_bundle, model_files, rest_bodies

sys.path.insert(0, str(PEERS))
from bare_rest import build_app

Driver = Callable[[], Coroutine[Any, Any, int]]


def driver(app: Any, body: bytes, headers: dict[str, str]) -> Driver:
    """One request through ``app``; returns the response status."""
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    raw.append((b"content-length", str(len(body)).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": INFER_PATH,
        "raw_path": INFER_PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": raw,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }
    message = {"type": "http.request", "body": body, "more_body": False}

    async def receive() -> dict[str, Any]:
        return message

    async def one() -> int:
        status = [0]

        async def send(event: dict[str, Any]) -> None:
            if event["type"] == "http.response.start":
                status[0] = event["status"]

        await app(dict(scope), receive, send)
        return status[0]

    return one


#: ``--clock``: wall time, or the CPU time of the whole process (every thread; a request
#: offloaded to a worker thread counts too), which waiting for a CPU another process holds does
#: not inflate: on a shared machine the steadier of the two.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


async def per_request_us(
    one: Driver, n: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    start = clock()
    for _ in range(n):
        await one()
    return (clock() - start) / n * 1e6


async def measure(
    agent_app: Any,
    bare_app: Any,
    bodies: dict,
    rounds: int,
    n: int,
    clock: Callable[[], float] = time.perf_counter,
) -> None:
    for encoding, (body, headers) in bodies.items():
        agent, bare = driver(agent_app, body, headers), driver(bare_app, body, headers)
        statuses = {await agent(), await bare()}
        if statuses != {200}:
            raise RuntimeError(f"{encoding}: statuses {statuses}")
        times: dict[str, list[float]] = {"agent": [], "bare": []}
        for r in range(rounds):
            order = [("agent", agent), ("bare", bare)]
            for name, one in order if r % 2 == 0 else order[::-1]:
                times[name].append(await per_request_us(one, n, clock))
        ratios = [a / b for a, b in zip(times["agent"], times["bare"], strict=True)]
        print(
            f"{encoding:6}: edge-agent {statistics.median(times['agent']):6.1f} us "
            f"({min(times['agent']):.1f}-{max(times['agent']):.1f}), bare "
            f"{statistics.median(times['bare']):6.1f} us "
            f"({min(times['bare']):.1f}-{max(times['bare']):.1f}), ratio "
            f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        )


STAGES = {  # label: (file the function is in, function)
    "whole request": ("api/endpoints.py", "infer_scope"),
    "decode": ("api/header_cache.py", "decode"),
    "service (Agent.infer)": ("serving/agent.py", "infer"),
    "  model pipeline (ModelPipeline.run)": ("serving/pipeline.py", "run"),
    "    validation": ("contract/validation.py", "validate"),
    "    preprocessing": ("serving/pipeline.py", "preprocess"),
    "    session.run": ("runtime/onnx.py", "run"),
    "    accounting + drift rows": ("serving/pipeline.py", "_account"),
    "  ground-truth memory (Agent._remember)": ("serving/agent.py", "_remember"),
    "encode": ("api/codec.py", "encode_response"),
    "metrics (observe_infer)": ("api/metrics.py", "observe_infer"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--requests", type=int, default=3000, help="requests per round")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    args = ap.parse_args()
    print(f"clock: {args.clock}")

    from edge_agent.api.app import create_app
    from edge_agent.api.metrics import ApiMetrics
    from edge_agent.config import load_config
    from edge_agent.daemon import build_agent

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle, root, x_eval = build_bundle(work)
        cfg = work / "agent.toml"
        cfg.write_text(
            "[api]\nrate_limit_per_second = 1000000.0\nrate_limit_burst = 1000000\n"
            f'[store]\nstate_dir = "{work / "state"}"\nroot_path = "{root}"\n'
            "[model_defaults]\nprobation_requests = 1\n"
        )
        subprocess.run(
            [str(BIN / "edge-agent"), "install", str(bundle), "--config", str(cfg)],
            check=True,
            capture_output=True,
        )
        config = load_config(cfg)
        agent = build_agent(config)
        try:
            agent_app = create_app(agent, config.api, ApiMetrics())
            model, pre = model_files(bundle, root, work)
            bare_app = build_app(str(model), json.loads(pre))
            bodies = rest_bodies(x_eval[:1])
            asyncio.run(
                measure(agent_app, bare_app, bodies, args.rounds, args.requests, CLOCKS[args.clock])
            )
            one = driver(agent_app, *bodies["json"])
            profile = cProfile.Profile()

            async def profiled() -> None:
                for _ in range(100):
                    await one()  # warm: the service runs inline after its first call
                profile.enable()
                for _ in range(args.requests):
                    await one()
                profile.disable()

            asyncio.run(profiled())
        finally:
            agent.close()
    stats = pstats.Stats(profile)
    n = args.requests
    print(f"\ncProfile of edge-agent's JSON path, {n} requests (profiler overhead included):")
    print("cumulative time per request of the main stages:")
    entries = stats.stats  # type: ignore[attr-defined]
    for label, (file, func) in STAGES.items():
        cum = sum(v[3] for k, v in entries.items() if k[2] == func and k[0].endswith(file))
        print(f"  {label:45} {cum / n * 1e6:7.1f} us")
    print(f"functions with the most own time (per request), top {args.top}:")
    rows = sorted(entries.items(), key=lambda kv: kv[1][2], reverse=True)[: args.top]
    for (file, line, func), (_, calls, tottime, cumtime, _) in rows:
        where = file.split("site-packages/")[-1].split("/src/")[-1]
        print(
            f"  {tottime / n * 1e6:6.2f} us own {cumtime / n * 1e6:7.2f} us cum "
            f"{calls / n:5.1f} calls  {where}:{line}:{func}"
        )


if __name__ == "__main__":
    main()
