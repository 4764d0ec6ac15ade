"""A minimal KServe ModelServer: a ``kserve.Model`` with one onnxruntime session.

Started by ``bench/bench_peers.py`` with KServe's own virtualenv (its Python ModelServer:
FastAPI/uvicorn for REST, grpcio for gRPC). ``predict`` does what edge-agent and the bare
servers do: decode the first input, the bundle's scale/offset, ``session.run`` with one
intra-op thread, encode the first output. Runs in KServe's environment, not edge-agent's.

Usage: python kserve_server.py --model_name digits --model_path MODEL.onnx
       --preprocessing '{"scale": [...], "offset": [...]}'
       [KServe's ModelServer flags: --http_port, --grpc_port, ...]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import kserve
import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse
from kserve.model_server import parser as kserve_parser


class OnnxModel(kserve.Model):
    """``session.run`` on one ONNX file."""

    def __init__(self, name: str, path: str, pre: dict[str, Any]) -> None:
        super().__init__(name)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        self._session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        self._scale = np.asarray(pre["scale"], np.float32)
        self._offset = np.asarray(pre["offset"], np.float32)
        self.ready = True

    def predict(
        self, payload: InferRequest, headers: dict[str, str] | None = None
    ) -> InferResponse:
        x = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
        y = self._session.run([self._output], {self._input: x * self._scale + self._offset})[0]
        out = InferOutput(name=self._output, shape=list(y.shape), datatype="FP32")
        out.set_data_from_numpy(y, binary_data=False)
        return InferResponse(
            response_id=payload.id or "",
            model_name=self.name,
            infer_outputs=[out],
            from_grpc=payload.from_grpc,
        )


def main() -> None:
    ap = argparse.ArgumentParser(parents=[kserve_parser])
    ap.add_argument("--model_path", required=True)
    ap.add_argument("--preprocessing", required=True)
    args, _ = ap.parse_known_args()
    model = OnnxModel(args.model_name, args.model_path, json.loads(args.preprocessing))
    kserve.ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        enable_latency_logging=False,
    ).start([model])


if __name__ == "__main__":
    main()
