"""The handlers of the agent's local Open Inference Protocol (KServe v2) HTTP API.

Owns ``V2Endpoints``: what each v2 endpoint does with a request (health, server and model
metadata, model ready, infer, the ground-truth ``feedback`` this API adds, whose body
``edge_agent.api.feedback`` owns, and ``/metrics``), their HTTP error mapping, size and rate
limits and metrics accounting, and the worker threads inference runs in. Does not own the app
around them (the route table, lifespan, exception handlers and the rate limiter built from
config: ``edge_agent.api.app``), what it shares with gRPC (``outcomes``), the raw ASGI fast
path and the shared JSON/error responses (``fastpath``), decoding tensors (``codec``), the
repository extension's endpoints (``repository``), running models (the service) or listening
on sockets (``server``).

Error mapping, always as the protocol's ``{"error": "<message>"}``; every status comes from the one
table ``edge_agent.errors.ERRORS`` (which gives gRPC its codes too) or, for the few answers with
no error family behind them (not ready, read timeout, too large, internal), its constants there:
    400 undecodable or invalid request (message names the validation reason and field)
    404 unknown model or version, unknown route, or a feedback id whose answer is not remembered
    413 body larger than ``max_request_bytes`` (Content-Length checked first, the stream capped)
    408 body not received within ``body_read_seconds``
    429 client over its rate limit, with ``Retry-After``
    503 the model or the cloud fallback cannot answer; not live / not ready
    500 anything else: a generic message, never a traceback (the traceback goes to the log)

Clients: a TCP client is its peer IP; every Unix-socket client is the one client ``"uds"``
(uvicorn does not expose the socket's peer credentials to the app, and the socket file is 0660 so
only the agent's group can connect). ``X-Forwarded-For`` is never trusted (``server`` turns proxy
headers off). Sticky A/B: the ``routing_key`` request parameter, else the ``X-Routing-Key`` header.

Threads: ``service.infer`` runs in a pool of ``max_concurrency`` worker threads (more requests
wait), so the event loop never blocks on a slow model or a cloud call; a model whose smoothed
service time is below ``INLINE_SERVICE_S`` runs on the loop (cheaper than the thread hop), that
time being the CPU time of a device answer (waits for the GIL or for a shared CPU are not the
model's cost) and the wall time of a cloud answer or a failure; a model that batches concurrent
requests (``InferenceResult.batched``) always runs in the pool, since a batch needs calls in
flight together and the loop runs one at a time. Decoding and encoding of large
bodies run in the pool too, while small ones (tens of microseconds) stay on the loop.
The pool is a plain ``ThreadPoolExecutor``: anyio's ``to_thread`` hop measured ~40% more CPU per
request. Other service calls use Starlette's default pool: probes never queue behind inferences.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope

from edge_agent.api import codec
from edge_agent.api import metrics as m
from edge_agent.api.budget import MAX_COST_RATIO, MemoryBudget, admit
from edge_agent.api.decode import REASON_SCHEMA
from edge_agent.api.fastpath import (
    JSON,
    InferAnswer,
    error_response,
    infer_headers,
    json_response,
    read_body,
)
from edge_agent.api.feedback import MAX_FEEDBACK_BYTES, answer_feedback
from edge_agent.api.header_cache import RequestDecoder
from edge_agent.api.metadata import EXTENSIONS, protocol_metadata
from edge_agent.api.metrics import ApiMetrics
from edge_agent.api.outcomes import (
    INTERNAL_HTTP,
    OUTCOME_BY_STATUS,
    RATE_LIMITED_STATUS,
    UDS_CLIENT,
    describe,
)
from edge_agent.api.repository import EXTENSION
from edge_agent.common.ratelimit import RateLimiter
from edge_agent.config import ApiConfig
from edge_agent.errors import (
    DISCONNECTED_HTTP,
    ERRORS,
    NOT_READY_HTTP,
    READ_TIMEOUT_HTTP,
    TOO_LARGE_STATUS,
    EdgefleetError,
    InputValidationError,
    ModelNotFoundError,
    api_status,
)
from edge_agent.serving.service import (
    SOURCE_DEVICE,
    InferenceRequest,
    InferenceResult,
    InferenceService,
)

__all__ = ["INLINE_BYTES", "INLINE_ELEMENTS", "INLINE_SERVICE_S", "V2Endpoints"]

logger = logging.getLogger(__name__)

# Below these sizes decoding / encoding costs tens of microseconds: cheaper on the event loop than
# a thread hop (and the GIL hand-offs it brings); above them it moves to the worker threads.
INLINE_BYTES = 64 * 1024
INLINE_ELEMENTS = 16 * 1024
# Models whose smoothed service time is below this (1 ms) run inline on the event loop. A device
# answer's service time is the CPU time of the thread that ran it (a model with N intra-op
# threads may so take up to N ms on the loop); a cloud answer's or a failure's, its wall time.
INLINE_SERVICE_S = 0.001
# Below this smoothed service time a device answer's CPU time is not read (see _run_service).
_MEASURE_ABOVE_S = INLINE_SERVICE_S / 2
_MAX_KNOWN_MODELS = 256
_INVALID_HTTP = ERRORS.api_status(InputValidationError)[0]
_T = TypeVar("_T")
_Outcome = tuple[str, str, Response]


def _elements(outputs: Mapping[str, Any]) -> int:
    """Elements in the outputs (arrays from the device; whatever the cloud sent otherwise)."""
    total = 0
    for value in outputs.values():
        total += value.size if type(value) is np.ndarray else int(np.size(value))
    return total


def _target(request: Request) -> tuple[str, str | None]:
    params = request.path_params
    return params["name"], params.get("version")


class V2Endpoints:
    """The v2 endpoints, sharing one service, limiter and metrics (see the module docstring)."""

    def __init__(
        self,
        service: InferenceService,
        config: ApiConfig,
        metrics: ApiMetrics,
        limiter: RateLimiter,
        max_concurrency: int,
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.limiter = limiter
        self.max_bytes = config.max_request_bytes
        self.read_seconds = config.body_read_seconds
        self.max_concurrency = max_concurrency
        self.decoder = RequestDecoder()  # remembers binary requests' JSON headers
        self.budget = MemoryBudget(config.max_decode_memory_bytes)
        self.extensions = [*EXTENSIONS, *([EXTENSION] if config.repository_control else [])]
        self._pool: ThreadPoolExecutor | None = None
        # Smoothed service time per model: fast models run on the event loop (the thread hop
        # costs more CPU than their inference), slow ones in the pool so the loop stays free.
        self._service_s: dict[str, float] = {}
        # Models that batch concurrent requests: always run in the worker pool.
        self._pooled: set[str] = set()
        # Model names the service has vouched for; anything else is UNKNOWN_MODEL in metrics, so
        # clients cannot grow label cardinality by requesting made-up names.
        self._known: set[str] = set()

    def _label(self, name: str) -> str:
        return name if name in self._known else m.UNKNOWN_MODEL

    def _vouch(self, name: str) -> None:
        if len(self._known) < _MAX_KNOWN_MODELS:
            self._known.add(name)

    def _throttled(self, scope: Scope) -> _Outcome | None:
        client = scope.get("client")
        wait = self.limiter.acquire(client[0] if client else UDS_CLIENT)
        if wait <= 0:
            return None
        headers = {"Retry-After": str(max(1, math.ceil(wait)))}
        response = error_response(
            RATE_LIMITED_STATUS[0], f"rate limited; retry in {wait:.3f}s", headers
        )
        return m.OUTCOME_RATE_LIMITED, m.OUTCOME_RATE_LIMITED, response

    def _failure(self, exc: Exception, stage: str = "service") -> _Outcome:
        # The status is the one error table's (edge_agent.errors.ERRORS), as for gRPC.
        status, _ = api_status(exc, from_service=stage == "service")
        if isinstance(exc, InputValidationError):
            return m.OUTCOME_INVALID, exc.reason, error_response(status, describe(exc))
        code = exc.code if isinstance(exc, EdgefleetError) else "exception"
        if status in OUTCOME_BY_STATUS:
            headers = {"Retry-After": "1"} if status == RATE_LIMITED_STATUS[0] else None
            return (
                OUTCOME_BY_STATUS[status],
                code,
                error_response(status, str(exc) or code, headers),
            )
        logger.error("inference API %s failed (%s)", stage, code, exc_info=exc)
        return m.OUTCOME_ERROR, code, error_response(INTERNAL_HTTP, f"internal error ({code})")

    # --- health and metadata -------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return await self._probe(self.service.live, "live")

    async def ready(self, request: Request) -> Response:
        """Server ready as KServe v2 defines it: every model ready; a 503 names who is not, why.

        The reasons come from the service's ``not_ready()`` (model -> why); per-model
        readiness is ``/v2/models/{name}/ready``.
        """
        response = await self._probe(self.service.ready, "ready")
        if response.status_code == 200:
            return response
        try:
            why = await run_in_threadpool(self.service.not_ready)
            models = {str(k): str(v) for k, v in dict(why).items()}
        except Exception:
            logger.exception("ready probe: reasons unavailable")
            return response
        text = "; ".join(f"model {n!r} {r}" for n, r in sorted(models.items()))
        body = {"error": f"server is not ready: {text or 'no model installed'}", "models": models}
        return Response(codec.to_json(body), status_code=NOT_READY_HTTP, media_type=JSON)

    async def _probe(self, check: Any, what: str) -> Response:
        try:
            ok = bool(await run_in_threadpool(check))
        except Exception:
            logger.exception("%s probe failed", what)
            ok = False
        return (
            json_response({what: True})
            if ok
            else error_response(NOT_READY_HTTP, f"server is not {what}")
        )

    async def server_metadata(self, request: Request) -> Response:
        try:
            meta = dict(await run_in_threadpool(self.service.server_metadata))
        except Exception as exc:
            return self._failure(exc)[2]
        # Only what this API implements, whatever the service claims: a client that sees an
        # extension calls its endpoints (the model repository's only with repository_control).
        meta["extensions"] = list(self.extensions)
        return json_response(meta)

    async def model_metadata(self, request: Request) -> Response:
        return await self._model_call(request, "metadata", self.service.model_metadata)

    async def model_ready(self, request: Request) -> Response:
        return await self._model_call(request, "model_ready", self.service.model_ready)

    async def _model_call(self, request: Request, endpoint: str, call: Any) -> Response:
        name, version = _target(request)
        outcome = self._throttled(request.scope) or await self._lookup(
            endpoint, call, name, version
        )
        self.metrics.count_request(endpoint, self._label(name), outcome[0], outcome[1])
        return outcome[2]

    async def _lookup(self, endpoint: str, call: Any, name: str, version: str | None) -> _Outcome:
        try:
            value = await run_in_threadpool(call, name, version)
        except Exception as exc:
            return self._failure(exc)
        self._vouch(name)
        if endpoint == "metadata" or value:
            document = protocol_metadata(value) if endpoint == "metadata" else None
            response = json_response(document or {"name": name, "ready": True})
            return m.OUTCOME_OK, m.NO_REASON, response
        suffix = "" if version is None else f" version {version!r}"
        response = error_response(NOT_READY_HTTP, f"model {name!r}{suffix} is not ready")
        return m.OUTCOME_UNAVAILABLE, "not_ready", response

    # --- inference -----------------------------------------------------------------------

    async def infer(self, request: Request) -> Response:
        """``POST .../infer`` through Starlette's router (the versioned route)."""
        name, version = _target(request)
        return await self.infer_scope(request.scope, request.receive, name, version)

    async def infer_scope(
        self, scope: Scope, receive: Receive, name: str, version: str | None
    ) -> Response:
        """One inference request, from the ASGI scope and ``receive`` (the hot path)."""
        started = time.perf_counter()
        self.metrics.request_started()
        try:
            outcome, reason, response = await self._infer(scope, receive, name, version)
        except BaseException:
            self.metrics.request_finished()
            raise
        elapsed = time.perf_counter() - started
        # The end of the request and its count under one lock.
        self.metrics.observe_infer(self._label(name), outcome, reason, elapsed, finished=True)
        return response

    async def _infer(
        self, scope: Scope, receive: Receive, name: str, version: str | None
    ) -> _Outcome:
        limited = self._throttled(scope)
        if limited is not None:
            return limited
        declared, header_length, routing = infer_headers(scope["headers"])
        if declared is not None and not (declared.isascii() and declared.isdigit()):
            return (
                m.OUTCOME_INVALID,
                "content_length",
                error_response(_INVALID_HTTP, "invalid Content-Length"),
            )
        if declared is not None and int(declared) > self.max_bytes:
            return self._too_large(int(declared))
        if declared is not None and int(declared) <= INLINE_BYTES:
            # Decoded on the event loop, one at a time: its cost is bounded without a budget.
            try:
                body = await read_body(receive, self.max_bytes)
            except ClientDisconnect:
                return (
                    m.OUTCOME_ABORTED,
                    "disconnect",
                    error_response(DISCONNECTED_HTTP, "client disconnected"),
                )
            if body is None:
                return self._too_large(None)
            return await self._answer(name, version, body, header_length, routing)
        try:
            async with admit(
                receive,
                self.budget,
                declared=None if declared is None else int(declared),
                header_length=header_length,
                max_bytes=self.max_bytes,
                small=INLINE_BYTES,
                read_seconds=self.read_seconds,
            ) as admitted:
                if admitted.refusal == "decode_memory":
                    return self._too_costly(admitted.cost)
                if admitted.refusal == "read_timeout":
                    message = f"request body not received within {self.read_seconds} s"
                    response = error_response(READ_TIMEOUT_HTTP, message, {"Connection": "close"})
                    return m.OUTCOME_ABORTED, "read_timeout", response
                if admitted.refusal is not None:
                    return self._too_large(None)
                return await self._answer(name, version, admitted.body, header_length, routing)
        except ClientDisconnect:
            return (
                m.OUTCOME_ABORTED,
                "disconnect",
                error_response(DISCONNECTED_HTTP, "client disconnected"),
            )

    def _too_costly(self, cost: int) -> _Outcome:
        message = (
            f"decoding this body could take {cost} bytes of memory; the API decodes at most "
            f"{self.budget.total} bytes at once and {MAX_COST_RATIO} bytes per body byte"
        )
        return m.OUTCOME_TOO_LARGE, "decode_memory", error_response(TOO_LARGE_STATUS[0], message)

    def _too_large(self, size: int | None) -> _Outcome:
        got = "" if size is None else f" ({size} bytes)"
        message = f"request body too large{got}; the limit is {self.max_bytes} bytes"
        response = error_response(TOO_LARGE_STATUS[0], message, {"Connection": "close"})
        return m.OUTCOME_TOO_LARGE, "payload_too_large", response

    async def _run_service(self, name: str, request: InferenceRequest) -> InferenceResult:
        ewma = self._service_s.get(name)
        # The thread's CPU clock is a system call (the wall clock is not): read it only when
        # this request may move the model across INLINE_SERVICE_S. Well below it, a device
        # answer counts its wall time capped at INLINE_SERVICE_S (its CPU time is at most its
        # wall time), so an unmeasured call, preempted or not, never pushes the average over;
        # one that took longer than that has the next call measured.
        measure = ewma is None or ewma >= _MEASURE_ABOVE_S

        def timed() -> InferenceResult:
            wall = time.perf_counter()
            cpu = time.thread_time() if measure else 0.0
            result: InferenceResult | None = None
            try:
                result = self.service.infer(request)
                return result
            finally:
                # A device answer costs what its thread computed: the wall time of a call also
                # counts waits for the GIL and for a CPU shared with other processes, which
                # offloading then makes longer (worker threads contend with the loop for the
                # GIL), so one preempted call used to push a fast model into the pool, where it
                # stayed, starving the loop: the periodic tail stall under load. A cloud answer
                # or a failure may have waited on the network: its wall time counts.
                if result is not None and result.batched:
                    # Batching needs calls in flight together; the loop runs one at a time.
                    self._pooled.add(name)
                elif result is not None:
                    self._pooled.discard(name)
                took = time.perf_counter() - wall
                floor = 0.0
                if result is not None and result.source == SOURCE_DEVICE:
                    if measure:
                        took = time.thread_time() - cpu
                    elif took >= INLINE_SERVICE_S:
                        took, floor = INLINE_SERVICE_S, _MEASURE_ABOVE_S
                old = self._service_s.get(name)
                new = took if old is None else 0.9 * old + 0.1 * took
                self._service_s[name] = max(new, floor)

        if ewma is not None and ewma < INLINE_SERVICE_S and name not in self._pooled:
            return timed()
        return await self._offload(timed)

    async def _offload(self, func: Callable[..., _T], *args: Any) -> _T:
        # On cancellation (a drain timeout) the await ends at once; a running call is abandoned.
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_concurrency, "edgefleet-api")
        return await asyncio.get_running_loop().run_in_executor(self._pool, func, *args)

    def close(self) -> None:
        """Let the worker threads go once their calls end (app shutdown)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    async def _answer(
        self,
        name: str,
        version: str | None,
        body: bytes,
        header_length: str | None,
        routing_header: str | None,
    ) -> _Outcome:
        stage = "decode"
        try:
            if len(body) <= INLINE_BYTES:
                decoded = self.decoder.decode(body, header_length)
            else:
                decoded = await self._offload(self.decoder.decode, body, header_length)
            routing = decoded.parameters.get("routing_key", routing_header)
            if routing is not None and not isinstance(routing, str):
                raise InputValidationError(
                    "parameter 'routing_key' must be a string", reason=REASON_SCHEMA
                )
            request = InferenceRequest(
                model=name,
                inputs=decoded.inputs,
                version=version,
                routing_key=routing,
                request_id=decoded.request_id,
                payload_bytes=len(body),
                parameters=decoded.parameters,
            )
            stage = "service"
            result = await self._run_service(name, request)
            stage = "encode"
            encode = functools.partial(
                codec.encode_response,
                result,
                # A request without an id gets the one the service gave it (for feedback).
                request_id=decoded.request_id or result.request_id,
                outputs=decoded.outputs,
                binary_output=decoded.binary_output,
            )
            small = _elements(result.outputs) <= INLINE_ELEMENTS
            encoded = encode() if small else await self._offload(encode)
        except Exception as exc:
            answered = stage != "decode" and isinstance(exc, EdgefleetError)
            if answered and not isinstance(exc, ModelNotFoundError):
                self._vouch(name)  # the service knew the model: it is a bounded label
            return self._failure(exc, stage)
        self._vouch(name)
        self.metrics.count_source(name, result.source)
        self.metrics.set_model_version(name, result.model_version)
        return m.OUTCOME_OK, m.NO_REASON, InferAnswer(encoded.body, encoded.header_length)

    async def feedback(self, request: Request) -> Response:
        """``POST .../feedback``: the true answer of earlier requests (``api.feedback``)."""
        name, version = _target(request)
        outcome = self._throttled(request.scope) or await self._feedback(request, name, version)
        self.metrics.count_request("feedback", self._label(name), outcome[0], outcome[1])
        return outcome[2]

    async def _feedback(self, request: Request, name: str, version: str | None) -> _Outcome:
        try:
            body = await read_body(request.receive, min(self.max_bytes, MAX_FEEDBACK_BYTES))
        except ClientDisconnect:
            return (
                m.OUTCOME_ABORTED,
                "disconnect",
                error_response(DISCONNECTED_HTTP, "client disconnected"),
            )
        if body is None:
            return self._too_large(None)
        try:
            document = await run_in_threadpool(answer_feedback, self.service, name, version, body)
        except Exception as exc:
            return self._failure(exc)
        self._vouch(name)
        return m.OUTCOME_OK, m.NO_REASON, json_response(document)

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=m.CONTENT_TYPE)
