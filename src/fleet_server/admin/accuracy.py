"""Admin API route for ground truth: ``GET /v1/models/{name}/accuracy``.

Query: ``hours`` (the window, 1..8784, default 24). The body is
``fleet_server.history.accuracy.model_accuracy``'s: per published version, labelled accuracy
with a 95 % Wilson interval over the fleet and per device group, and the fleet's largest
confusions. An unknown model is a 404; a bad parameter a 400.

Owns: parameter parsing and the JSON response. The work is ``model_accuracy``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fleet_server.admin.body import query_int
from fleet_server.errors import NotFoundError
from fleet_server.history.accuracy import model_accuracy
from fleet_server.registry.store import Registry

__all__ = ["MAX_HOURS", "accuracy_routes"]

Handler = Callable[[Request], Awaitable[Response]]
#: The longest window asked for (a leap year).
MAX_HOURS = 366 * 24


def accuracy_routes(
    registry: Registry, now: Callable[[], datetime], guarded: Callable[[Handler], Handler]
) -> list[Route]:
    """The accuracy route, wrapped in the admin app's ``guarded`` (token + error mapping)."""

    async def accuracy(request: Request) -> Response:
        name = request.path_params["name"]
        hours = query_int(request.query_params, "hours", 24, lo=1, hi=MAX_HOURS)

        def work() -> dict[str, object]:
            if not registry.list_bundles(name):
                raise NotFoundError(f"no published model {name!r}")
            return model_accuracy(registry, name, now() - timedelta(hours=hours))

        return JSONResponse(await run_in_threadpool(work))

    return [Route("/v1/models/{name}/accuracy", guarded(accuracy), methods=["GET"])]
