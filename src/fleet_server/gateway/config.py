"""The gateway's value types: its counters and refusal labels, next to its settings.

Owns ``GatewayStats`` (a snapshot of the gateway's counters) and ``REJECT_REASONS`` (the stable
refusal labels). Does not own ``GatewayConfig`` (the settings of one gateway worker): it is the
``[gateway]`` section of ``fleet_server.config``, one class for the TOML and the gateway, and is
imported from there. Does no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

__all__ = ["REJECT_REASONS", "GatewayStats"]


@dataclass(frozen=True)
class GatewayStats:
    """A snapshot of the gateway's counters since it was created.

    Attributes:
        messages: received messages by topic kind (telemetry, events, reported, status,
            blocks_req).
        items_inserted: telemetry entries newly stored.
        duplicates: telemetry entries that were already stored.
        lost: seqs declared lost from device floors.
        rejected: refused messages by reason (malformed, oversized, device_mismatch,
            wrong_type, unknown_device, revoked_device, rejected, queue_full,
            unknown_transfer, out_of_range, foreign_bundle, rate_limited) and refused
            entries (malformed_entry, unstorable: stored as ``refused`` placeholders and acked).
        acks_sent: acknowledgements published.
        ack_failures: acknowledgements that could not be published (the device resends).
        db_failures: failed database operations (batched ingest transactions, reported).
        ingest_pending: messages waiting for the ingest thread.
        block_requests: block requests received.
        blocks_unicast: blocks published on a device's ``blocks/resp``.
        blocks_broadcast: blocks published on a wave topic (rounds and waves).
        reported_stored: reported-state documents stored.
        reported_labels_refused: label entries of stored reported states that were dropped
            as invalid (bad key or value, too many, not an object); the device's last count is
            its ``labels_refused`` (``fleet-server devices labels``).
        desired_published: desired-state documents published (direct and republished).
        devices_online: devices whose latest status is ``online`` and that spoke recently.
        retained_cleared: invalid retained status/reported documents the gateway cleared.
        ingest_isolations: batch transactions split to isolate a message the database refused.
    """

    messages: Mapping[str, int] = field(default_factory=dict)
    items_inserted: int = 0
    duplicates: int = 0
    lost: int = 0
    rejected: Mapping[str, int] = field(default_factory=dict)
    acks_sent: int = 0
    ack_failures: int = 0
    db_failures: int = 0
    ingest_pending: int = 0
    block_requests: int = 0
    blocks_unicast: int = 0
    blocks_broadcast: int = 0
    reported_stored: int = 0
    reported_labels_refused: int = 0
    desired_published: int = 0
    devices_online: int = 0
    retained_cleared: int = 0
    ingest_isolations: int = 0


REJECT_REASONS: Final = frozenset(
    {"malformed", "oversized", "device_mismatch", "wrong_type", "unknown_transfer", "rate_limited"}
    | {"out_of_range", "unknown_device", "revoked_device", "rejected", "queue_full"}
    | {"foreign_bundle"}
)
