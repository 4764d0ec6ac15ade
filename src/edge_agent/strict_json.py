"""One strict JSON reader for every document that crosses a trust boundary.

Owns ``loads``: the only way edgefleet turns untrusted bytes into JSON values. Python's
``json.loads`` accepts documents that later crash the code reading them, each in its own way:

    deep nesting        RecursionError (in the parser, or later in any recursive encoder)
    huge integers       ValueError from CPython's 4,300-digit ``int`` conversion limit
    ``1e400``           a float ``inf`` that canonical encoders and databases refuse
    NaN / Infinity      non-standard tokens that no other JSON reader accepts
    duplicate keys      the last one silently wins (a signature-confusion classic)
    lone surrogates     ``"\\ud800"`` decodes, then fails ``str.encode("utf-8")`` anywhere later

``loads`` refuses all of them, plus anything over a byte cap, before a caller sees a value, and
turns every failure into the caller's typed error (``ContractError`` unless told otherwise).
Floats can be refused outright (canonical JSON, as TUF and the desired state sign it, has none).

Does not own: any schema (callers check shapes and types) and does no I/O.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any, Final

from edge_agent.errors import ContractError, EdgefleetError

__all__ = ["MAX_DEPTH", "MAX_INT_DIGITS", "loads"]

#: Nesting of objects and arrays; every edgefleet document needs fewer than 16.
MAX_DEPTH: Final = 64
#: Digits of a JSON integer (sign excluded): every id, count and version fits in 20 (2**64).
MAX_INT_DIGITS: Final = 20

ErrorFactory = Callable[[str], EdgefleetError]


def loads(
    data: bytes | bytearray | memoryview | str,
    *,
    max_bytes: int,
    what: str = "document",
    error: ErrorFactory = ContractError,
    floats: bool = True,
    max_depth: int = MAX_DEPTH,
    max_int_digits: int = MAX_INT_DIGITS,
) -> Any:
    """Parse untrusted JSON, refusing everything listed in the module docstring.

    Args:
        data: the bytes as received (UTF-8), or already decoded text.
        max_bytes: refused before parsing when longer (bytes, or characters for text).
        what: names the document in error messages.
        error: the typed error to raise (called with the message).
        floats: when false, any number with a fraction or exponent is refused.
        max_depth: deepest nesting of objects and arrays allowed.
        max_int_digits: longest integer allowed, in digits.

    Returns:
        The parsed value (dicts, lists, str, int, finite float, bool, None).

    Raises:
        EdgefleetError: of the family ``error`` builds (``ContractError`` by default), for a
            non-bytes argument, an oversized, non-UTF-8 or malformed document, or one that
            breaks a limit above.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        if len(data) > max_bytes:
            raise error(f"{what} of {len(data)} bytes exceeds the {max_bytes}-byte cap")
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{what} is not UTF-8 (byte {exc.start})") from None
    elif isinstance(data, str):
        if len(data) > max_bytes:
            raise error(f"{what} of {len(data)} characters exceeds the {max_bytes} cap")
        text = data
    else:
        raise error(f"{what} must be bytes, not {type(data).__name__}")

    def no_constant(token: str) -> Any:
        raise error(f"{what} holds the non-finite number {token}, which JSON does not allow")

    def bounded_int(token: str) -> int:
        if len(token) - token.startswith("-") > max_int_digits:
            raise error(f"{what} holds an integer of {len(token)} digits (max {max_int_digits})")
        return int(token)

    def finite_float(token: str) -> float:
        if not floats:
            raise error(f"{what} holds the non-integer number {token[:32]} (integers only)")
        value = float(token)
        if not math.isfinite(value):
            raise error(f"{what} holds the out-of-range number {token[:32]}")
        return value

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise error(f"{what} has a duplicate key {key[:64]!r}")
                seen.add(key)
        return out

    try:
        value = json.loads(
            text,
            parse_constant=no_constant,
            parse_int=bounded_int,
            parse_float=finite_float,
            object_pairs_hook=no_duplicates,
        )
    except RecursionError:
        raise error(f"{what} is nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError, and int()/float() edge cases
        raise error(f"{what} is not JSON: {_short(exc)}") from None
    # Only a \uD800-\uDFFF escape can make a lone surrogate (raw ones are not UTF-8), and
    # only that many brackets can nest that deep: most documents skip the walk entirely.
    texts = _SURROGATE_ESCAPE.search(text) is not None
    if texts or text.count("[") + text.count("{") > max_depth:
        _check_tree(value, what, error, max_depth, texts=texts)
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def _check_tree(value: Any, what: str, error: ErrorFactory, max_depth: int, *, texts: bool) -> None:
    """Depth (and text) checks, iteratively (a recursive walk would be the attack's target)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            _check_text(node, what, error)
            continue
        if depth >= max_depth:
            raise error(f"{what} is nested deeper than {max_depth} levels")
        if isinstance(node, dict):
            for key, item in node.items():
                if texts:
                    _check_text(key, what, error)
                if isinstance(item, dict | list) or (texts and isinstance(item, str)):
                    stack.append((item, depth + 1))
        elif isinstance(node, list):
            for item in node:
                if isinstance(item, dict | list) or (texts and isinstance(item, str)):
                    stack.append((item, depth + 1))


def _check_text(text: str, what: str, error: ErrorFactory) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{what} holds a lone UTF-16 surrogate escape") from None


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."
