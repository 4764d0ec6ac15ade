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

from fleet_server.admin.body import MAX_ID, query_int, query_text
from fleet_server.drift.cohorts import CohortSpec
from fleet_server.drift.service import DriftQuery, DriftService, parse_duration, parse_time
from fleet_server.errors import AdminInputError, FleetDriftError

__all__ = ["drift_query", "drift_routes"]

Handler = Callable[[Request], Awaitable[Response]]
_TRUE = ("1", "true", "yes")
# Times are Unix seconds: anything outside 1970..~5138 is not a time a report can cover.
_MAX_TIME = 1e11
_MAX_BUCKET = 366 * 86400.0


def drift_query(params: dict[str, str], service: DriftService) -> tuple[DriftQuery, bool]:
    """The query (and whether views were asked for) from URL parameters.

    Raises:
        FleetDriftError: a missing model or a malformed parameter (also one that is too long,
            holds control characters, or is out of range).
    """
    try:
        model = query_text(params, "model", limit=128)
        version = query_int(params, "version", -1, lo=0, hi=MAX_ID)
        by, since, until, bucket = (
            query_text(params, k, limit=64) for k in ("by", "since", "until", "bucket")
        )
    except AdminInputError as exc:
        raise FleetDriftError(str(exc)) from exc
    if not model:
        raise FleetDriftError("model is required")
    now = service.now()
    query = DriftQuery(
        model=model,
        version=None if version < 0 else version,
        by=CohortSpec.parse(by),
        since=_seconds(since, "since", lambda t: parse_time(t, now), _MAX_TIME),
        until=_seconds(until, "until", lambda t: parse_time(t, now), _MAX_TIME),
        bucket_seconds=_seconds(bucket, "bucket", parse_duration, _MAX_BUCKET),
        per_device=params.get("devices", "1").lower() in _TRUE,
    )
    return query, params.get("views", "0").lower() in _TRUE


def _seconds(text: str | None, name: str, parse: Callable[[str], float], hi: float) -> float | None:
    """``parse(text)`` within ``0..hi``; only ASCII reaches the parser (``"²".isdigit()``)."""
    if text is None:
        return None
    if not text.isascii():
        raise FleetDriftError(f"{name} must be ASCII, got {text!r}")
    try:
        value = parse(text)
    except (ValueError, OverflowError) as exc:
        raise FleetDriftError(f"{name} is not a time or duration: {text!r}") from exc
    if not 0 <= value <= hi:
        raise FleetDriftError(f"{name} is out of range (0..{hi:.0f} seconds)")
    return value


def drift_routes(service: DriftService, guarded: Callable[[Handler], Handler]) -> list[Route]:
    """The drift routes, each wrapped in the admin app's ``guarded`` (token + error mapping)."""

    async def drift(request: Request) -> Response:
        query, views = drift_query(dict(request.query_params), service)
        result = await run_in_threadpool(service.report, query)
        return JSONResponse(result.to_dict(include_views=views))

    return [Route("/v1/drift", guarded(drift), methods=["GET"])]
