"""Admin API routes that read the audit log, and its output formats (JSON, CSV).

Routes (v1), behind the admin token (the ``guarded`` wrapper of ``admin.create_app``)::

    GET /v1/audit?since=&until=&actor=&action=&object=&limit=&after_id=
        {"entries": [entry, ...]}: newest first; with after_id, ids above it oldest first
    GET /v1/audit/export?format=json|csv[&since=&until=&actor=&action=&object=]
        every matching entry oldest first, read in pages of 1,000 and streamed

An entry is ``registry.audit.AuditEntry.to_dict()``. Output is escaped, never trusted: a CSV
cell whose text starts with ``= + - @`` (or tab, CR) gets a leading ``'`` (OWASP's advice
against formula injection) and control characters are written as ``\\uXXXX``, so an entry is
one CSV line; JSON is ``json.dumps`` (ASCII). Owns: the above. Does not own the recording
(``fleet_server.admin.audit``) nor the queries (``fleet_server.registry.audit``).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any, Final

from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from fleet_server.admin.body import query_int, query_text
from fleet_server.errors import AdminInputError
from fleet_server.registry.audit import MAX_QUERY_LIMIT, AuditEntry, AuditQuery, audit_entries
from fleet_server.registry.store import Registry

__all__ = ["CSV_FIELDS", "EXPORT_PAGE", "audit_query", "audit_routes", "csv_cell", "entries_csv"]

Handler = Callable[[Request], Awaitable[Response]]

EXPORT_PAGE: Final = 1000
CSV_FIELDS: Final = (
    "id", "at", "request_id", "phase", "actor", "client", "action", "object", "status", "code",
    "change",
)  # fmt: skip
_FORMULA = ("=", "+", "-", "@", "\t", "\r")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


def _printable(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def csv_cell(value: Any) -> str:
    """One CSV cell's text: control characters escaped, a formula-like start neutralised."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return ("'" if text.startswith(_FORMULA) else "") + _printable(text)


def _csv_row(values: Iterable[Any]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow([csv_cell(v) for v in values])
    return out.getvalue()


def _csv_entry(entry: AuditEntry) -> str:
    d = entry.to_dict()
    return _csv_row(d[k] for k in CSV_FIELDS)


def entries_csv(entries: Iterable[AuditEntry]) -> Iterator[str]:
    """The CSV text of ``entries``: a header line, then one line per entry (``\\r\\n``)."""
    yield _csv_row(CSV_FIELDS)
    for e in entries:
        yield _csv_entry(e)


def _when(params: Mapping[str, str], name: str) -> datetime | None:
    raw = query_text(params, name, limit=64)
    if raw is None:
        return None
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise AdminInputError(f"{name} must be an ISO 8601 time with a UTC offset") from None
    if when.tzinfo is None:
        raise AdminInputError(f"{name} must be an ISO 8601 time with a UTC offset")
    return when


def audit_query(params: Mapping[str, str], *, limit: int, after_id: int | None) -> AuditQuery:
    """The filter of an audit request's query values.

    Raises:
        AdminInputError: a value is malformed, too long or out of range.
    """
    return AuditQuery(
        since=_when(params, "since"),
        until=_when(params, "until"),
        actor=query_text(params, "actor", limit=160),
        action=query_text(params, "action", limit=160),
        object=query_text(params, "object", limit=300),
        after_id=after_id,
        limit=limit,
    )


def _pages(registry: Registry, query: AuditQuery) -> Iterator[AuditEntry]:
    after = 0
    while True:
        page = audit_entries(
            registry,
            AuditQuery(
                query.since, query.until, query.actor, query.action, query.object, after,
                EXPORT_PAGE,
            ),
        )  # fmt: skip
        yield from page
        if len(page) < EXPORT_PAGE:
            return
        after = page[-1].id


def _json_lines(entries: Iterator[AuditEntry]) -> Iterator[str]:
    yield '{"entries": ['
    first = True
    for e in entries:
        yield ("" if first else ",") + "\n" + json.dumps(e.to_dict(), sort_keys=True)
        first = False
    yield "\n]}\n"


def audit_routes(registry: Registry, guarded: Callable[[Handler], Handler]) -> list[Route]:
    """The audit log's read routes over ``registry``, each wrapped by ``guarded``."""

    async def listing(request: Request) -> Response:
        params = request.query_params
        after_id = query_int(params, "after_id", 0) if "after_id" in params else None
        query = audit_query(
            params,
            limit=query_int(params, "limit", 100, lo=1, hi=MAX_QUERY_LIMIT),
            after_id=after_id,
        )
        rows = await run_in_threadpool(audit_entries, registry, query)
        return JSONResponse({"entries": [e.to_dict() for e in rows]})

    async def export(request: Request) -> Response:
        params = request.query_params
        fmt = params.get("format", "json")
        if fmt not in {"json", "csv"}:
            raise AdminInputError("format must be json or csv")
        query = audit_query(params, limit=EXPORT_PAGE, after_id=None)
        entries = _pages(registry, query)
        # The first page is read before the answer starts, so a database that is down answers
        # 503; a failure later can only cut the stream (the client sees a short body).
        first = await run_in_threadpool(lambda: list(itertools.islice(entries, 1)))
        entries = itertools.chain(first, entries)
        lines = entries_csv(entries) if fmt == "csv" else _json_lines(entries)

        async def body() -> AsyncIterator[str]:
            async for chunk in iterate_in_threadpool(lines):
                yield chunk

        media = "text/csv; charset=utf-8" if fmt == "csv" else "application/json"
        return StreamingResponse(
            body(),
            media_type=media,
            headers={"content-disposition": f'attachment; filename="audit.{fmt}"'},
        )

    return [
        Route("/v1/audit", guarded(listing), methods=["GET"]),
        Route("/v1/audit/export", guarded(export), methods=["GET"]),
    ]
