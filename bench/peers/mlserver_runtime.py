"""A minimal MLServer runtime: one onnxruntime session, the bundle's scale/offset.

Loaded by MLServer (``bench/bench_peers.py`` installs MLServer into its own virtualenv and
writes a ``model-settings.json`` whose ``implementation`` is ``mlserver_runtime.OnnxRuntime``
and whose ``parameters.extra`` carries ``scale`` and ``offset``). ``predict`` does what
edge-agent and the bare servers do: decode the first input, scale/offset, ``session.run`` with
one intra-op thread, encode the first output. Runs in MLServer's environment, not edge-agent's.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntime(MLModel):
    """``session.run`` on the ONNX file named by the model settings' ``uri``."""

    async def load(self) -> bool:
        uri = await get_model_uri(self.settings)
        extra = self.settings.parameters.extra if self.settings.parameters else None
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        self._session = ort.InferenceSession(uri, so, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        self._scale = np.asarray((extra or {})["scale"], np.float32)
        self._offset = np.asarray((extra or {})["offset"], np.float32)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        y = self._session.run([self._output], {self._input: x * self._scale + self._offset})[0]
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(self._output, y)],
        )
