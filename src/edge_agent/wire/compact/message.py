"""The packed telemetry message: a v1 JSON telemetry payload, encoded for a metered link.

Owns ``pack_message`` and ``unpack_message`` (and ``unpack_document``, the parsed document
of ``unpack_message`` without its JSON text), a lossless transport encoding of the canonical
JSON payloads on ``.../telemetry`` (``TelemetryReport`` or ``Batch``, ``schema_version`` 1):
``unpack_message(pack_message(p)) == p`` byte for byte, so the receiver parses, validates and
stores exactly what the JSON form would have carried. An agent sends it only to a server whose
acknowledgements list ``PACKED_ENCODING`` in ``accepts`` (``edge_agent.sync.uplink``).

Layout::

    b"EFP" + u8 format (1)
    raw DEFLATE (RFC 1951) with the fixed preset dictionary ``ZDICT`` of this format of:
        varint n, n bytes: the canonical JSON, each drift window's ``view`` (base64 of
            ``TierAView.to_bytes``) replaced by its index, 0, 1, 2, ... in document order
        per index: varint m, m bytes: the view in ``compact.views`` packed form

``ZDICT`` (the keys and values every report repeats) is part of format 1 and never changes;
another dictionary is another format byte. A payload starting with ``{`` is JSON, one starting
with ``MAGIC`` packed: ``is_packed`` tells them apart.

``unpack_message`` is bounded: the inflated body may not exceed ``max_bytes``, nor the JSON it
rebuilds (the limit the receiver applies to JSON payloads; an honest agent's packed message is
smaller than its JSON form), and each view is refused before it allocates beyond that. Every
malformed input raises ``ContractError``; nothing else escapes. Does not own the JSON
payloads' meaning (``edge_agent.wire.telemetry``) or the view codec (``compact.views``).
"""

from __future__ import annotations

import base64
import binascii
import zlib
from collections.abc import Iterator
from typing import Any, Final

from edge_agent import strict_json
from edge_agent.drift import TierAView
from edge_agent.errors import ContractError
from edge_agent.wire.compact.varint import Reader, put_uvarint
from edge_agent.wire.compact.views import pack_view, unpack_view
from edge_agent.wire.fields import MAX_PAYLOAD_BYTES, dump_json

__all__ = [
    "MAGIC",
    "PACKED_ENCODING",
    "ZDICT",
    "is_packed",
    "pack_message",
    "unpack_document",
    "unpack_message",
]

#: What a server lists in ``TelemetryAck.accepts`` when it reads this format.
PACKED_ENCODING: Final = "packed-1"
MAGIC: Final = b"EFP\x01"
#: The preset DEFLATE dictionary of format 1 (a batch with a report and an event). Never edit.
ZDICT: Final = (
    b'{"detail":"","kind":"drift_alert","model":"digits","version":1,"at":1795000000.0,'
    b'"type":"event","rolled_back","installed","probation_passed","telemetry_dropped",'
    b'"shadow_flips":{"agree":0,"compared":0,"counts":[[0,0],[0,0]],"versions":[1]},'
    b'"shadow":{"agreement":null,"candidate_p50_ms":null,"candidate_p99_ms":null,'
    b'"counts":{"agree_rows":0,"candidate_errors":0,"compared":0,"disagree_rows":0,'
    b'"dropped":0,"offered":0,"sampled":0},"live_p50_ms":null,"live_p99_ms":null},'
    b'"ground_truth":{"feedback":{},"versions":{}},"floor":1,"items":[{"agent_version":"0.1.0",'
    b'"counts":{"cloud":0,"device":0,"errors":0,"rejected":0},"device_id":"gateway-0001",'
    b'"drift_blocks_dropped":0,"models":{"digits":{"ab":null,"drift":[{"alert":false,'
    b'"drifted":[],"end":1000.0,"max_js":0.01,"max_ks":0.1,"max_psi":0.1,"reason":"time",'
    b'"role":"input","rows":1000,"start":1000.0,"tensor":"input","view":0},{"alert":false,'
    b'"drifted":[],"end":1000.0,"max_js":0.01,"max_ks":0.1,"max_psi":0.1,"reason":"count",'
    b'"role":"output","rows":1000,"start":1000.0,"tensor":"probabilities","view":1}],'
    b'"dropped_rows_by_reason":{},"latency_buckets":[0,0,0,0,0,0,0,0,0,0,0,0],'
    b'"latency_fine":[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,'
    b'0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0],"latency_ms":{"p50":0.0,"p90":0.0,"p99":0.0},'
    b'"on_probation":false,"outcomes":{"error":0,"ok":0,"rejected":0},"rejects_by_reason":{},'
    b'"shadow":null,"sources":{"cloud":0,"device":0},"version":1}},"resources":{"cpu_seconds":'
    b'0.0,"model_memory_bytes":0,"rss_bytes":0},"schema_version":1,"seq":1,"started_at":'
    b'1795000000.0,"telemetry_dropped":{},"type":"report","window_end":1795000000.0,'
    b'"window_start":1795000000.0}],"schema_version":1,"type":"batch"}'
)
_WBITS: Final = -15  # raw DEFLATE: the magic already says what follows
_LEVEL: Final = 9


def is_packed(payload: object) -> bool:
    """Whether ``payload`` is bytes in the packed form (else it is JSON, or garbage)."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        return False
    return bytes(payload[: len(MAGIC)]) == MAGIC


def _windows(doc: Any) -> Iterator[dict[str, Any]]:
    """The drift windows of a report or of a batch's reports, in document order."""
    reports = doc.get("items", []) if doc.get("type") == "batch" else [doc]
    for report in reports if isinstance(reports, list) else []:
        if not isinstance(report, dict) or report.get("type") != "report":
            continue
        models = report.get("models")
        for _name, model in sorted(models.items()) if isinstance(models, dict) else []:
            drift = model.get("drift") if isinstance(model, dict) else None
            for window in drift if isinstance(drift, list) else []:
                if isinstance(window, dict):
                    yield window


def pack_message(payload: bytes) -> bytes:
    """The packed form of a canonical JSON telemetry payload (a report or a batch).

    Raises:
        ContractError: ``payload`` is not canonical JSON of a report or batch, or a drift
            window's ``view`` is not a tier-A view.
    """
    doc = strict_json.loads(payload, max_bytes=MAX_PAYLOAD_BYTES, what="telemetry payload")
    if not isinstance(doc, dict) or doc.get("type") not in ("report", "batch"):
        raise ContractError("only a report or a batch is packed")
    if dump_json(doc) != bytes(payload):
        raise ContractError("only canonical JSON is packed (it must unpack byte for byte)")
    views: list[bytes] = []
    for window in _windows(doc):
        try:
            efta = base64.b64decode(str(window["view"]), validate=True)
        except (KeyError, binascii.Error, ValueError) as exc:
            raise ContractError("drift window without a base64 view") from exc
        view = TierAView.from_bytes(efta)
        if base64.b64encode(view.to_bytes()).decode("ascii") != window["view"]:
            raise ContractError("drift window view does not re-encode to itself")
        packed = pack_view(view)
        window["view"] = len(views)
        views.append(packed)
    body = bytearray()
    text = dump_json(doc)
    put_uvarint(body, len(text))
    body += text
    for packed in views:
        put_uvarint(body, len(packed))
        body += packed
    deflate = zlib.compressobj(_LEVEL, zlib.DEFLATED, _WBITS, zdict=ZDICT)
    return MAGIC + deflate.compress(bytes(body)) + deflate.flush()


def unpack_message(data: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> bytes:
    """The canonical JSON payload a packed message encodes (see the module docstring).

    Args:
        data: the packed message.
        max_bytes: the largest inflated body and rebuilt JSON accepted.

    Raises:
        ContractError: not the packed form or another format, a damaged or incomplete DEFLATE
            stream, more than ``max_bytes``, trailing bytes, an invalid view, or JSON the
            strict reader refuses.
    """
    out = dump_json(unpack_document(data, max_bytes=max_bytes))
    if len(out) > max_bytes:
        raise ContractError(f"packed telemetry rebuilds JSON beyond {max_bytes} bytes")
    return out


def unpack_document(data: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> dict[str, Any]:
    """The JSON document a packed message encodes, as the strict reader parses it: what
    ``strict_json.loads(unpack_message(data))`` gives, without building and reading the JSON
    text again (the server's ingest parses the document straight into value objects).

    The bound on the rebuilt JSON is computed: the canonical JSON of the document with its
    view indices (measured, so a JSON part that grows when made canonical, such as ``1e5`` or
    raw UTF-8, is bounded as ``unpack_message`` bounds it) plus each view's quoted base64 less
    its index, which is the rebuilt length exactly.

    Raises:
        ContractError: as ``unpack_message``.
    """
    data = bytes(data)
    if not is_packed(data):
        raise ContractError("telemetry payload is not in the packed form (or another format)")
    inflate = zlib.decompressobj(_WBITS, zdict=ZDICT)
    try:
        body = inflate.decompress(data[len(MAGIC) :], max_bytes + 1)
    except zlib.error as exc:
        raise ContractError(f"packed telemetry: damaged DEFLATE stream: {exc}") from exc
    if len(body) > max_bytes or inflate.unconsumed_tail:
        raise ContractError(f"packed telemetry inflates beyond {max_bytes} bytes")
    if not inflate.eof or inflate.unused_data:
        raise ContractError("packed telemetry: DEFLATE stream incomplete or followed by bytes")
    r = Reader(body, "packed telemetry")
    text = r.take(r.uvarint(max_bytes))
    doc = strict_json.loads(text, max_bytes=max_bytes, what="packed telemetry JSON")
    if not isinstance(doc, dict) or doc.get("type") not in ("report", "batch"):
        raise ContractError("packed telemetry holds neither a report nor a batch")
    size = len(dump_json(doc))  # and grows by each view's quoted base64 less its index
    if size > max_bytes:
        raise ContractError(f"packed telemetry rebuilds JSON beyond {max_bytes} bytes")
    for i, window in enumerate(_windows(doc)):
        index = window.get("view")
        if isinstance(index, bool) or index != i:
            raise ContractError(f"packed telemetry: drift window {i} has view {index!r}")
        view = unpack_view(r.take(r.uvarint(max_bytes)), max_bytes=max_bytes)
        efta = base64.b64encode(view.to_bytes()).decode("ascii")
        size += len(efta) + 2 - len(str(i))
        if size > max_bytes:
            raise ContractError(f"packed telemetry rebuilds JSON beyond {max_bytes} bytes")
        window["view"] = efta
    if r.remaining:
        raise ContractError(f"packed telemetry: {r.remaining} bytes after the last view")
    return doc
