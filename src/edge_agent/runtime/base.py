"""The one runtime interface every inference adapter implements.

Owns: the ``Runtime`` protocol, the description of a model's I/O as the runtime sees it, and the
choice of adapter for an artifact format. Does not own: validation, preprocessing, drift (callers
do those before and after ``run``), or reading bundles from disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from edge_agent.errors import RuntimeUnavailableError

Tensor = npt.NDArray[np.generic]


@dataclass(frozen=True)
class TensorInfo:
    """Name, element type and shape of one model input or output.

    ``shape`` holds ints for fixed dimensions and ``None`` (or a symbolic name) for dynamic ones.
    """

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run a model: threads, providers, warm-up.

    ``intra_op_threads=0`` lets the runtime pick (all physical cores).
    """

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    warmup_runs: int = 1
    extra: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class Runtime(Protocol):
    """A loaded model that maps named input arrays to named output arrays."""

    @property
    def name(self) -> str:
        """Runtime identifier as it appears in a bundle's compatibility block."""
        ...

    @property
    def version(self) -> str:
        """Installed runtime version."""
        ...

    @property
    def inputs(self) -> tuple[TensorInfo, ...]: ...

    @property
    def outputs(self) -> tuple[TensorInfo, ...]: ...

    def run(self, feeds: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Run the model once.

        Raises:
            InferenceError: the runtime rejected the feeds or failed while running.
        """
        ...

    def close(self) -> None:
        """Release the session; further ``run`` calls are an error."""
        ...


def load_runtime(artifact: bytes, fmt: str, options: RuntimeOptions | None = None) -> Runtime:
    """Load ``artifact`` in the adapter for ``fmt`` ("onnx" or "tflite").

    Raises:
        RuntimeUnavailableError: no adapter for ``fmt`` or its runtime is not installed.
        ModelLoadError: the runtime rejected the model bytes.
    """
    opts = options or RuntimeOptions()
    if fmt == "onnx":
        from edge_agent.runtime.onnx import OnnxRuntime

        return OnnxRuntime(artifact, opts)
    if fmt == "tflite":
        from edge_agent.runtime.litert import LiteRtRuntime

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
