"""onnxruntime adapter: the only module in edge_agent that imports onnxruntime.

Owns session options (threads, providers, graph optimisation), warm-up on load, and mapping
onnxruntime's exceptions to our typed errors. Heavy import is lazy so that importing
``edge_agent`` costs nothing on a device that only runs TFLite.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edge_agent.errors import InferenceError, ModelLoadError, RuntimeUnavailableError
from edge_agent.runtime.base import RuntimeOptions, Tensor, TensorInfo

# onnxruntime's type strings, e.g. "tensor(float)", mapped to numpy dtype names.
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
    "tensor(string)": "str",
}


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - onnxruntime is a core dependency
        raise RuntimeUnavailableError("onnxruntime is not installed") from exc
    return ort


class OnnxRuntime:
    """An onnxruntime ``InferenceSession`` behind the ``Runtime`` interface."""

    name = "onnxruntime"

    def __init__(self, artifact: bytes, options: RuntimeOptions | None = None) -> None:
        """Load and warm up a model.

        Raises:
            ModelLoadError: onnxruntime rejected the model.
            RuntimeUnavailableError: onnxruntime is missing.
        """
        ort = _import_ort()
        opts = options or RuntimeOptions()
        so = ort.SessionOptions()
        so.intra_op_num_threads = opts.intra_op_threads
        so.inter_op_num_threads = opts.inter_op_threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        for key, value in opts.extra.items():
            so.add_session_config_entry(key, value)
        available = set(ort.get_available_providers())
        providers = [p for p in opts.providers if p in available] or ["CPUExecutionProvider"]
        try:
            self._session = ort.InferenceSession(artifact, sess_options=so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise ModelLoadError(f"onnxruntime could not load the model: {exc}") from exc
        self.version: str = str(ort.__version__)
        self.inputs: tuple[TensorInfo, ...] = tuple(
            TensorInfo(i.name, _ORT_TYPES.get(i.type, i.type), tuple(i.shape))
            for i in self._session.get_inputs()
        )
        self.outputs: tuple[TensorInfo, ...] = tuple(
            TensorInfo(o.name, _ORT_TYPES.get(o.type, o.type), tuple(o.shape))
            for o in self._session.get_outputs()
        )
        self._output_names = [o.name for o in self.outputs]
        self._single_output = self._output_names[0] if len(self._output_names) == 1 else None
        self._compiled_run = _compiled_run(self._session, list(self._session.get_providers()))
        for _ in range(opts.warmup_runs):
            self.run(_zeros_like_inputs(self.inputs))

    def run(self, feeds: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Run once. Raises InferenceError when onnxruntime rejects the feeds or fails."""
        session = self._session
        if session is None:
            raise InferenceError("session is closed")
        compiled = self._compiled_run
        try:
            if compiled is not None:
                results = compiled(self._output_names, feeds, None)
            else:
                results = session.run(self._output_names, feeds)
        except Exception as exc:
            raise InferenceError(f"onnxruntime failed: {exc}") from exc
        single = self._single_output
        if single is not None and len(results) == 1:
            return {single: results[0]}
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        self._session = None
        self._compiled_run = None


def _compiled_run(session: Any, providers: list[str]) -> Any:
    """The compiled session's own ``run(names, feeds, run_options)``, when it is safe to call.

    ``InferenceSession.run`` is a Python wrapper around ``session._sess.run``: it re-checks the
    input names (the compiled run rejects missing and unknown inputs too), checks WebGPU graph
    capture and OrtValue ownership (neither applies to numpy feeds on the CPU), and retries on a
    fallback execution provider after an EP failure. On a CPU-only session none of that can
    happen, and the wrapper costs ~0.9 us of the ~6 us a batch-1 digits MLP takes (onnxruntime
    1.32, bench/bench_agent.py's machine). Other providers keep the public ``run``.

    I/O binding was measured and does not pay here: a binding reused across calls ran at
    ~5.6 us (and cannot be shared between request threads), a new one per call ~8.3 us, against
    ~5.3 us for the compiled run; ``run_with_ort_values`` with a new ``OrtValue`` took ~38 us.
    """
    if providers != ["CPUExecutionProvider"]:
        return None
    run = getattr(getattr(session, "_sess", None), "run", None)
    return run if callable(run) else None  # a future onnxruntime without it: the public API


def _zeros_like_inputs(inputs: tuple[TensorInfo, ...]) -> dict[str, Tensor]:
    """A batch-1 all-zero feed for warm-up; dynamic dimensions become 1."""
    feeds: dict[str, Tensor] = {}
    for info in inputs:
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in info.shape)
        dtype = np.dtype(info.dtype) if info.dtype != "str" else np.dtype(object)
        feeds[info.name] = np.zeros(shape, dtype=dtype)
    return feeds
