"""The model repository extension over REST, and what its REST and gRPC halves share.

Owns the three endpoints Triton's model repository extension defines, served only with
``[api] repository_control = true`` (control endpoints; off by default, and then the routes do
not exist: 404, and gRPC answers UNIMPLEMENTED):

    POST /v2/repository/index                  body ``{}``, empty, or ``{"ready": bool}``;
                                               answers ``[{"name", "version", "state", "reason"}]``
    POST /v2/repository/models/{name}/load     body ``{}``, empty, or ``{"parameters": {...}}``
    POST /v2/repository/models/{name}/unload   likewise; both answer 200 with an empty body

Parameters (``load_version``, ``check_unload``; the gRPC half passes its parameter map through
the same functions): load takes ``version`` (an integer, or its decimal string: make that kept
version active first); unload takes ``unload_dependents`` (a bool: no model here depends on
another, so it changes nothing). Anything else is refused with 400 / INVALID_ARGUMENT, in
particular Triton's ``config`` and ``file:`` overrides: this device serves only signed bundles.
Statuses come from the one error table (``edge_agent.errors.ERRORS``): an unknown model or
version 404 / NOT_FOUND, a version that cannot serve 503 / UNAVAILABLE.

What load and unload mean on the device (the store, the sync loop) is the agent's
(``edge_agent.serving.repository.control``). Does not own the other v2 routes
(``edge_agent.api.app``; their handlers, ``edge_agent.api.endpoints``) nor the gRPC handlers
(``edge_agent.api.grpc_v2.service``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from edge_agent.api import metrics as m
from edge_agent.api.fastpath import error_response, json_response, read_body
from edge_agent.api.metrics import ApiMetrics
from edge_agent.api.outcomes import (
    INTERNAL_HTTP,
    OUTCOME_BY_STATUS,
    RATE_LIMITED_STATUS,
    UDS_CLIENT,
    describe,
)
from edge_agent.common.ratelimit import RateLimiter
from edge_agent.errors import (
    DISCONNECTED_HTTP,
    TOO_LARGE_STATUS,
    ContractError,
    EdgefleetError,
    InputValidationError,
    api_status,
)
from edge_agent.strict_json import loads as strict_loads

__all__ = [
    "EXTENSION",
    "MAX_REPOSITORY_BODY",
    "REASON_PARAMETER",
    "RepositoryRoutes",
    "RepositoryService",
    "check_unload",
    "index_ready",
    "load_version",
]

logger = logging.getLogger(__name__)

#: The protocol extension's name in the server metadata (only when the endpoints are served).
EXTENSION = "model_repository"
#: Repository requests are a few bytes; anything larger is refused (413).
MAX_REPOSITORY_BODY = 64 * 1024
#: The ``InputValidationError.reason`` of a refused repository parameter.
REASON_PARAMETER = "parameter"
_MAX_VERSION_DIGITS = 16


class IndexLine(Protocol):
    """One index entry (``edge_agent.serving.repository.index.IndexEntry``)."""

    name: str
    version: str
    state: str
    reason: str

    def to_dict(self) -> dict[str, Any]: ...


@runtime_checkable
class RepositoryService(Protocol):
    """What the repository endpoints need from the agent (``serving.agent.Agent``)."""

    def repository_index(self, ready_only: bool = False) -> Sequence[IndexLine]:
        """Every installed model's kept versions and their state."""
        ...

    def load_model(self, name: str, version: int | None = None) -> None:
        """Serve ``name`` (``version``: make that kept version active first).

        Raises:
            ModelNotFoundError: no such model or version.
            ModelStoreError: the version cannot serve (why in the message).
        """
        ...

    def unload_model(self, name: str) -> None:
        """Stop serving ``name``.

        Raises:
            ModelNotFoundError: no such model.
        """
        ...


def _refuse(message: str) -> InputValidationError:
    return InputValidationError(message, reason=REASON_PARAMETER)


def load_version(parameters: Mapping[str, Any]) -> int | None:
    """The ``version`` a load names (None: the active one).

    Raises:
        InputValidationError: an unknown parameter (``config``, ``file:...`` included) or a
            version that is not a positive integer.
    """
    for key in parameters:
        if key == "config" or str(key).startswith("file:"):
            raise _refuse(
                f"parameter {key!r} is not accepted: this device loads only installed, signed "
                "bundles (install a bundle to add a model)"
            )
        if key != "version":
            raise _refuse(f"unknown load parameter {key!r} (only 'version')")
    if "version" not in parameters:
        return None
    value = parameters["version"]
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value) if len(value) <= _MAX_VERSION_DIGITS else 0
    if type(value) is not int or value < 1:
        raise _refuse(f"parameter 'version' must be a positive integer, got {value!r}")
    return value


def check_unload(parameters: Mapping[str, Any]) -> None:
    """Check an unload's parameters: only ``unload_dependents`` (a bool) is accepted.

    Raises:
        InputValidationError: any other parameter, or a value that is not a bool.
    """
    for key, value in parameters.items():
        if key != "unload_dependents":
            raise _refuse(f"unknown unload parameter {key!r} (only 'unload_dependents')")
        if not isinstance(value, bool):
            raise _refuse(f"parameter 'unload_dependents' must be a bool, got {value!r}")


def index_ready(body: Mapping[str, Any]) -> bool:
    """The ``ready`` flag of an index request body (False when absent).

    Raises:
        InputValidationError: another key, or ``ready`` not a bool.
    """
    for key in body:
        if key not in ("ready", "repository_name"):
            raise _refuse(f"unknown index request key {key!r}")
    if body.get("repository_name", "") != "":
        raise _refuse("this device has one model repository: 'repository_name' must be empty")
    ready = body.get("ready", False)
    if not isinstance(ready, bool):
        raise _refuse(f"'ready' must be a bool, got {ready!r}")
    return ready


def _document(body: bytes, what: str) -> dict[str, Any]:
    """The JSON object of a request body (an empty body is ``{}``)."""
    if not body.strip():
        return {}
    try:
        document = strict_loads(body, max_bytes=MAX_REPOSITORY_BODY, what=what)
    except ContractError as exc:
        raise InputValidationError(str(exc), reason="json") from exc
    if not isinstance(document, dict):
        raise _refuse(f"the {what} must be a JSON object")
    return document


def _parameters(document: Mapping[str, Any], allowed: str) -> Mapping[str, Any]:
    extra = set(document) - {"parameters"}
    if extra:
        raise _refuse(f"unknown request key(s) {sorted(extra)} (only '{allowed}')")
    parameters = document.get("parameters", {})
    if not isinstance(parameters, dict):
        raise _refuse("'parameters' must be a JSON object")
    return parameters


class RepositoryRoutes:
    """The REST endpoints over one service, sharing the API's limiter and metrics."""

    def __init__(self, service: RepositoryService, metrics: ApiMetrics, limiter: RateLimiter):
        self.service = service
        self.metrics = metrics
        self.limiter = limiter

    def routes(self) -> list[Route]:
        """The three routes (the caller adds them only when repository control is on)."""
        base = "/v2/repository"
        return [
            Route(f"{base}/index", self.index, methods=["POST"]),
            Route(f"{base}/models/{{name}}/load", self.load, methods=["POST"]),
            Route(f"{base}/models/{{name}}/unload", self.unload, methods=["POST"]),
        ]

    async def index(self, request: Request) -> Response:
        async def call(body: bytes) -> Response:
            ready = index_ready(_document(body, "index request"))
            entries = await run_in_threadpool(self.service.repository_index, ready)
            return json_response([e.to_dict() for e in entries])

        return await self._answer(request, "repository_index", None, call)

    async def load(self, request: Request) -> Response:
        name = request.path_params["name"]

        async def call(body: bytes) -> Response:
            version = load_version(_parameters(_document(body, "load request"), "parameters"))
            await run_in_threadpool(self.service.load_model, name, version)
            return Response(b"", status_code=200)

        return await self._answer(request, "repository_load", name, call)

    async def unload(self, request: Request) -> Response:
        name = request.path_params["name"]

        async def call(body: bytes) -> Response:
            check_unload(_parameters(_document(body, "unload request"), "parameters"))
            await run_in_threadpool(self.service.unload_model, name)
            return Response(b"", status_code=200)

        return await self._answer(request, "repository_unload", name, call)

    async def _answer(
        self, request: Request, endpoint: str, name: str | None, call: Any
    ) -> Response:
        client = request.scope.get("client")
        wait = self.limiter.acquire(client[0] if client else UDS_CLIENT)
        if wait > 0:
            self.metrics.count_request(endpoint, m.UNKNOWN_MODEL, m.OUTCOME_RATE_LIMITED, "rate")
            headers = {"Retry-After": str(max(1, int(wait + 0.999)))}
            message = f"rate limited; retry in {wait:.3f}s"
            return error_response(RATE_LIMITED_STATUS[0], message, headers)
        try:
            body = await read_body(request.receive, MAX_REPOSITORY_BODY)
        except ClientDisconnect:
            return error_response(DISCONNECTED_HTTP, "client disconnected")
        if body is None:
            self.metrics.count_request(endpoint, m.UNKNOWN_MODEL, m.OUTCOME_TOO_LARGE, "size")
            message = f"request body too large; the limit is {MAX_REPOSITORY_BODY} bytes"
            return error_response(TOO_LARGE_STATUS[0], message)
        try:
            response: Response = await call(body)
        except Exception as exc:
            return self._failure(endpoint, exc)
        self.metrics.count_request(endpoint, name or "_all", m.OUTCOME_OK, m.NO_REASON)
        return response

    def _failure(self, endpoint: str, exc: Exception) -> Response:
        status, _ = api_status(exc)
        code = exc.code if isinstance(exc, EdgefleetError) else "exception"
        if isinstance(exc, InputValidationError):
            outcome, message = m.OUTCOME_INVALID, describe(exc)
        elif status in OUTCOME_BY_STATUS:
            outcome, message = OUTCOME_BY_STATUS[status], str(exc) or code
        else:
            logger.error("repository API %s failed (%s)", endpoint, code, exc_info=exc)
            outcome, message = m.OUTCOME_ERROR, f"internal error ({code})"
            status = INTERNAL_HTTP
        self.metrics.count_request(endpoint, m.UNKNOWN_MODEL, outcome, code)
        return error_response(status, message)
