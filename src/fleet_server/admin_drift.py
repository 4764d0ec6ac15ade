"""Admin API route for fleet drift: ``GET /v1/drift``.

Query: ``model`` (required), ``version`` (integer), ``by`` (``group``, ``device`` or
``tag:KEY``; default the fleet only), ``since``/``until`` (Unix seconds, ISO-8601 or relative
like ``24h``), ``bucket`` (time bucket, e.g. ``1h``), ``views=1`` (include the merged and
baseline views, which charts need) and ``devices=0`` (skip the per-device scoring). The body is
``FleetDriftResult.to_dict()``. Bad parameters are ``FleetDriftError``s, which the admin app's
guard turns into ``400 {"error", "code": "fleet_drift"}``; an unpublished version is a 404.

Owns: parameter parsing and the JSON response. The work is ``DriftService.report``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fleet_server.drift_service import DriftQuery, DriftService, parse_duration, parse_time
from fleet_server.errors import FleetDriftError
from fleet_server.fleet_drift import CohortSpec

__all__ = ["drift_query", "drift_routes"]

Handler = Callable[[Request], Awaitable[Response]]
_TRUE = ("1", "true", "yes")


def drift_query(params: dict[str, str], service: DriftService) -> tuple[DriftQuery, bool]:
    """The query (and whether views were asked for) from URL parameters.

    Raises:
        FleetDriftError: a missing model or a malformed parameter.
    """
    model = params.get("model", "")
    if not model:
        raise FleetDriftError("model is required")
    raw_version = params.get("version") or None
    if raw_version is not None and not raw_version.isdigit():
        raise FleetDriftError(f"version must be a non-negative integer, got {raw_version!r}")
    now = service.now()
    since, until, bucket = (params.get(k) or None for k in ("since", "until", "bucket"))
    query = DriftQuery(
        model=model,
        version=None if raw_version is None else int(raw_version),
        by=CohortSpec.parse(params.get("by")),
        since=None if since is None else parse_time(since, now),
        until=None if until is None else parse_time(until, now),
        bucket_seconds=None if bucket is None else parse_duration(bucket),
        per_device=params.get("devices", "1").lower() in _TRUE,
    )
    return query, params.get("views", "0").lower() in _TRUE


def drift_routes(service: DriftService, guarded: Callable[[Handler], Handler]) -> list[Route]:
    """The drift routes, each wrapped in the admin app's ``guarded`` (token + error mapping)."""

    async def drift(request: Request) -> Response:
        query, views = drift_query(dict(request.query_params), service)
        result = await run_in_threadpool(service.report, query)
        return JSONResponse(result.to_dict(include_views=views))

    return [Route("/v1/drift", guarded(drift), methods=["GET"])]
