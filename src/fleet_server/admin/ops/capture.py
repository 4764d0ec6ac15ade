"""Admin API routes of capture upload and datasets (mounted next to ``fleet_server.admin.api``'s).

Routes (v1); the POSTs are recorded in the audit log by the guard like every state-changing
admin action::

    POST /v1/capture/{model}/enable     {"selector": {"group": "line-3"} | {"devices": [...]},
                                         "sample_ppm": 1000000, "bytes_per_day": 16777216,
                                         "chunk_bytes": 1048576, "drop": ["metadata"],
                                         "ttl_seconds": 3600}
                                        -> 202 {"policy", "commands", "errors"}
    POST /v1/capture/{model}/disable    {"ttl_seconds": 3600} -> 202 (same shape)
    POST /v1/capture/{model}/collect    {"ttl_seconds": 3600} -> 202 (same shape)
    GET  /v1/capture                    {"policies": [policy + devices], "stats": {...}}
                                        (?model=)
    GET  /v1/datasets                   {"datasets": [...]} newest first (?model=, ?limit=)
    GET  /v1/datasets/{sha256}          one dataset with its provenance
    GET  /v1/datasets/{sha256}/export   the flat training file (?format=npz, the default, or
                                        ?format=parquet: the same columns)
    GET  /v1/capture/{model}/export     one training file of every captured row of the model in a
                                        time range, over all its datasets (?since=, ?until=: Unix
                                        seconds, ISO-8601 or relative like 24h; default the 7
                                        days up to until, or now; ?format=npz|parquet)
    POST /v1/datasets/{sha256}/evalset  {"input": name, "note": text}
                                        -> 201 (new) / 200 {"evalset": registration}

Owns: HTTP and JSON shapes. Everything else is ``fleet_server.capture.service``'s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edge_agent.ids import NAME_PATTERN
from edge_agent.trust.capture_settings import MAX_CHUNK_BYTES, MAX_DROPS, SAMPLE_SCALE
from edge_agent.trust.command import MAX_COMMAND_TTL
from fleet_server.admin.body import json_object, query_int, query_text, read_body, req_field
from fleet_server.capture.service import CaptureService, CohortResult
from fleet_server.capture.store import EXPORT_FORMATS
from fleet_server.drift.service import parse_time
from fleet_server.errors import AdminInputError, FleetDriftError
from fleet_server.evalsets.store import EvalSetStore

__all__ = ["capture_routes"]

Handler = Callable[[Request], Awaitable[Response]]
MAX_BODY: Final = 1024 * 1024  # a device list of 10,000 ids
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MEDIA: Final = {"npz": "application/octet-stream", "parquet": "application/vnd.apache.parquet"}
_TTL_MAX: Final = int(MAX_COMMAND_TTL.total_seconds())


def _model(raw: object) -> str:
    text = str(raw)
    if not NAME_PATTERN.fullmatch(text):
        raise AdminInputError(f"invalid model name {text[:64]!r}")
    return text


def _sha(request: Request) -> str:
    raw = str(request.path_params["sha256"])
    if not _SHA256.fullmatch(raw):
        raise AdminInputError("a dataset id is 64 lowercase hex characters")
    return raw


def _fields(data: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(data) - allowed
    if unknown:
        raise AdminInputError(f"unknown fields {sorted(unknown)[:8]}")


def _format(raw: str) -> str:
    if raw not in EXPORT_FORMATS:
        raise AdminInputError(f"format must be one of {', '.join(EXPORT_FORMATS)}")
    return raw


def _ttl(data: dict[str, Any]) -> timedelta:
    return timedelta(seconds=req_field(data, "ttl_seconds", int, 3600, lo=1, hi=_TTL_MAX))


def _sent(result: CohortResult) -> Response:
    return JSONResponse(result.to_dict(), status_code=202)


def capture_routes(
    capture: CaptureService, evalsets: EvalSetStore, guarded: Callable[[Handler], Handler]
) -> list[Route]:
    """The capture and dataset routes, each wrapped by ``guarded``."""

    async def enable(request: Request) -> Response:
        model = _model(request.path_params["model"])
        data = json_object(await read_body(request, MAX_BODY))
        _fields(
            data,
            {"selector", "sample_ppm", "bytes_per_day", "chunk_bytes", "drop", "ttl_seconds"},
        )
        if "selector" not in data:
            raise AdminInputError("missing field 'selector'")
        drop = data.get("drop", [])
        if not isinstance(drop, list) or len(drop) > MAX_DROPS:
            raise AdminInputError(f"field 'drop' must be a list of at most {MAX_DROPS} fields")
        ppm = req_field(data, "sample_ppm", int, SAMPLE_SCALE, lo=0, hi=SAMPLE_SCALE)
        per_day = req_field(data, "bytes_per_day", int, 16 * 1024 * 1024, lo=0, hi=2**40)
        chunk = req_field(data, "chunk_bytes", int, 1024 * 1024, lo=1, hi=MAX_CHUNK_BYTES)
        ttl = _ttl(data)
        result = await run_in_threadpool(
            lambda: capture.enable(
                model,
                data["selector"],
                sample_ppm=ppm,
                bytes_per_day=per_day,
                chunk_bytes=chunk,
                drop=drop,
                ttl=ttl,
            )
        )
        return _sent(result)

    async def disable(request: Request) -> Response:
        model = _model(request.path_params["model"])
        data = json_object(await read_body(request, 4096) or b"{}")
        _fields(data, {"ttl_seconds"})
        ttl = _ttl(data)
        return _sent(await run_in_threadpool(capture.disable, model, ttl))

    async def collect(request: Request) -> Response:
        model = _model(request.path_params["model"])
        data = json_object(await read_body(request, 4096) or b"{}")
        _fields(data, {"ttl_seconds"})
        ttl = _ttl(data)
        return _sent(await run_in_threadpool(capture.collect, model, ttl))

    async def status(request: Request) -> Response:
        raw = request.query_params.get("model")
        model = None if raw is None else _model(raw)
        return JSONResponse(await run_in_threadpool(capture.status, model))

    async def datasets(request: Request) -> Response:
        raw = request.query_params.get("model")
        model = None if raw is None else _model(raw)
        limit = query_int(request.query_params, "limit", 200, lo=1, hi=1000)
        records = await run_in_threadpool(capture.datasets, model, limit)
        return JSONResponse({"datasets": [r.to_dict() for r in records]})

    async def dataset(request: Request) -> Response:
        record = await run_in_threadpool(capture.dataset, _sha(request))
        return JSONResponse(record.to_dict())

    async def export(request: Request) -> Response:
        sha256 = _sha(request)
        fmt = _format(request.query_params.get("format", "npz"))
        data = await run_in_threadpool(capture.store.export, sha256, fmt)
        name = f"dataset-{sha256[:12]}.{fmt}"
        return Response(
            data,
            media_type=_MEDIA[fmt],
            headers={"content-disposition": f'attachment; filename="{name}"'},
        )

    async def export_model(request: Request) -> Response:
        model = _model(request.path_params["model"])
        params = request.query_params
        fmt = _format(params.get("format", "npz"))
        now = datetime.now(UTC)
        since_text = query_text(params, "since", limit=64)
        until_text = query_text(params, "until", limit=64)
        try:
            until = now.timestamp() if until_text is None else parse_time(until_text, now)
            # Without ``since``: the 7 days up to ``until``.
            since = until - 7 * 86400.0 if since_text is None else parse_time(since_text, now)
        except FleetDriftError as exc:
            raise AdminInputError(str(exc)) from exc
        if not (math.isfinite(since) and math.isfinite(until)) or since > until:
            raise AdminInputError("since must be a time before until")
        data = await run_in_threadpool(capture.store.export_model, model, since, until, fmt)
        name = f"{model}-{since:.0f}-{until:.0f}.{fmt}"
        return Response(
            data,
            media_type=_MEDIA[fmt],
            headers={"content-disposition": f'attachment; filename="{name}"'},
        )

    async def register(request: Request) -> Response:
        sha256 = _sha(request)
        data = json_object(await read_body(request, 8192) or b"{}")
        _fields(data, {"input", "note"})
        name = req_field(data, "input", str, None, limit=64)
        note = req_field(data, "note", str, "", limit=1024)
        record, new = await run_in_threadpool(
            lambda: capture.register_evalset(sha256, evalsets, input_name=name, note=note)
        )
        return JSONResponse({"evalset": record.to_dict()}, status_code=201 if new else 200)

    return [
        Route("/v1/capture/{model}/enable", guarded(enable), methods=["POST"]),
        Route("/v1/capture/{model}/disable", guarded(disable), methods=["POST"]),
        Route("/v1/capture/{model}/collect", guarded(collect), methods=["POST"]),
        Route("/v1/capture", guarded(status), methods=["GET"]),
        Route("/v1/capture/{model}/export", guarded(export_model), methods=["GET"]),
        Route("/v1/datasets", guarded(datasets), methods=["GET"]),
        Route("/v1/datasets/{sha256}", guarded(dataset), methods=["GET"]),
        Route("/v1/datasets/{sha256}/export", guarded(export), methods=["GET"]),
        Route("/v1/datasets/{sha256}/evalset", guarded(register), methods=["POST"]),
    ]
