"""The compact telemetry encoding for metered links (issue 11): packed tier-A views and the
packed message around a v1 JSON payload. Pure: bytes in, bytes or values out."""

from edge_agent.wire.compact.message import (
    MAGIC,
    PACKED_ENCODING,
    is_packed,
    pack_message,
    unpack_document,
    unpack_message,
)
from edge_agent.wire.compact.views import pack_view, unpack_view

__all__ = [
    "MAGIC",
    "PACKED_ENCODING",
    "is_packed",
    "pack_message",
    "pack_view",
    "unpack_document",
    "unpack_message",
    "unpack_view",
]
