"""The adapter factory: which ``Runtime`` adapter loads an artifact format.

Owns: the choice of adapter for an artifact format (``load_runtime``) and which runtime packages
are installed (``installed_runtime_version``). Does not own: the ``Runtime`` interface and its
value types (``runtime.base``, which the adapters import), nor any adapter's behaviour
(``runtime.onnx``, ``runtime.litert``). Importing this module imports neither onnxruntime nor a
TFLite interpreter: each adapter loads its runtime on first use.
"""

from __future__ import annotations

from edge_agent.errors import RuntimeUnavailableError
from edge_agent.runtime.base import Runtime, RuntimeOptions
from edge_agent.runtime.litert import LiteRtRuntime
from edge_agent.runtime.onnx import OnnxRuntime

__all__ = ["installed_runtime_version", "load_runtime"]


def load_runtime(artifact: bytes, fmt: str, options: RuntimeOptions | None = None) -> Runtime:
    """Load ``artifact`` in the adapter for ``fmt`` ("onnx" or "tflite").

    Raises:
        RuntimeUnavailableError: no adapter for ``fmt`` or its runtime is not installed.
        ModelLoadError: the runtime rejected the model bytes.
    """
    opts = options or RuntimeOptions()
    if fmt == "onnx":
        return OnnxRuntime(artifact, opts)
    if fmt == "tflite":
        return LiteRtRuntime(artifact, opts)
    raise RuntimeUnavailableError(f"no runtime adapter for artifact format {fmt!r}")


def installed_runtime_version(runtime: str) -> str | None:
    """Version of an installed runtime package, or None when it is missing."""
    from importlib import metadata

    candidates = {
        "onnxruntime": ("onnxruntime",),
        "litert": ("ai-edge-litert", "tflite-runtime"),
    }.get(runtime, ())
    for dist in candidates:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None
