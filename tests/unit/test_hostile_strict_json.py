"""edge_agent.strict_json: the limits sit exactly where documented, and errors are typed."""

from __future__ import annotations

import pytest

from edge_agent import strict_json
from edge_agent.errors import ContractError, MetadataFormatError


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize(
    ("data", "ok"),
    [
        (_nested(64), True),
        (_nested(65), False),
        (b'{"a":' * 63 + b"[]" + b"}" * 63, True),
        (b'{"a":' * 64 + b"[]" + b"}" * 64, False),
        (b"9" * 20, True),
        (b"-" + b"9" * 20, True),
        (b"9" * 21, False),
        (b"1e308", True),
        (b"1e309", False),
        (b"-1e400", False),
        (b"1e-400", True),  # underflows to 0.0: finite
        (b'"\\ud83d\\ude00"', True),  # a surrogate pair is one code point
        (b'"\\ud83d"', False),
        (b'["ok", {"k": "\\udfff"}]', False),
        (b'{"\\udc00": 1}', False),
        (b'{"a": 1, "a": 1}', False),
        (b'{"a": {"b": 1}, "b": {"b": 2}}', True),  # the same key in different objects
        (b"NaN", False),
        (b"[Infinity]", False),
        (b"\xef\xbb\xbf{}", False),  # a BOM is not JSON
        (b"{} {}", False),
        (b"", False),
    ],
)
def test_limits(data: bytes, ok: bool) -> None:
    if ok:
        strict_json.loads(data, max_bytes=1 << 16)
    else:
        with pytest.raises(ContractError):
            strict_json.loads(data, max_bytes=1 << 16)


def test_size_cap_and_types() -> None:
    assert strict_json.loads(b"[1]", max_bytes=3) == [1]
    with pytest.raises(ContractError, match="exceeds"):
        strict_json.loads(b"[1] ", max_bytes=3)
    with pytest.raises(ContractError, match="must be bytes"):
        strict_json.loads(123, max_bytes=10)  # type: ignore[arg-type]
    assert strict_json.loads(memoryview(b'{"a": 1.5}'), max_bytes=10) == {"a": 1.5}


def test_integers_only_and_the_callers_family() -> None:
    assert strict_json.loads(b"[1, 2]", max_bytes=10, floats=False) == [1, 2]
    with pytest.raises(MetadataFormatError, match="integers only"):
        strict_json.loads(b"[1.0]", max_bytes=10, floats=False, error=MetadataFormatError)
    with pytest.raises(MetadataFormatError, match="targets"):
        strict_json.loads(
            _nested(100_000), max_bytes=1 << 20, what="targets", error=MetadataFormatError
        )
