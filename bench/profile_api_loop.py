"""Where the local REST API's event loop stalls under load: a profile of the real daemon.

Starts ``edge-agent run`` (the digits bundle, as ``bench_agent.py`` builds it) in a child
process that carries a watchdog: a 1 ms heartbeat on the HTTP API's event loop, and a thread
that, while the heartbeat is late by more than ``--stall-ms``, samples the loop thread's stack
(``sys._current_frames``). It also records every inference the API hands to its worker pool
(``V2Endpoints._offload``). wrk loads it (``--encoding``, ``--conns``) for ``--seconds``; then
printed are requests/s and latency, the loop stalls (how many, median, p99, max, and when the
long ones happened), the offloads (how many, and when), and the loop thread's most frequent
stacks during stalls longer than ``--long-ms``.

A stall here is any loop iteration longer than ``--stall-ms``: with N connections one iteration
serves up to N requests inline, so iterations of N x (a request's cost) are expected; what to
look for is stalls well above that, and what the loop was doing then. The watchdog needs the GIL
to sample, so it catches the loop thread where that releases it (inside ``session.run``) or at a
GIL switch: the stacks say where the loop is, they are not a CPU profile.

Usage: .venv/bin/python bench/profile_api_loop.py [--seconds 10] [--conns 64]
       [--encoding json|binary] [--stall-ms 5] [--long-ms 35]
Needs wrk (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

CHILD = "--daemon-child"


def child(out: str, stall_ms: float, long_ms: float, argv: list[str]) -> int:
    """The daemon with the watchdog (runs in the child process)."""
    import asyncio
    import collections
    import threading
    import time
    import traceback
    from typing import Any

    import uvicorn

    import edge_agent.api.endpoints as endpoints
    from edge_agent.cli.main import main

    beat = [time.perf_counter()]
    stacks: collections.Counter[str] = collections.Counter()
    stalls: list[tuple[float, float]] = []
    offloads: list[float] = []
    t0 = time.perf_counter()

    def fmt(frame: Any) -> str:
        out = []
        for fr, lineno in traceback.walk_stack(frame):
            name = fr.f_code.co_filename.split("site-packages/")[-1].split("/src/")[-1]
            out.append(f"{name}:{lineno}:{fr.f_code.co_name}")
            if len(out) >= 12:
                break
        return " <- ".join(out)

    def dump() -> None:
        Path(out).write_text(
            json.dumps({"stalls": stalls, "offloads": offloads, "stacks": stacks.most_common(8)})
        )

    def watch(loop_thread: int) -> None:
        start: float | None = None
        last = time.perf_counter()
        while True:
            time.sleep(0.001)
            now = time.perf_counter()
            lag = now - beat[0]
            if lag > stall_ms / 1000:
                start = beat[0] if start is None else start
                frame = sys._current_frames().get(loop_thread)
                if lag > long_ms / 1000 and frame is not None:
                    stacks[fmt(frame)] += 1
            elif start is not None:
                stalls.append((start - t0, now - start))
                start = None
            if now - last > 1:
                last = now
                dump()

    startup = uvicorn.Server.startup

    async def watched_startup(self: uvicorn.Server, sockets: Any = None) -> None:
        await startup(self, sockets)
        loop = asyncio.get_running_loop()

        def heartbeat() -> None:
            beat[0] = time.perf_counter()
            loop.call_later(0.001, heartbeat)

        heartbeat()
        threading.Thread(
            target=watch, args=(threading.get_ident(),), name="loop-watchdog", daemon=True
        ).start()

    offload = endpoints.V2Endpoints._offload

    async def counted_offload(self: Any, func: Any, *args: Any) -> Any:
        offloads.append(time.perf_counter() - t0)
        return await offload(self, func, *args)

    uvicorn.Server.startup = watched_startup  # type: ignore[method-assign]
    endpoints.V2Endpoints._offload = counted_offload  # type: ignore[method-assign]
    sys.argv = ["edge-agent", *argv]
    try:
        return int(main() or 0)
    finally:
        dump()


def parent(args: argparse.Namespace) -> None:
    import subprocess

    import numpy as np

    from bench_agent import BIN, INFER_PATH, build_bundle, free_port, rest_bodies, wait_ready, wrk

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle, root, x_eval = build_bundle(work)
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
        out = work / "loop.json"
        argv = [sys.executable, __file__, CHILD, str(out), str(args.stall_ms), str(args.long_ms)]
        with (work / "agent.log").open("wb") as log:
            proc = subprocess.Popen(
                [*argv, "run", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_ready(f"http://127.0.0.1:{port}/v2/health/ready")
            body, headers = rest_bodies(x_eval[:1])[args.encoding]
            res = wrk(
                f"http://127.0.0.1:{port}{INFER_PATH}",
                body,
                headers,
                args.conns,
                args.seconds,
                work,
            )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        data = json.loads(out.read_text())
    stalls = np.array([d for _, d in data["stalls"]]) * 1000
    long = [(round(t, 2), round(d * 1000)) for t, d in data["stalls"] if d * 1000 > args.long_ms]
    offloads = data["offloads"]
    print(
        f"{args.encoding}, {args.conns} connections, {args.seconds} s: {res['rps']:,.0f} req/s, "
        f"p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms, errors {res['errors']}"
    )
    if stalls.size:
        p50, p99 = np.percentile(stalls, [50, 99])
        print(
            f"loop stalls > {args.stall_ms:g} ms: {stalls.size}, median {p50:.1f} ms, "
            f"p99 {p99:.1f} ms, max {stalls.max():.1f} ms"
        )
    print(f"stalls > {args.long_ms:g} ms (s since start, ms): {len(long)} {long[:30]}")
    every = max(1, len(offloads) // 30)
    print(
        f"inferences offloaded to the worker pool: {len(offloads)}, at (s): "
        f"{[round(t, 2) for t in offloads[::every]]}"
    )
    print(f"loop thread during stalls > {args.long_ms:g} ms (samples, stack):")
    for stack, n in data["stacks"]:
        print(f"  {n:5} {stack}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        out, stall_ms, long_ms = sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
        sys.exit(child(out, stall_ms, long_ms, sys.argv[5:]))
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--encoding", choices=("json", "binary"), default="json")
    ap.add_argument("--stall-ms", type=float, default=5.0)
    ap.add_argument("--long-ms", type=float, default=35.0)
    parent(ap.parse_args())


if __name__ == "__main__":
    main()
