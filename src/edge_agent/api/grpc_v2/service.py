"""The protocol's gRPC service (``inference.GRPCInferenceService``) over an ``InferenceService``.

Owns the six core RPCs (ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata,
ModelInfer) and, when built with a ``repository`` (``[api] repository_control``), the model
repository extension's RepositoryIndex, RepositoryModelLoad and RepositoryModelUnload (without
one they are not registered: grpc answers UNIMPLEMENTED; their parameters are checked by
``edge_agent.api.repository``, as REST's), their status codes and their metrics. Status codes
come from the one error table, ``edge_agent.errors.ERRORS`` (the same row gives REST its HTTP
status; what both front ends share is ``edge_agent.api.outcomes``): INVALID_ARGUMENT for a
request that does not fit (the message names the validation reason and input, as REST's 400),
NOT_FOUND for an unknown model or version, RESOURCE_EXHAUSTED for a client over its rate limit,
UNAVAILABLE when the model or the cloud cannot answer, INTERNAL with a generic message (the
traceback goes to the log) for anything else. A message larger than ``grpc.max_message_bytes``
is refused by grpc itself with RESOURCE_EXHAUSTED before it reaches this code.

Validation, routing (the ``routing_key`` request parameter, else ``x-routing-key`` metadata),
drift and fallback are the service's, exactly as for REST; metrics go to the same series as REST
(the probes count under ``grpc_*`` endpoint names). Rate limiting shares REST's limiter: a TCP
client is its peer IP, every Unix-socket client is the one client ``"uds"``.

Threads: grpc runs each RPC on one of ``grpc.max_workers`` threads; the model runs on that thread.
Does not own sockets or the drain (``edge_agent.api.grpc_v2.server``) nor decoding
(``edge_agent.api.grpc_v2.codec``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, NoReturn

import grpc

from edge_agent.api import metrics as m
from edge_agent.api.grpc_v2 import codec
from edge_agent.api.grpc_v2.messages import METHODS, SERVICE, UNPARSABLE, Message, parser
from edge_agent.api.metadata import EXTENSIONS, protocol_metadata
from edge_agent.api.metrics import ApiMetrics
from edge_agent.api.outcomes import (
    INTERNAL_HTTP,
    NOT_FOUND_HTTP,
    RATE_LIMITED_STATUS,
    UDS_CLIENT,
    describe,
    outcome_of,
)
from edge_agent.api.repository import (
    EXTENSION,
    RepositoryService,
    check_unload,
    index_ready,
    load_version,
)
from edge_agent.common.ratelimit import RateLimiter
from edge_agent.errors import ERRORS, EdgefleetError, InputValidationError, api_status
from edge_agent.serving.service import InferenceRequest, InferenceService

__all__ = ["GrpcInference"]

logger = logging.getLogger(__name__)

_MAX_KNOWN_MODELS = 256
_INVALID = getattr(grpc.StatusCode, ERRORS.api_status(InputValidationError)[1])
_RATE_LIMITED = getattr(grpc.StatusCode, RATE_LIMITED_STATUS[1])


class _RpcError(Exception):
    """An RPC's answer is an error status (raised inside a handler, turned into the status)."""

    def __init__(self, code: grpc.StatusCode, message: str, outcome: str, reason: str) -> None:
        super().__init__(message)
        self.status = code
        self.outcome = outcome
        self.reason = reason


def _client(context: grpc.ServicerContext) -> str:
    peer = context.peer() or ""
    kind, _, address = peer.partition(":")
    if kind == "ipv4":
        return address.rpartition(":")[0]
    if kind == "ipv6":
        return address.rpartition(":")[0].strip("[]")
    return UDS_CLIENT


def _failure(exc: Exception, *, from_service: bool = True) -> _RpcError:
    http, name = api_status(exc, from_service=from_service)
    code = getattr(grpc.StatusCode, name)
    if http == INTERNAL_HTTP:
        reason = exc.code if isinstance(exc, EdgefleetError) else "exception"
        logger.error("gRPC inference API failed (%s)", reason, exc_info=exc)
        return _RpcError(code, f"internal error ({reason})", m.OUTCOME_ERROR, reason)
    if isinstance(exc, InputValidationError):
        return _RpcError(code, describe(exc), m.OUTCOME_INVALID, exc.reason)
    reason = exc.code if isinstance(exc, EdgefleetError) else "exception"
    return _RpcError(code, str(exc) or reason, outcome_of(http), reason)


def _abort(context: grpc.ServicerContext, failure: _RpcError) -> NoReturn:
    context.abort(failure.status, str(failure))
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


class GrpcInference:
    """The RPC handlers over one service, limiter and metrics (shared with the REST API)."""

    def __init__(
        self,
        service: InferenceService,
        metrics: ApiMetrics,
        limiter: RateLimiter,
        *,
        repository: RepositoryService | None = None,
    ) -> None:
        """``repository``: serve the model repository extension over it (None: not served)."""
        self.service = service
        self.metrics = metrics
        self.limiter = limiter
        self.repository = repository
        self._known: set[str] = set()
        self._responses = {name: response for name, (_, response) in METHODS.items()}

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler serving every RPC of ``inference.GRPCInferenceService``."""
        calls: dict[str, Callable[[Any, grpc.ServicerContext], Any]] = {
            "ServerLive": self.server_live,
            "ServerReady": self.server_ready,
            "ModelReady": self.model_ready,
            "ServerMetadata": self.server_metadata,
            "ModelMetadata": self.model_metadata,
            "ModelInfer": self.model_infer,
        }
        if self.repository is not None:
            calls["RepositoryIndex"] = self.repository_index
            calls["RepositoryModelLoad"] = self.repository_load
            calls["RepositoryModelUnload"] = self.repository_unload
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._parsed(name, calls[name]),
                request_deserializer=parser(request),
                response_serializer=response.SerializeToString,
            )
            for name, (request, response) in METHODS.items()
            if name in calls
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def _parsed(
        self, name: str, call: Callable[[Any, grpc.ServicerContext], Any]
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        """``call``, but a request that did not parse as its message is INVALID_ARGUMENT."""

        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            if request is UNPARSABLE:
                endpoint = f"grpc_{name}"
                self.metrics.count_request(endpoint, m.UNKNOWN_MODEL, m.OUTCOME_INVALID, "protobuf")
                message = f"the request is not a valid {name}Request message (reason: protobuf)"
                context.abort(_INVALID, message)
            return call(request, context)

        return handle

    def _label(self, name: str) -> str:
        return name if name in self._known else m.UNKNOWN_MODEL

    def _vouch(self, name: str) -> None:
        if len(self._known) < _MAX_KNOWN_MODELS:
            self._known.add(name)

    def _throttle(self, context: grpc.ServicerContext) -> None:
        wait = self.limiter.acquire(_client(context))
        if wait > 0:
            message = f"rate limited; retry in {wait:.3f}s"
            raise _RpcError(_RATE_LIMITED, message, m.OUTCOME_RATE_LIMITED, m.OUTCOME_RATE_LIMITED)

    # --- health and metadata -------------------------------------------------------------

    def server_live(self, request: Message, context: grpc.ServicerContext) -> Message:
        return self._responses["ServerLive"](live=self._probe(self.service.live, "live"))

    def server_ready(self, request: Message, context: grpc.ServicerContext) -> Message:
        return self._responses["ServerReady"](ready=self._probe(self.service.ready, "ready"))

    @staticmethod
    def _probe(check: Callable[[], bool], what: str) -> bool:
        try:
            return bool(check())
        except Exception:
            logger.exception("gRPC %s probe failed", what)
            return False

    def server_metadata(self, request: Message, context: grpc.ServicerContext) -> Message:
        try:
            meta = dict(self.service.server_metadata())
        except Exception as exc:
            _abort(context, _failure(exc))
        # Only what this front end implements, whatever the service claims (as REST).
        extensions = [*EXTENSIONS, *([EXTENSION] if self.repository is not None else [])]
        return self._responses["ServerMetadata"](
            name=str(meta.get("name", "")),
            version=str(meta.get("version", "")),
            extensions=extensions,
        )

    def model_ready(self, request: Message, context: grpc.ServicerContext) -> Message:
        ready = self._model_call(request, context, "grpc_model_ready", self.service.model_ready)
        return self._responses["ModelReady"](ready=bool(ready))

    def model_metadata(self, request: Message, context: grpc.ServicerContext) -> Message:
        meta = self._model_call(request, context, "grpc_metadata", self.service.model_metadata)
        document = protocol_metadata(meta)
        response = self._responses["ModelMetadata"](
            name=str(document.get("name", request.name)),
            versions=[str(v) for v in document.get("versions", [])],
            platform=str(document.get("platform", "")),
        )
        for key in ("inputs", "outputs"):
            for tensor in document.get(key) or []:
                getattr(response, key).add(
                    name=str(tensor.get("name", "")),
                    datatype=str(tensor.get("datatype", "")),
                    shape=[d if isinstance(d, int) and d >= 0 else -1 for d in tensor["shape"]],
                )
        return response

    def _model_call(
        self, request: Message, context: grpc.ServicerContext, endpoint: str, call: Any
    ) -> Any:
        name, version = request.name, request.version or None
        try:
            self._throttle(context)
            try:
                value = call(name, version)
            except Exception as exc:
                raise _failure(exc) from exc
        except _RpcError as failure:
            self.metrics.count_request(endpoint, self._label(name), failure.outcome, failure.reason)
            _abort(context, failure)
        self._vouch(name)
        self.metrics.count_request(endpoint, name, m.OUTCOME_OK, m.NO_REASON)
        return value

    # --- model repository extension ------------------------------------------------------

    def repository_index(self, request: Message, context: grpc.ServicerContext) -> Message:
        assert self.repository is not None  # registered only with one
        repository = self.repository

        def call() -> Any:
            ready = index_ready(
                {"ready": request.ready, "repository_name": request.repository_name}
            )
            return repository.repository_index(ready)

        entries = self._control(context, "grpc_repository_index", "_all", call)
        response = self._responses["RepositoryIndex"]()
        for entry in entries:
            response.models.add(
                name=entry.name, version=entry.version, state=entry.state, reason=entry.reason
            )
        return response

    def repository_load(self, request: Message, context: grpc.ServicerContext) -> Message:
        assert self.repository is not None
        repository, name = self.repository, request.model_name

        def call() -> None:
            _one_repository(request.repository_name)
            version = load_version(codec.from_parameters(request.parameters))
            repository.load_model(name, version)

        self._control(context, "grpc_repository_load", name, call)
        return self._responses["RepositoryModelLoad"]()

    def repository_unload(self, request: Message, context: grpc.ServicerContext) -> Message:
        assert self.repository is not None
        repository, name = self.repository, request.model_name

        def call() -> None:
            _one_repository(request.repository_name)
            check_unload(codec.from_parameters(request.parameters))
            repository.unload_model(name)

        self._control(context, "grpc_repository_unload", name, call)
        return self._responses["RepositoryModelUnload"]()

    def _control(
        self, context: grpc.ServicerContext, endpoint: str, label: str, call: Callable[[], Any]
    ) -> Any:
        """Run one repository call: rate limit, error table, metrics (the model label is
        the model's only once the call succeeded: an installed name, a bounded label)."""
        try:
            self._throttle(context)
            try:
                value = call()
            except Exception as exc:
                raise _failure(exc) from exc
        except _RpcError as failure:
            self.metrics.count_request(endpoint, m.UNKNOWN_MODEL, failure.outcome, failure.reason)
            _abort(context, failure)
        self.metrics.count_request(endpoint, label, m.OUTCOME_OK, m.NO_REASON)
        return value

    # --- inference -----------------------------------------------------------------------

    def model_infer(self, request: Message, context: grpc.ServicerContext) -> Message:
        started = time.perf_counter()
        name = request.model_name
        self.metrics.request_started()
        outcome, reason = m.OUTCOME_OK, m.NO_REASON
        try:
            return self._infer(request, context)
        except _RpcError as failure:
            outcome, reason = failure.outcome, failure.reason
            _abort(context, failure)
        finally:
            elapsed = time.perf_counter() - started
            # The end of the request and its count under one lock.
            label = self._label(name)
            self.metrics.observe_infer(label, outcome, reason, elapsed, finished=True)

    def _infer(self, request: Message, context: grpc.ServicerContext) -> Message:
        self._throttle(context)
        name, version = request.model_name, request.model_version or None
        stage = "decode"
        try:
            decoded = codec.decode_infer(request)
            routing = decoded.parameters.get("routing_key", _metadata_key(context))
            if routing is not None and not isinstance(routing, str):
                raise InputValidationError(
                    "parameter 'routing_key' must be a string", reason="schema"
                )
            inference = InferenceRequest(
                model=name,
                inputs=decoded.inputs,
                version=version,
                routing_key=routing,
                request_id=decoded.request_id,
                payload_bytes=request.ByteSize(),
                parameters=decoded.parameters,
            )
            stage = "service"
            result = self.service.infer(inference)
            stage = "encode"
            # A request without an id gets the one the service gave it (REST feedback names it).
            rid = decoded.request_id or result.request_id
            response = codec.encode_infer(result, request_id=rid, outputs=decoded.outputs)
        except Exception as exc:
            known = stage != "decode" and isinstance(exc, EdgefleetError)
            if known and api_status(exc)[0] != NOT_FOUND_HTTP:
                self._vouch(name)  # the service knew the model: a bounded label
            raise _failure(exc, from_service=stage == "service") from exc
        self._vouch(name)
        self.metrics.count_source(name, result.source)
        self.metrics.set_model_version(name, result.model_version)
        return response


def _one_repository(name: str) -> None:
    """A device has one model repository: a request naming another is refused.

    Raises:
        InputValidationError: ``name`` is not empty.
    """
    index_ready({"repository_name": name})


def _metadata_key(context: grpc.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "x-routing-key" and isinstance(value, str):
            return value
    return None
