"""The raw ASGI fast path of the v2 API: ``POST .../infer`` without Starlette's router.

Owns: dispatching the unversioned infer route before routing (``FastInferApp``), reading the
three headers that request needs in one pass (``infer_headers``) and its body straight from
``receive`` (``read_body``), building a 200 answer's raw headers directly (``InferAnswer``), and
the protocol's ``{"error": ...}`` / JSON responses shared by every endpoint (``error_response``,
``json_response``). Does not own the endpoints, limits, error mapping or metrics
(``edge_agent.api.endpoints``), tensor decoding (``edge_agent.api.codec``) or sockets
(``edge_agent.api.server``).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from edge_agent.api import codec
from edge_agent.errors import INTERNAL_STATUS

JSON = "application/json"
OCTETS = "application/octet-stream"


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """The protocol's error response: ``{"error": message}`` with ``status``."""
    body = codec.to_json({"error": message})
    return Response(body, status_code=status, media_type=JSON, headers=headers)


def json_response(document: Any) -> Response:
    """A 200 JSON response, encoded like every other body of the API (``codec.to_json``)."""
    return Response(codec.to_json(document), media_type=JSON)


_JSON_TYPE = (b"content-type", JSON.encode())
_OCTETS_TYPE = (b"content-type", OCTETS.encode())


class InferAnswer(Response):
    """A 200 answer with its raw headers built directly (the infer hot path).

    The same bytes on the wire as ``Response(body, media_type=..., headers=...)``, without the
    generic header normalisation that costs a few microseconds per request.
    """

    def __init__(self, body: bytes, header_length: int | None) -> None:
        self.status_code = 200
        self.background = None
        self.body = body
        length = (b"content-length", str(len(body)).encode())
        if header_length is None:
            self.raw_headers = [length, _JSON_TYPE]
        else:
            self.media_type = OCTETS
            inference = (b"inference-header-content-length", str(header_length).encode())
            self.raw_headers = [inference, length, _OCTETS_TYPE]


_FAST_INFER = re.compile(r"/v2/models/([^/]+)/infer")


class FastInferApp(Starlette):
    """Starlette, with ``POST /v2/models/{name}/infer`` dispatched before the router.

    The hot path skips route matching, the middleware stack and Starlette's ``Request`` (about
    a fifth of the CPU of a batch-1 request): it reads the three headers it needs in one pass
    and the body straight from ``receive``. Everything else, including every error path of
    other routes, goes through Starlette as usual. ``infer`` turns its own failures into
    protocol errors, and anything unexpected becomes the same opaque 500 the exception handler
    gives.
    """

    fast_infer: Callable[[Scope, Receive, str, str | None], Awaitable[Response]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and self.fast_infer is not None:
            match = _FAST_INFER.fullmatch(scope["path"])
            if match is not None:
                scope["app"] = self
                name = match.group(1)
                scope["path_params"] = {"name": name}
                try:
                    response = await self.fast_infer(scope, receive, name, None)
                except Exception:  # never the exception's text: it may hold internals
                    response = error_response(INTERNAL_STATUS[0], "internal error")
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def infer_headers(raw: list[tuple[bytes, bytes]]) -> tuple[str | None, str | None, str | None]:
    """Content-Length, Inference-Header-Content-Length and X-Routing-Key in one pass.

    ASGI servers give lower-cased names; the first occurrence wins, as with Starlette's
    ``Headers.get``; values are latin-1, as Starlette decodes them.
    """
    declared = header_length = routing = None
    for key, value in raw:
        if key == b"content-length":
            if declared is None:
                declared = value.decode("latin-1")
        elif key == b"inference-header-content-length":
            if header_length is None:
                header_length = value.decode("latin-1")
        elif key == b"x-routing-key" and routing is None:
            routing = value.decode("latin-1")
    return declared, header_length, routing


async def read_prefix(receive: Receive, limit: int) -> tuple[list[bytes], bool]:
    """The body's first chunks, until it ends (True) or more than ``limit`` bytes came (False).

    For a body of unknown length: a short one is read whole, a long one is continued with
    ``read_body(receive, max_bytes, chunks)``.

    Raises:
        ClientDisconnect: the client went away before the body was complete.
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                chunks.append(chunk)
                size += len(chunk)
            if not message.get("more_body", False):
                return chunks, True
            if size > limit:
                return chunks, False
        elif kind == "http.disconnect":
            raise ClientDisconnect()


async def read_body(
    receive: Receive, max_bytes: int, prefix: list[bytes] | None = None
) -> bytes | None:
    """The body, or ``None`` once it exceeds ``max_bytes`` (whatever Content-Length said).

    Reads ``receive`` as Starlette's ``Request.stream`` does, without its async generator;
    ``prefix`` holds chunks already read (``read_prefix``) of a body not yet complete.

    Raises:
        ClientDisconnect: the client went away before the body was complete.
    """
    chunks: list[bytes] = prefix if prefix is not None else []
    size = sum(map(len, chunks))
    if size > max_bytes:
        return None
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "http.request":
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_bytes:
                return None
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        elif kind == "http.disconnect":
            raise ClientDisconnect()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
