"""Reading admin API input: capped bodies, strict JSON, bounded query values, clean messages.

Every admin route (``fleet_server.admin.api``, ``admin_rollouts``, ``admin_drift``) reads its input
through these helpers, so hostile input answers a 4xx with a typed ``{"error", "code"}`` body:

    body over its cap (declared or streamed)     413 too_large
    body not UTF-8 / not JSON / past the limits  400 bad_json  (``edge_agent.strict_json``:
        of ``strict_json`` (depth, integer digits,            depth 64, 20-digit integers,
        inf, NaN, duplicate keys)                             finite numbers, unique keys)
    a field or query value of the wrong type,    400 bad_request
        out of range, too long, or with control
        characters (NUL, which PostgreSQL refuses)

``public_message`` is applied to every error text the API returns: it replaces absolute
filesystem paths (a staging file, the library directory) with their last component, because
the server's layout is nobody's business.

Owns: parsing. Does not own: routes, the error types (``fleet_server.errors``: ``AdminInputError``,
``AdminBodyTooLargeError``) or their statuses (the one error table, ``fleet_server.errors.ERRORS``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from starlette.requests import Request

from edge_agent import strict_json
from fleet_server.errors import AdminBodyTooLargeError, AdminInputError

__all__ = [
    "MAX_ID",
    "json_object",
    "public_message",
    "query_int",
    "query_text",
    "read_body",
    "req_field",
]

#: Integers the registry stores are SQL BIGINT: nothing larger is ever a valid id or version.
MAX_ID: Final = 2**63 - 1
MAX_TEXT: Final = 1024
_INT = re.compile(r"-?[0-9]{1,19}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
# An absolute POSIX path of two or more components (``/tmp/x/y.efb``), not a URL path inside
# a word (``http://h/v1``) and not an API route (``/v1/models``: one we name on purpose).
_ABS_PATH = re.compile(r"(?<![\w:/.])(?!/v\d+/)(/(?:[^\s/:'\"]+/)+)([^\s/:'\"]*)")


def public_message(text: str) -> str:
    """``text`` with every absolute filesystem path cut to its last component."""
    return _ABS_PATH.sub(lambda m: m.group(2) or "<dir>", text)


async def read_body(request: Request, cap: int) -> bytes:
    """The request body, refused as soon as it is (declared or streamed) over ``cap`` bytes.

    Raises:
        AdminBodyTooLargeError: over ``cap`` (413 ``too_large``).
        AdminInputError: a malformed Content-Length (400).
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not _INT.fullmatch(declared) or declared.startswith("-"):
            raise AdminInputError("Content-Length is not a byte count")
        if int(declared) > cap:
            raise AdminBodyTooLargeError(f"request body over {cap} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise AdminBodyTooLargeError(f"request body over {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _bad_json(message: str) -> AdminInputError:
    return AdminInputError(message, code="bad_json")


def json_object(raw: bytes) -> dict[str, Any]:
    """A JSON object body, parsed by ``edge_agent.strict_json``.

    Raises:
        AdminInputError: 400 ``bad_json``: not UTF-8, not JSON, past a limit, not an object.
    """
    data = strict_json.loads(raw, max_bytes=len(raw), what="body", error=_bad_json)
    if not isinstance(data, dict):
        raise _bad_json("body must be a JSON object")
    return data


def _check_text(value: str, what: str, limit: int) -> str:
    if len(value) > limit:
        raise AdminInputError(f"{what} is longer than {limit} characters")
    if _CONTROL.search(value):
        raise AdminInputError(f"{what} holds control characters")
    return value


def req_field(
    data: Mapping[str, Any],
    name: str,
    kind: type[Any],
    default: Any = ...,
    *,
    lo: int = 0,
    hi: int = MAX_ID,
    limit: int = MAX_TEXT,
) -> Any:
    """``data[name]`` of type ``kind`` (``default`` when absent; ``...`` means required).

    Integers must lie in ``lo..hi``; strings (and the keys and values of a dict, which must be
    strings) are at most ``limit`` characters without control characters.

    Raises:
        AdminInputError: missing, of the wrong type, out of range, too long.
    """
    value = data.get(name, default)
    if value is ...:
        raise AdminInputError(f"missing field {name!r}")
    if value is default and default is not ...:
        return value
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise AdminInputError(f"field {name!r} must be {kind.__name__}")
    if isinstance(value, int) and not isinstance(value, bool) and not lo <= value <= hi:
        raise AdminInputError(f"field {name!r} must be an integer in {lo}..{hi}")
    if isinstance(value, str):
        _check_text(value, f"field {name!r}", limit)
    if isinstance(value, dict):
        if len(value) > 64:
            raise AdminInputError(f"field {name!r} has more than 64 entries")
        for k, v in value.items():
            if not isinstance(v, str):
                raise AdminInputError(f"field {name!r} must map strings to strings")
            _check_text(k, f"a key of {name!r}", 128)
            _check_text(v, f"{name}[{k[:32]!r}]", limit)
    return value


def query_int(
    params: Mapping[str, str], name: str, default: int, *, lo: int = 0, hi: int = MAX_ID
) -> int:
    """An integer query parameter in ``lo..hi`` (plain ASCII digits; ``default`` when absent).

    Raises:
        AdminInputError: not an integer, or out of range.
    """
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    if not _INT.fullmatch(raw) or not lo <= int(raw) <= hi:
        raise AdminInputError(f"{name} must be an integer in {lo}..{hi}")
    return int(raw)


def query_text(params: Mapping[str, str], name: str, *, limit: int = 256) -> str | None:
    """A text query parameter (``None`` when absent or empty).

    Raises:
        AdminInputError: longer than ``limit`` or with control characters.
    """
    raw = params.get(name)
    if not raw:
        return None
    return _check_text(raw, name, limit)
