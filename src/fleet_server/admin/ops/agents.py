"""Admin API routes of the agent's own software (mounted next to ``fleet_server.admin.api``'s).

Routes (v1), every one behind the admin guard (``admin.create_app``'s ``guarded``, which also
maps our errors to statuses)::

    GET  /v1/agent/releases          {"releases": [release, ...]} (newest first)
    POST /v1/agent/releases          the agent package (``*.efa``) as application/octet-stream
                                     -> 201 release; 400 when it is not an agent package or
                                     not trusted by the builder root
    POST /v1/agent/assign            {"target": ID or GROUP, "group": bool, "release": N}
                                     -> {"results": [{device_id, version, published, error}]}
                                     (a device that does not report the ``agent-update``
                                     capability gets ``published: false`` and nothing is sent)

A release is ``registry.agent_releases.AgentReleaseRecord.to_dict()``. Owns: HTTP shapes; the
checks are the library's (``fleet_server.delivery.library``) and the service's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fleet_server.admin.body import json_object, read_body, req_field
from fleet_server.service import FleetService

__all__ = ["agent_routes"]

Handler = Callable[[Request], Awaitable[Response]]


#: An assignment body is a few fields.
MAX_ASSIGN_BODY = 4096


def agent_routes(
    service: FleetService, max_upload_bytes: int, guarded: Callable[[Handler], Handler]
) -> list[Route]:
    """The agent release routes over ``service``, each wrapped by ``guarded``."""

    async def list_releases(request: Request) -> Response:
        rows = await run_in_threadpool(service.list_agent_releases)
        return JSONResponse({"releases": [r.to_dict() for r in rows]})

    async def publish(request: Request) -> Response:
        data = await read_body(request, max_upload_bytes)
        record = await run_in_threadpool(service.publish_agent_bytes, data)
        return JSONResponse(record.to_dict(), status_code=201)

    async def assign(request: Request) -> Response:
        data = json_object(await read_body(request, MAX_ASSIGN_BODY))
        target = req_field(data, "target", str, limit=128)
        group = req_field(data, "group", bool, False)
        release = req_field(data, "release", int, lo=1)
        results = await run_in_threadpool(
            lambda: service.assign_agent(target, release, group=group)
        )
        return JSONResponse({"results": [asdict(r) for r in results]})

    return [
        Route("/v1/agent/releases", guarded(list_releases), methods=["GET"]),
        Route("/v1/agent/releases", guarded(publish), methods=["POST"]),
        Route("/v1/agent/assign", guarded(assign), methods=["POST"]),
    ]
