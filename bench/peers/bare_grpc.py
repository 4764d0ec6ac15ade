"""The bare gRPC floor: a grpcio servicer of ``inference.GRPCInferenceService`` + onnxruntime.

Answers ``ModelInfer`` (raw or typed FP32 input; the output as ``raw_output_contents``, like
edge-agent and Triton), ``ServerLive``, ``ServerReady`` and ``ModelReady``, doing only the
decode, the bundle's scale/offset, ``session.run`` and the encode. The message classes are
edge-agent's (``edge_agent.api.grpc_v2.messages``, built from the protocol's .proto), so the
wire format is the same; the server has the agent's shape (a thread pool of ``--workers``
threads, the same message size limit). No validation, drift, metrics or rate limit: the floor
edge-agent's gRPC API is measured against (``bench/bench_agent.py``).

Usage: python bare_grpc.py MODEL.onnx PORT '{"scale": [...], "offset": [...]}' [--workers 8]
       [--max-concurrent-rpcs 128]
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

from edge_agent.api.grpc_v2.messages import METHODS, SERVICE


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("port", type=int)
    ap.add_argument("pre")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--max-concurrent-rpcs", type=int, default=128)
    args = ap.parse_args()
    pre = json.loads(args.pre)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    with open(args.model, "rb") as f:  # noqa: PTH123
        sess = ort.InferenceSession(f.read(), so, providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    output_name = sess.get_outputs()[0].name
    scale = np.asarray(pre["scale"], np.float32)
    offset = np.asarray(pre["offset"], np.float32)
    live_cls = METHODS["ServerLive"][1]
    ready_cls = METHODS["ServerReady"][1]
    model_ready_cls = METHODS["ModelReady"][1]
    infer_cls = METHODS["ModelInfer"][1]

    def model_infer(request: Any, context: grpc.ServicerContext) -> Any:
        t = request.inputs[0]
        if request.raw_input_contents:
            x = np.frombuffer(request.raw_input_contents[0], "<f4")
        else:
            x = np.asarray(t.contents.fp32_contents, np.float32)
        y = sess.run([output_name], {input_name: x.reshape(tuple(t.shape)) * scale + offset})[0]
        response = infer_cls(model_name=request.model_name, id=request.id)
        out = response.outputs.add()
        out.name, out.datatype = output_name, "FP32"
        out.shape.extend(y.shape)
        response.raw_output_contents.append(y.astype("<f4").tobytes())
        return response

    answers = {
        "ServerLive": lambda request, context: live_cls(live=True),
        "ServerReady": lambda request, context: ready_cls(ready=True),
        "ModelReady": lambda request, context: model_ready_cls(ready=True),
        "ModelInfer": model_infer,
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            fn,
            request_deserializer=METHODS[name][0].FromString,
            response_serializer=METHODS[name][1].SerializeToString,
        )
        for name, fn in answers.items()
    }
    limit = 8 * 1024 * 1024
    server = grpc.server(
        ThreadPoolExecutor(args.workers),
        handlers=[grpc.method_handlers_generic_handler(SERVICE, handlers)],
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
        maximum_concurrent_rpcs=args.max_concurrent_rpcs,
    )
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
