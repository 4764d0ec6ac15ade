"""CPU cost of each stage of a batch-1 v2 request, edge-agent against the bare endpoint's.

The stages are called directly (no ASGI, no event loop) and timed with the thread's CPU clock
(``time.thread_time``), which waiting for a CPU held by another process does not inflate: the
steadier measure on a shared machine. Each figure is the minimum over ``--rounds`` runs of
``--requests`` calls (the least disturbed run). edge-agent's stages are those of the daemon
(``build_agent`` over an installed digits bundle, default config: validation, drift, routing,
ground-truth memory on; the pipeline also with its drift blocks sampled out, and the sketching of
one drift block per row); the bare stages are ``bench/peers/bare_rest.py``'s (``json.loads`` +
``np.asarray``, scale/offset + ``session.run``, ``json.dumps`` of the first output).

Usage: .venv/bin/python bench/profile_api_stages.py [--rounds 7] [--requests 3000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench_agent import BIN, build_bundle, model_files, rest_bodies


def cpu_us(func: Callable[[], Any], rounds: int, n: int) -> float:
    """Minimum over ``rounds`` of the thread CPU time per call of ``func``, in microseconds."""
    return min(timeit.repeat(func, number=n, repeat=rounds, timer=time.thread_time)) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--requests", type=int, default=3000, help="calls per round")
    args = ap.parse_args()

    from edge_agent.api.codec import encode_response
    from edge_agent.api.decode import decode_request
    from edge_agent.config import DriftConfig, load_config
    from edge_agent.daemon import build_agent
    from edge_agent.serving.pipeline import BLOCK, ModelPipeline
    from edge_agent.serving.service import InferenceRequest

    def t(func: Callable[[], Any]) -> float:
        return cpu_us(func, args.rounds, args.requests)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle, root, x_eval = build_bundle(work)
        cfg = work / "agent.toml"
        cfg.write_text(
            f'[store]\nstate_dir = "{work / "state"}"\nroot_path = "{root}"\n'
            "[model_defaults]\nprobation_requests = 1\n"
        )
        subprocess.run(
            [str(BIN / "edge-agent"), "install", str(bundle), "--config", str(cfg)],
            check=True,
            capture_output=True,
        )
        agent = build_agent(load_config(cfg))
        try:
            body = rest_bodies(x_eval[:1])["json"][0]
            decoded = decode_request(body)

            def request() -> InferenceRequest:
                return InferenceRequest(
                    model="digits",
                    inputs=decoded.inputs,
                    payload_bytes=len(body),
                    parameters=decoded.parameters,
                )

            answer = agent.infer(request())
            entry = agent.registry.get("digits")
            assert entry is not None
            pipe = entry.pipeline
            checked = pipe.validator.validate(decoded.inputs, len(body))
            feeds = pipe.preprocess(checked.feeds)
            # The same model with the smallest drift budget: blocks are sampled out, not
            # sketched, so its run is the pipeline's cost without the sketching.
            sampled = ModelPipeline(
                pipe.manifest, pipe.runtime, pipe.policy, DriftConfig(max_rows_per_second=256)
            )
            outputs = pipe.runtime.run(feeds)
            remembered = pipe.run(decoded.inputs, len(body))  # a result to remember
            blocks = {
                name: np.repeat(np.asarray(x, np.float64).reshape(1, -1), BLOCK, axis=0)
                for name, x in (*checked.feeds.items(), *outputs.items())
                if name in pipe.manifest.baseline.inputs or name in pipe.manifest.baseline.outputs
            }
            stages = {
                "decode (JSON body -> arrays)": t(lambda: decode_request(body)),
                "service (Agent.infer)": t(lambda: agent.infer(request())),
                "  pipeline (ModelPipeline.run)": t(lambda: pipe.run(decoded.inputs, len(body))),
                "    validation": t(lambda: pipe.validator.validate(decoded.inputs, len(body))),
                "    preprocessing": t(lambda: pipe.preprocess(checked.feeds)),
                "    runtime.run (session.run)": t(lambda: pipe.runtime.run(feeds)),
                "  ground-truth memory (Agent._remember)": t(
                    lambda: agent._remember(request(), entry, remembered)
                ),
                "  pipeline, drift blocks sampled out": t(
                    lambda: sampled.run(decoded.inputs, len(body))
                ),
                **{
                    f"  drift sketching of {name!r}, per row": cpu_us(
                        lambda b=b, name=name: pipe.observe_block(name, b), args.rounds, 20
                    )
                    / BLOCK
                    for name, b in blocks.items()
                },
                "encode (answer -> JSON)": t(
                    lambda: encode_response(answer, request_id=answer.request_id)
                ),
            }
            model, pre_text = model_files(bundle, root, work)
        finally:
            agent.close()
        pre = json.loads(pre_text)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(model.read_bytes(), so, providers=["CPUExecutionProvider"])
        input_name, output_name = sess.get_inputs()[0].name, sess.get_outputs()[0].name
        scale = np.asarray(pre["scale"], np.float32)
        offset = np.asarray(pre["offset"], np.float32)

        def bare_decode() -> Any:
            tensor = json.loads(body)["inputs"][0]
            return np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])

        x = bare_decode()
        y = sess.run([output_name], {input_name: x * scale + offset})[0]

        def bare_encode() -> str:
            out = {"name": output_name, "datatype": "FP32", "shape": list(y.shape)}
            out["data"] = y.ravel().tolist()
            return json.dumps({"outputs": [out]})

        bare = {
            "decode (JSON body -> arrays)": t(bare_decode),
            "scale/offset + session.run": t(
                lambda: sess.run([output_name], {input_name: x * scale + offset})
            ),
            "encode (answer -> JSON)": t(bare_encode),
        }
    print(f"thread CPU per call, min of {args.rounds} rounds of {args.requests} calls")
    print("edge-agent:")
    for label, us in stages.items():
        print(f"  {label:36} {us:7.1f} us")
    print("bare endpoint:")
    for label, us in bare.items():
        print(f"  {label:36} {us:7.1f} us")
    agent_sum = sum(stages[k] for k in ("decode (JSON body -> arrays)", "service (Agent.infer)"))
    agent_sum += stages["encode (answer -> JSON)"]
    print(
        f"decode + service + encode: edge-agent {agent_sum:.1f} us, bare "
        f"{sum(bare.values()):.1f} us, ratio {agent_sum / sum(bare.values()):.2f}x"
    )


if __name__ == "__main__":
    main()
