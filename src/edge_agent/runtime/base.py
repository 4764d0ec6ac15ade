"""The one runtime interface every inference adapter implements.

Owns: the ``Runtime`` protocol, the description of a model's I/O as the runtime sees it
(``TensorInfo``) and how to run a model (``RuntimeOptions``). Does not own: the choice of adapter
for an artifact format (``runtime.loader``, above the adapters), validation, preprocessing, drift
(callers do those before and after ``run``), or reading bundles from disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

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

    ``intra_op_threads=0`` lets the runtime pick (all physical cores). The agent builds its
    options from its ``[runtime]`` section (``edge_agent.config.RuntimeConfig.options``).
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
