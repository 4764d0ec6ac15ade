"""The agent's local Open Inference Protocol (KServe v2) HTTP API, as a Starlette app.

Owns ``create_app``: the route table (the core v2 routes, the ground-truth ``feedback``
extension, and the model repository extension's routes when ``[api] repository_control`` is
on), the app's lifespan (the inference worker threads stop with it), the handlers of unknown
routes and unexpected errors, and ``limiter_from_config`` (the per-client rate limiter the
config asks for). Does not own what the endpoints do, their error mapping, limits, metrics or
threads (``edge_agent.api.endpoints``), the repository extension's endpoints (``repository``),
the raw ASGI fast path (``fastpath``) or listening on sockets (``server``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge_agent.api.endpoints import V2Endpoints
from edge_agent.api.fastpath import FastInferApp, error_response
from edge_agent.api.metrics import ApiMetrics
from edge_agent.api.outcomes import INTERNAL_HTTP
from edge_agent.api.repository import RepositoryRoutes, RepositoryService
from edge_agent.common.ratelimit import DEFAULT_MAX_CLIENTS, Clock, RateLimiter
from edge_agent.config import ApiConfig
from edge_agent.errors import ConfigError
from edge_agent.serving.service import InferenceService

__all__ = ["DEFAULT_MAX_CONCURRENCY", "create_app", "limiter_from_config"]

DEFAULT_MAX_CONCURRENCY = 16


async def _http_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPException):  # unknown route, wrong method
        return error_response(exc.status_code, str(exc.detail), dict(exc.headers or {}))
    # Never the exception's text: it may hold internals.
    return error_response(INTERNAL_HTTP, "internal error")


def limiter_from_config(
    config: ApiConfig, *, clock: Clock = time.monotonic, max_clients: int = DEFAULT_MAX_CLIENTS
) -> RateLimiter:
    """The per-client limiter ``config`` asks for (``rate_limit_per_second``, ``rate_limit_burst``).

    Raises:
        ConfigError: the configured values are invalid.
    """
    return RateLimiter(
        config.rate_limit_per_second, config.rate_limit_burst, clock=clock, max_clients=max_clients
    )


def create_app(
    service: InferenceService,
    config: ApiConfig,
    metrics: ApiMetrics | None = None,
    *,
    rate_limiter: RateLimiter | None = None,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
) -> Starlette:
    """Build the v2 API app over ``service``.

    Args:
        service: the agent (or a fake) that answers.
        config: limits (``max_request_bytes``, rate limit); listening is ``server.serve``'s job.
        metrics: where to count; a fresh ``ApiMetrics`` (own registry) by default.
        rate_limiter: per-client limiter; built from ``config`` with the monotonic clock by
            default (tests inject one with a fake clock).
        max_concurrency: inference calls running at once in worker threads; more wait.

    Returns:
        The app; ``app.state.metrics`` and ``app.state.rate_limiter`` expose the hooks, and
        ``app.state.repository`` the repository service when ``repository_control`` is on.

    Raises:
        ConfigError: ``config`` or ``max_concurrency`` is invalid, or ``repository_control``
            is on and ``service`` has no repository (``api.repository.RepositoryService``).
    """
    config.validate()
    if max_concurrency < 1:
        raise ConfigError("max_concurrency must be >= 1")
    repository: RepositoryService | None = None
    if config.repository_control:
        if not isinstance(service, RepositoryService):
            raise ConfigError("api.repository_control: the service has no model repository")
        repository = service
    api = V2Endpoints(
        service,
        config,
        metrics if metrics is not None else ApiMetrics(),
        rate_limiter if rate_limiter is not None else limiter_from_config(config),
        max_concurrency,
    )
    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    # The router tries routes in order: the hot path goes first.
    routes = [
        Route(prefix + "/infer", api.infer, methods=["POST"]) for prefix in (model, versioned)
    ]
    routes += [
        Route("/v2/health/live", api.live, methods=["GET"]),
        Route("/v2/health/ready", api.ready, methods=["GET"]),
        Route("/v2", api.server_metadata, methods=["GET"]),
        Route("/metrics", api.metrics_text, methods=["GET"]),
    ]
    for prefix in (model, versioned):
        routes += [
            Route(prefix, api.model_metadata, methods=["GET"]),
            Route(prefix + "/ready", api.model_ready, methods=["GET"]),
            Route(prefix + "/feedback", api.feedback, methods=["POST"]),
        ]
    if repository is not None:
        routes += RepositoryRoutes(repository, api.metrics, api.limiter).routes()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            api.close()

    app = FastInferApp(
        routes=routes,
        exception_handlers={HTTPException: _http_error, Exception: _http_error},
        lifespan=lifespan,
    )
    app.fast_infer = api.infer_scope
    api.metrics.watch_decode_budget(api.budget)
    app.state.metrics = api.metrics
    app.state.rate_limiter = api.limiter
    app.state.repository = repository
    return app
