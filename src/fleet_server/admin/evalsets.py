"""Admin API routes of labelled evaluation sets (mounted next to ``fleet_server.admin.api``'s).

Routes (v1), every one behind the admin bearer token (the ``guarded`` wrapper of
``admin.create_app``, which also maps our errors to statuses)::

    GET  /v1/evalsets[?model=NAME]         {"evalsets": [registration, ...]} (newest first)
    POST /v1/evalsets?model=NAME&source=TEXT[&note=TEXT]
                                           the set file (``.npz``) as application/octet-stream
                                           -> 201 registration + "new" (false: the same file
                                           was already registered for the model; the first
                                           registration's provenance is kept)
    GET  /v1/evalsets/{sha256}             {"sha256", "registrations": [...]}

A registration is ``registry.evalsets.EvalSetRecord.to_dict()``. A malformed or oversized file
or unprintable provenance answers 422 ``evalset_rejected`` (413 for a body over the cap while
it streams), a malformed digest 400, an unknown one 404 ``evalset_unknown``.

Owns: HTTP shapes. The checks and files are ``fleet_server.evalsets.store``'s.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fleet_server.admin.body import query_text, read_body
from fleet_server.errors import AdminInputError
from fleet_server.evalsets.store import EvalSetStore
from fleet_server.registry.tables.evalsets import MAX_NOTE, MAX_SOURCE

__all__ = ["evalset_routes"]

Handler = Callable[[Request], Awaitable[Response]]
_SHA256 = re.compile(r"[0-9a-f]{64}")


def evalset_routes(store: EvalSetStore, guarded: Callable[[Handler], Handler]) -> list[Route]:
    """The evaluation set routes over ``store``, each wrapped by ``guarded``."""

    async def list_sets(request: Request) -> Response:
        model = query_text(request.query_params, "model", limit=128)
        rows = await run_in_threadpool(store.listing, model)
        return JSONResponse({"evalsets": [r.to_dict() for r in rows]})

    async def add(request: Request) -> Response:
        params = request.query_params
        model = query_text(params, "model", limit=128)
        source = query_text(params, "source", limit=MAX_SOURCE)
        note = query_text(params, "note", limit=MAX_NOTE) or ""
        if model is None or source is None:
            raise AdminInputError("give the model name and the set's source (?model=&source=)")
        data = await read_body(request, store.max_bytes)
        record, new = await run_in_threadpool(
            lambda: store.add(model, data, source=source, note=note)
        )
        return JSONResponse({**record.to_dict(), "new": new}, status_code=201 if new else 200)

    async def show(request: Request) -> Response:
        sha256 = str(request.path_params.get("sha256", ""))
        if not _SHA256.fullmatch(sha256):
            raise AdminInputError("an evaluation set is named by its sha256 (64 hex digits)")
        rows = await run_in_threadpool(store.show, sha256)
        return JSONResponse({"sha256": sha256, "registrations": [r.to_dict() for r in rows]})

    return [
        Route("/v1/evalsets", guarded(list_sets), methods=["GET"]),
        Route("/v1/evalsets", guarded(add), methods=["POST"]),
        Route("/v1/evalsets/{sha256}", guarded(show), methods=["GET"]),
    ]
