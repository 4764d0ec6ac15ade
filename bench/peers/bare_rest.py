"""The bare REST floor: uvicorn + Starlette + onnxruntime, nothing else.

Serves ``POST /v2/models/<name>/infer`` in the Open Inference Protocol's JSON form and in its
binary tensor extension (``Inference-Header-Content-Length``), doing only what any endpoint must:
decode the tensor, apply the bundle's scale/offset, ``session.run``, encode the first output.
No validation, drift, metrics, rate limit or routing: the floor edge-agent's REST API is
measured against (``bench/bench_agent.py``). Same uvicorn defaults as the agent's listener (auto
loop and HTTP parser, so uvloop and httptools where installed), no access log.

Usage: python bare_rest.py MODEL.onnx PORT '{"scale": [...], "offset": [...]}' [NAME]
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def build_app(model: str, pre: dict[str, list[float]], name: str = "digits") -> Starlette:
    """The bare endpoint as an ASGI app (``bench/profile_api_path.py`` drives it in-process)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    with open(model, "rb") as f:  # noqa: PTH123
        sess = ort.InferenceSession(f.read(), so, providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    output_name = sess.get_outputs()[0].name
    scale = np.asarray(pre["scale"], np.float32)
    offset = np.asarray(pre["offset"], np.float32)

    async def infer(request: Request) -> Response:
        body = await request.body()
        header_length = request.headers.get("inference-header-content-length")
        if header_length is None:
            t = json.loads(body)["inputs"][0]
            x = np.asarray(t["data"], np.float32).reshape(t["shape"])
        else:
            n = int(header_length)
            t = json.loads(body[:n])["inputs"][0]
            x = np.frombuffer(body, "<f4", offset=n).reshape(t["shape"])
        y = sess.run([output_name], {input_name: x * scale + offset})[0]
        out = {"name": output_name, "datatype": "FP32", "shape": list(y.shape)}
        if header_length is None:
            out["data"] = y.ravel().tolist()
            return Response(json.dumps({"outputs": [out]}), media_type="application/json")
        raw = y.astype("<f4").tobytes()
        out["parameters"] = {"binary_data_size": len(raw)}
        head = json.dumps({"model_name": name, "outputs": [out]}).encode()
        return Response(
            head + raw,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(len(head))},
        )

    async def ready(request: Request) -> Response:
        return Response("{}", media_type="application/json")

    return Starlette(
        routes=[
            Route(f"/v2/models/{name}/infer", infer, methods=["POST"]),
            Route("/v2/health/ready", ready),
        ]
    )


def main() -> None:
    model, port, pre = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    name = sys.argv[4] if len(sys.argv) > 4 else "digits"
    app = build_app(model, pre, name)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
