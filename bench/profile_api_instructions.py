"""Instructions per batch-1 request (callgrind), edge-agent's stages against the bare floor.

Wall and CPU time on a shared machine move with the other jobs' load; the number of instructions
a request executes does not. This script runs each target (the pipeline, ``Agent.infer``, the
whole REST path through the ASGI app as ``bench/profile_api_path.py`` drives it, and the bare
counterparts) in a loop under ``valgrind --tool=callgrind``, with a marker call (``os.getppid``)
before and after each loop; callgrind dumps its counters at every marker
(``--dump-before=getppid``), so each loop's part holds that loop's instructions alone. Printed:
instructions per call of each target, and edge-agent's over the bare counterpart's.

Caveat: callgrind runs the process ~50x slower, and the drift budget is rows per wall second,
so under callgrind nearly every drift block is sketched (in real time at these rates nearly all
are sampled out). The ``*_sampled`` targets run the same model with the smallest drift budget
(256 rows/s, blocks sampled out), which is what a busy device pays per request; the difference is
the sketching.

Usage: .venv/bin/python bench/profile_api_instructions.py [--calls 500]
       [--targets pipe1,bare1,...] [--no-valgrind]
``--no-valgrind`` runs the loops without callgrind (checks the targets work).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench_agent import BIN, PEERS, build_bundle, model_files, rest_bodies

#: target -> its bare counterpart (None: it is a bare one).
TARGETS: dict[str, str | None] = {
    "bare1": None,
    "pipe1": "bare1",
    "pipe1_sampled": "bare1",
    "infer1": "bare1",
    "infer1_sampled": "bare1",
    "bare64": None,
    "pipe64": "bare64",
    "pipe64_sampled": "bare64",
    "bare_json": None,
    "api_json": "bare_json",
    "bare_binary": None,
    "api_binary": "bare_binary",
}


def run_loops(work: Path, calls: int, names: list[str]) -> None:
    """Build everything, then run each target's loop between two markers (the child side)."""
    sys.path.insert(0, str(PEERS))
    from bare_rest import build_app

    from edge_agent.api.app import create_app
    from edge_agent.api.metrics import ApiMetrics
    from edge_agent.config import DriftConfig, load_config
    from edge_agent.daemon import build_agent
    from edge_agent.serving.pipeline import ModelPipeline
    from edge_agent.serving.service import InferenceRequest
    from profile_api_path import driver

    x_eval = np.load(work / "x.npy")
    config = load_config(work / "agent.toml")
    agent = build_agent(config)
    entry = agent.registry.get("digits")
    assert entry is not None
    pipe = entry.pipeline
    sampled = ModelPipeline(
        pipe.manifest, pipe.runtime, pipe.policy, DriftConfig(max_rows_per_second=256)
    )
    bodies = rest_bodies(x_eval[:1])
    x1 = {"input": np.ascontiguousarray(x_eval[:1])}
    x64 = {"input": np.ascontiguousarray(x_eval[:64])}
    px1 = pipe.preprocess(x1)["input"].copy()
    px64 = pipe.preprocess(x64)["input"].copy()
    model, pre = model_files(work / "bundle.efb", work / "root.json", work)
    bare_app = build_app(str(model), json.loads(pre))
    agent_app = create_app(agent, config.api, ApiMetrics())
    session = pipe.runtime._session  # type: ignore[attr-defined]  # the same compiled model

    def infer_on(p: ModelPipeline) -> Callable[[], Any]:
        def call() -> Any:
            entry.pipeline = p  # the agent's entry answers with this pipeline
            return agent.infer(InferenceRequest(model="digits", inputs=x1))

        return call

    loops: dict[str, Callable[[], Any]] = {
        "bare1": lambda: session.run(None, {"input": px1}),
        "pipe1": lambda: pipe.run(x1),
        "pipe1_sampled": lambda: sampled.run(x1),
        "infer1": infer_on(pipe),
        "infer1_sampled": infer_on(sampled),
        "bare64": lambda: session.run(None, {"input": px64}),
        "pipe64": lambda: pipe.run(x64),
        "pipe64_sampled": lambda: sampled.run(x64),
    }
    apps = {
        "bare_json": (bare_app, "json"),
        "api_json": (agent_app, "json"),
        "bare_binary": (bare_app, "binary"),
        "api_binary": (agent_app, "binary"),
    }

    async def main() -> None:
        for name in names:
            if name in apps:
                app, encoding = apps[name]
                one = driver(app, *bodies[encoding])
                if await one() != 200:
                    raise RuntimeError(f"{name}: not 200")
                for _ in range(300):
                    await one()
                os.getppid()
                for _ in range(calls):
                    await one()
                os.getppid()
            else:
                loop = loops[name]
                for _ in range(300):
                    loop()
                os.getppid()
                for _ in range(calls):
                    loop()
                os.getppid()

    try:
        asyncio.run(main())
    finally:
        entry.pipeline = pipe
        agent.close()


def totals(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--no-valgrind", action="store_true")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    names = args.targets.split(",")
    unknown = set(names) - set(TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets: {sorted(unknown)}")
    if args.child is not None:
        run_loops(args.child, args.calls, names)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle, root, x_eval = build_bundle(work)
        bundle.rename(work / "bundle.efb")
        np.save(work / "x.npy", x_eval)
        cfg = work / "agent.toml"
        cfg.write_text(
            "[api]\nrate_limit_per_second = 1000000.0\nrate_limit_burst = 1000000\n"
            f'[store]\nstate_dir = "{work / "state"}"\nroot_path = "{root}"\n'
            "[model_defaults]\nprobation_requests = 1\n"
        )
        subprocess.run(
            [str(BIN / "edge-agent"), "install", str(work / "bundle.efb"), "--config", str(cfg)],
            check=True,
            capture_output=True,
        )
        child = [sys.executable, __file__, "--child", str(work), "--calls", str(args.calls)]
        child += ["--targets", ",".join(names)]
        if args.no_valgrind:
            subprocess.run(child, check=True)
            print("targets ran")
            return
        out = work / "cg.out"
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--dump-before=getppid",
                f"--callgrind-out-file={out}",
                *child,
            ],
            check=True,
            capture_output=True,
        )
        # Parts: 1 = start-up and the first warm-up, then (loop, next warm-up) per target.
        per_call = {
            name: totals(work / f"cg.out.{2 * i + 2}") / args.calls for i, name in enumerate(names)
        }
    print(f"instructions per call (callgrind, {args.calls} calls per target after 300 warm-up):")
    for name, count in per_call.items():
        bare = TARGETS[name]
        ratio = f"  {count / per_call[bare]:.2f}x {bare}" if bare in per_call else ""
        print(f"  {name:16} {count:10,.0f}{ratio}")


if __name__ == "__main__":
    main()
