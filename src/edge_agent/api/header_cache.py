"""The cache of binary inference requests' JSON headers (``RequestDecoder``).

Owns ``RequestDecoder``: ``decode_request`` that skips parsing and checking a JSON header it
has already seen. Does not own the decoding rules (``edge_agent.api.decode``; this module reuses
its steps, ``decode_body``, ``binary_tensor``, ``check_consumed``, so a cached request decodes and
fails exactly as an uncached one) or encoding (``edge_agent.api.codec``).
"""

from __future__ import annotations

import threading

from edge_agent.api.decode import (
    MAX_INPUTS,
    BinaryPlan,
    DecodedRequest,
    binary_tensor,
    check_consumed,
    decode_body,
    decode_request,
    parse_header_length,
)
from edge_agent.serving.service import Array

__all__ = ["RequestDecoder"]


class RequestDecoder:
    """``decode_request`` that remembers the JSON headers of binary requests it has decoded.

    A client sending binary tensors sends the same JSON header with every request of a shape;
    parsing and checking it is most of the decoding. A header whose every input is binary and
    which carries no ``id`` is remembered (at most ``max_entries`` headers of at most
    ``max_header_bytes``, the oldest forgotten first) as the names, datatypes, shapes and sizes
    it declared, keyed by its exact bytes; the next request with those bytes skips the JSON
    and the header checks but not the checks of the bytes that follow (sizes, BOOL values), so
    it decodes to exactly what ``decode_request`` gives, and fails the same way. Only headers
    that decoded without error are remembered. Thread-safe.
    """

    def __init__(
        self, max_entries: int = 64, max_header_bytes: int = 4096, max_inputs: int = MAX_INPUTS
    ) -> None:
        self._plans: dict[bytes, BinaryPlan] = {}
        self._lock = threading.Lock()
        self.max_entries = max_entries
        self.max_header_bytes = max_header_bytes
        self.max_inputs = max_inputs

    def decode(self, body: bytes, header_length: str | None = None) -> DecodedRequest:
        """As ``decode_request(body, header_length)``.

        Raises:
            InputValidationError: as ``decode_request``.
        """
        if header_length is None:
            return decode_request(body, None, max_inputs=self.max_inputs)
        end = parse_header_length(header_length.strip(), body)
        if end > self.max_header_bytes or end == len(body):
            return decode_request(body, header_length, max_inputs=self.max_inputs)
        key = body[:end]
        plan = self._plans.get(key)
        if plan is None:
            decoded, plan = decode_body(body, end, self.max_inputs)
            if plan is not None:
                with self._lock:
                    if len(self._plans) >= self.max_entries:
                        self._plans.pop(next(iter(self._plans)), None)
                    self._plans[key] = plan
            return decoded
        view = memoryview(body)
        offset = end
        inputs: dict[str, Array] = {}
        for name, datatype, shape, size in plan.inputs:
            inputs[name] = binary_tensor(view, offset, size, datatype, shape, name)
            offset += size
        check_consumed(offset, end, len(body))
        return DecodedRequest(inputs, None, dict(plan.parameters), plan.outputs, plan.binary_output)
