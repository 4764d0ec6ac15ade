"""KServe's Python client (``kserve`` 0.21) against a running daemon; run in KServe's virtualenv.

Not a test module: ``test_kserve_client.py`` runs it with ``.venv-kserve/bin/python`` (made by
``scripts/setup.sh test``: kserve needs protobuf < 7 and starlette >= 1.3, which the project's
own pins do not allow in one environment) and asserts on what it prints. It calls every method
of ``InferenceRESTClient`` (v2 protocol) and ``InferenceGRPCClient`` and prints, as one JSON
object, what each answered or which error it raised: no judgement here, only observations.

Usage: python kserve_v2_client.py HTTP_URL GRPC_TARGET < {"model": ..., "batches": {...}}
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import grpc
import httpx
import numpy as np
from kserve import (
    InferenceGRPCClient,
    InferenceRESTClient,
    InferInput,
    InferRequest,
    RESTConfig,
)
from kserve.protocol.infer_type import RequestedOutput


def request(model: str, x: np.ndarray, *, binary: bool, rid: str, **params: Any) -> InferRequest:
    tensor = InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return InferRequest(model, [tensor], request_id=rid, parameters=params or None)


def answer(response: Any) -> dict[str, Any]:
    out = response.outputs[0]
    return {
        "id": response.id,
        "model_version": response.model_version,
        "output": out.name,
        "datatype": out.datatype,
        "shape": [int(d) for d in out.shape],
        "data": np.asarray(out.as_numpy(), np.float64).ravel().tolist(),
    }


async def rest_calls(url: str, model: str, batches: dict[str, np.ndarray]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=30)) as client:
        seen["live"] = await client.is_server_live(url)
        seen["ready"] = await client.is_server_ready(url)
        seen["model_ready"] = await client.is_model_ready(url, model)
        seen["unknown_model_ready"] = await client.is_model_ready(url, "nope")
        for batch, x in batches.items():
            for binary in (False, True):
                rid = f"rest-{batch}-{'binary' if binary else 'json'}"
                params = {"binary_data_output": True} if binary else {}
                got = await client.infer(
                    url, request(model, x, binary=binary, rid=rid, **params), model_name=model
                )
                seen[rid] = answer(got)
        for label, name, x in (
            ("unknown_model", "nope", batches["1"]),
            ("wrong_rank", model, batches["1"].reshape(-1)),
        ):
            try:
                await client.infer(url, request(name, x, binary=False, rid=label), model_name=name)
                seen[f"rest-{label}"] = {"raised": None}
            except httpx.HTTPStatusError as exc:
                seen[f"rest-{label}"] = {
                    "raised": type(exc).__name__,
                    "status": exc.response.status_code,
                    "message": str(exc),
                }
    return seen


async def grpc_calls(target: str, model: str, batches: dict[str, np.ndarray]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    client = InferenceGRPCClient(target, timeout=30, retries=0)
    try:
        seen["live"] = await client.is_server_live()
        seen["ready"] = await client.is_server_ready()
        seen["model_ready"] = await client.is_model_ready(model)
        try:
            seen["unknown_model_ready"] = await client.is_model_ready("nope")
        except grpc.RpcError as exc:
            seen["unknown_model_ready"] = {"raised": exc.code().name}
        for batch, x in batches.items():
            for raw in (False, True):  # typed contents (fp32_contents), then raw_input_contents
                rid = f"grpc-{batch}-{'raw' if raw else 'typed'}"
                got = await client.infer(request(model, x, binary=raw, rid=rid))
                seen[rid] = answer(got)
        wanted = request(model, batches["1"], binary=True, rid="grpc-outputs")
        wanted.request_outputs = [RequestedOutput("nope")]
        for label, call in (
            ("unknown_model", request("nope", batches["1"], binary=True, rid="u")),
            ("wrong_rank", request(model, batches["1"].reshape(-1), binary=True, rid="r")),
            ("unknown_output", wanted),
        ):
            try:
                await client.infer(call)
                seen[f"grpc-{label}"] = {"raised": None}
            except grpc.RpcError as exc:
                seen[f"grpc-{label}"] = {"raised": exc.code().name, "message": exc.details()}
    finally:
        await client.close()
    return seen


def main() -> None:
    http_url, grpc_target = sys.argv[1], sys.argv[2]
    given = json.load(sys.stdin)
    model = given["model"]
    batches = {k: np.asarray(v, np.float32) for k, v in given["batches"].items()}
    seen = {
        "rest": asyncio.run(rest_calls(http_url, model, batches)),
        "grpc": asyncio.run(grpc_calls(grpc_target, model, batches)),
    }
    json.dump(seen, sys.stdout)


if __name__ == "__main__":
    main()
