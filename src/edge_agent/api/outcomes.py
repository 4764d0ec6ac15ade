"""What the local inference API's front ends share about answering a client.

Owns: the client name of a Unix-socket peer, the metrics outcome of each status the one error
table (``edge_agent.errors.ERRORS``) gives, the statuses both front ends read off that table
by name (rate limited, not found, internal) and the text of a validation failure. REST
(``edge_agent.api.endpoints``) and gRPC (``edge_agent.api.grpc_v2.service``) both import it, so a
front end never imports another. Does not own the statuses themselves (``edge_agent.errors``),
the metrics series (``edge_agent.api.metrics``) or how a front end sends an answer.
"""

from __future__ import annotations

from typing import Final

from edge_agent.api import metrics as m
from edge_agent.errors import (
    ERRORS,
    INTERNAL_STATUS,
    TOO_LARGE_STATUS,
    InputValidationError,
    ModelNotFoundError,
    ModelStoreError,
    RateLimitedError,
)

__all__ = [
    "INTERNAL_HTTP",
    "NOT_FOUND_HTTP",
    "OUTCOME_BY_STATUS",
    "RATE_LIMITED_STATUS",
    "UDS_CLIENT",
    "describe",
    "outcome_of",
]

#: Every Unix-socket client is this one client (its peer credentials are not visible).
UDS_CLIENT: Final = "uds"
#: (HTTP status, gRPC code name) of a client over its rate limit (``RateLimitedError``'s row).
RATE_LIMITED_STATUS: Final = ERRORS.api_status(RateLimitedError)
#: The HTTP status of an unknown model, version or request id (``ModelNotFoundError``'s row).
NOT_FOUND_HTTP: Final = ERRORS.api_status(ModelNotFoundError)[0]
#: The HTTP status of anything the table has no row for (an opaque internal error).
INTERNAL_HTTP: Final = INTERNAL_STATUS[0]
#: The metrics outcome of each status of the error table (anything else is ``OUTCOME_ERROR``).
OUTCOME_BY_STATUS: Final = {
    ERRORS.api_status(InputValidationError)[0]: m.OUTCOME_INVALID,
    NOT_FOUND_HTTP: m.OUTCOME_NOT_FOUND,
    TOO_LARGE_STATUS[0]: m.OUTCOME_TOO_LARGE,
    RATE_LIMITED_STATUS[0]: m.OUTCOME_RATE_LIMITED,
    ERRORS.api_status(ModelStoreError)[0]: m.OUTCOME_UNAVAILABLE,
}


def outcome_of(http: int) -> str:
    """The metrics outcome of an error answered with HTTP status ``http``."""
    return OUTCOME_BY_STATUS.get(http, m.OUTCOME_ERROR)


def describe(exc: InputValidationError) -> str:
    """The message of a validation failure: the text, then its reason, field and row counts."""
    parts = [f"reason: {exc.reason}"]
    if exc.field:
        parts.append(f"field: {exc.field}")
    if exc.counts:
        parts.append("rows: " + ", ".join(f"{k}={v}" for k, v in sorted(exc.counts.items())))
    return f"{exc} ({'; '.join(parts)})"
