"""Hypothesis strategies for hostile input: valid documents, mutated the way attackers do.

``mutated(doc)`` takes a valid JSON document (as parsed) and applies one to three edits at
random places: replace a value (with a wrong type, a huge or negative integer, a float, or a raw
token no JSON writer emits: ``1e400``, ``NaN``, a 5000-digit integer, deep nesting, a lone
surrogate, NUL), delete a key or element, add an unknown key, wrap a value in a list or object,
or repeat a key. The result is rendered as bytes, raw tokens verbatim. ``byte_mutated(data)``
truncates, overwrites or inserts bytes. Random bytes come from ``st.binary``.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

__all__ = [
    "TOKENS",
    "byte_mutated",
    "every_token_everywhere",
    "hostile_value",
    "json_values",
    "mutated",
    "only_typed",
    "render",
]


class Raw:
    """A token rendered verbatim (what ``json.dumps`` refuses or rewrites)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:40]!r}{'...' if len(self.text) > 40 else ''})"


class DupKey:
    """A key rendered as ``key`` although the dict already holds ``key`` (duplicate keys)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __repr__(self) -> str:
        return f"DupKey({self.key!r})"


TOKENS = [
    "1e400",
    "-1e400",
    "1E999",
    "NaN",
    "Infinity",
    "-Infinity",
    "9" * 5000,
    "-" + "9" * 4301,
    "1" + "0" * 20,
    str(2**64),
    str(2**63),
    str(2**53 + 1),
    "-1",
    "0",
    "-0",
    "1.5",
    "1e-400",
    "0.0",
    "[" * 3000 + "]" * 3000,
    '{"a":' * 300 + "1" + "}" * 300,
    "[" * 70 + "]" * 70,
    '"\\ud800"',
    '"x\\udc00"',
    '"\\u0000"',
    '"a\\u0000b"',
    '""',
    '"' + "x" * 70_000 + '"',
    "true",
    "false",
    "null",
    "[]",
    "{}",
    "[null]",
    '{"":null}',
]

_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=16),
)
json_values = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
_tokens = st.sampled_from(TOKENS).map(Raw)
hostile_value = st.one_of(_tokens, _tokens, json_values)  # two in three: a raw token


def every_token_everywhere(doc: Any, *, max_paths: int = 80) -> list[bytes]:
    """``doc`` with each of ``TOKENS`` at each of (at most ``max_paths``, evenly spread) paths.

    ``doc`` must be plain JSON (no ``Raw``): it is rendered once per path with a placeholder
    that each token then replaces, so the exhaustive table stays cheap.
    """
    paths = _paths(doc)
    step = max(1, -(-len(paths) // max_paths))
    quoted = json.dumps(_PLACEHOLDER)
    out = []
    for path in paths[::step]:
        parent, key = _at(doc, path[:-1]), path[-1]
        old, parent[key] = parent[key], _PLACEHOLDER
        try:
            text = json.dumps(doc)
        finally:
            parent[key] = old
        out.extend(text.replace(quoted, token).encode("utf-8", "surrogatepass") for token in TOKENS)
    return out


_PLACEHOLDER = "@@hostile-token@@"


def render(value: Any) -> str:
    """JSON text of ``value``, with ``Raw`` tokens and ``DupKey`` keys as they are."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        items = (
            f"{json.dumps(k.key if isinstance(k, DupKey) else k)}:{render(v)}"
            for k, v in value.items()
        )
        return "{" + ",".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(render(v) for v in value) + "]"
    return json.dumps(value)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            if isinstance(k, DupKey):
                continue
            out.append((*prefix, k))
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.append((*prefix, i))
            out.extend(_paths(v, (*prefix, i)))
    return out


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


_OPS = ("replace", "replace", "replace", "delete", "add", "wrap", "dup")


@st.composite
def mutated(draw: st.DrawFn, doc: Any, *, edits: int = 3) -> bytes:
    """``doc`` with 1..``edits`` hostile edits, rendered to bytes."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, edits))):
        paths = _paths(doc)
        if not paths:
            doc = draw(hostile_value)
            break
        path = draw(st.sampled_from(paths))
        parent, key = _at(doc, path[:-1]), path[-1]
        op = draw(
            st.sampled_from(["replace", "replace", "replace", "delete", "add", "wrap", "dup"])
        )
        if op == "replace":
            parent[key] = draw(hostile_value)
        elif op == "delete":
            del parent[key]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = draw(hostile_value)
        elif op == "add":
            parent.insert(key, draw(hostile_value))
        elif op == "wrap":
            parent[key] = draw(st.sampled_from([[parent[key]], {"x": parent[key]}]))
        elif isinstance(parent, dict):
            parent[DupKey(key)] = draw(hostile_value)
    return render(doc).encode("utf-8", "surrogatepass")


@st.composite
def byte_mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` truncated, overwritten or extended at random offsets (1..3 edits)."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(out)))
        op = draw(st.sampled_from(["truncate", "overwrite", "insert", "flip"]))
        if op == "truncate":
            del out[at:]
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            out[at : at + len(chunk)] = chunk
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif out:
            out[min(at, len(out) - 1)] ^= 1 << draw(st.integers(0, 7))
    return bytes(out)


def only_typed(parse: Callable[[bytes], object], data: bytes, family: type[Exception]) -> None:
    """Run ``parse``; a ``family`` error is a pass, anything else escapes to hypothesis."""
    with contextlib.suppress(family):
        parse(data)
