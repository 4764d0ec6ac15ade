"""The inference service interface the local API (and the CLI) talk to.

Owns the boundary between transport (HTTP, Unix socket) and the agent's models: what a request
carries in, what a result carries out. The implementation is ``edge_agent.serving.agent.Agent``;
tests of
the API use a fake that implements this protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from edge_agent.serving.ground_truth import FeedbackResult

Array = npt.NDArray[Any]

SOURCE_DEVICE = "device"
SOURCE_CLOUD = "cloud"


@dataclass(slots=True)
class InferenceRequest:
    """One inference call (read-only by convention: slotted, not frozen, since one is built
    per request and a frozen dataclass's ``__init__`` costs three times as much).

    ``routing_key`` makes A/B assignment sticky per caller; ``payload_bytes`` is the size of the
    encoded request body (for the contract's payload limit); ``request_id`` is echoed back.
    """

    model: str
    inputs: Mapping[str, Array]
    version: str | None = None
    routing_key: str | None = None
    request_id: str | None = None
    payload_bytes: int | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferenceResult:
    """Outputs and how they were produced (read-only by convention, slotted as
    ``InferenceRequest``).

    ``source`` is ``device`` or ``cloud``; ``parameters`` carries flags for the response (model
    version, validation drops by reason, drift alert, fallback reason, A/B arm).
    ``request_id`` is the id the service gave a request that came without one, when it
    remembered the answer for feedback (the response carries it as ``id``). ``batched``: the
    answering model runs concurrent requests as one batch (``edge_agent.runtime.batching``).
    """

    model: str
    model_version: str
    outputs: Mapping[str, Array]
    source: str = SOURCE_DEVICE
    parameters: Mapping[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    # The model batches concurrent requests (``[models.<name>] batching``): a front end must
    # then call ``infer`` from several threads at once, never one call at a time on its loop.
    batched: bool = False


class InferenceService(Protocol):
    """What the local API needs from the agent. Every method is thread-safe."""

    def live(self) -> bool:
        """The process is up."""
        ...

    def ready(self) -> bool:
        """Every configured model is loaded and able to serve."""
        ...

    def not_ready(self) -> dict[str, str]:
        """Installed models that do not serve, each with why (what a 503 readiness names)."""
        ...

    def server_metadata(self) -> dict[str, Any]:
        """``{"name", "version", "extensions"}`` for the v2 server metadata endpoint."""
        ...

    def model_names(self) -> list[str]:
        """Names of loaded models."""
        ...

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        """v2 model metadata (``name``, ``versions``, ``platform``, ``inputs``, ``outputs``).

        Raises:
            ModelNotFoundError: no such model or version.
        """
        ...

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """Whether the model (version) can serve.

        Raises:
            ModelNotFoundError: no such model or version.
        """
        ...

    def infer(self, request: InferenceRequest) -> InferenceResult:
        """Validate, run (device or cloud) and account for one request.

        Raises:
            ModelNotFoundError: no such model or version.
            InputValidationError: the request does not fit the input contract.
            InferenceError: the model failed and the cloud could not answer instead.
            FallbackError: the policy sent it to the cloud and the cloud could not answer.
        """
        ...

    def feedback(
        self, name: str, version: str | None, request_id: Any, label: Any, *, rows: bool
    ) -> FeedbackResult:
        """Count the true answer of an earlier request (see ``GroundTruth.feedback``).

        Raises:
            ModelNotFoundError: no such model.
            UnknownRequestError: the request's answer is not (or no longer) remembered.
            InputValidationError: a malformed id or label.
        """
        ...


def as_array(value: Any, dtype: str) -> Array:
    """A numpy array of ``dtype`` from nested lists (used by decoders)."""
    return np.asarray(value, dtype=dtype)
