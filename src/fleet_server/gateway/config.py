"""The gateway's settings and counters (value types of ``fleet_server.gateway.gateway``).

Owns ``GatewayConfig`` (validated settings of one gateway worker), ``GatewayStats`` (a snapshot
of its counters) and ``REJECT_REASONS`` (the stable refusal labels). Both classes are also
importable from ``fleet_server.gateway.gateway``. Does no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from edge_agent.errors import ContractError
from edge_agent.wire.topics import Topics
from edge_agent.wire.transfer import DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE
from fleet_server.errors import ServerConfigError

__all__ = ["REJECT_REASONS", "GatewayConfig", "GatewayStats"]


@dataclass(frozen=True)
class GatewayConfig:
    """Settings of one gateway worker (see the module docstring)."""

    prefix: str = "edgefleet"
    share_group: str = "fleet"
    bundles_dir: Path = Path("bundles")
    block_size: int = DEFAULT_BLOCK_SIZE
    broadcast_min_devices: int = 2
    resend_round_seconds: float = 0.05
    max_blocks_per_second: float = 2000.0
    ingest_max_batch: int = 500
    ingest_max_wait_seconds: float = 0.05
    # Per device, messages it may send per second (a token bucket with ``device_burst``): a
    # misbehaving device cannot starve the others. Refused telemetry is not acknowledged, so
    # the device sends it again later; nothing is lost. A backlog of batches drains well within.
    device_rate_per_second: float = 100.0
    device_burst: int = 500
    # Most telemetry messages queued for storage per device (its fair share of the queue).
    device_queue: int = 200
    # A device is online when its status says so and it spoke within this many seconds
    # (agents report every 30 s by default).
    presence_timeout_seconds: float = 120.0

    def validate(self) -> None:
        """Check every value.

        Raises:
            ServerConfigError: a value is out of range or the prefix/share group is not a
                valid topic level.
        """
        try:
            Topics(self.prefix).shared(self.share_group, "telemetry")
        except ContractError as exc:
            raise ServerConfigError(f"gateway: {exc}") from exc
        if not 16 * 1024 <= self.block_size <= MAX_BLOCK_SIZE:
            raise ServerConfigError(f"gateway: block_size {self.block_size} out of range")
        checks = {
            "broadcast_min_devices": self.broadcast_min_devices >= 1,
            "resend_round_seconds": 0 < self.resend_round_seconds <= 10,
            "max_blocks_per_second": 0 < self.max_blocks_per_second < math.inf,
            "ingest_max_batch": 1 <= self.ingest_max_batch <= 10_000,
            "ingest_max_wait_seconds": 0 <= self.ingest_max_wait_seconds <= 10,
            "device_rate_per_second": 0 < self.device_rate_per_second < math.inf,
            "device_burst": self.device_burst >= 1,
            "device_queue": self.device_queue >= 1,
            "presence_timeout_seconds": 0 < self.presence_timeout_seconds < math.inf,
        }
        for name, ok in checks.items():
            if not ok:
                raise ServerConfigError(f"gateway: {name}={getattr(self, name)!r} out of range")


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
    desired_published: int = 0
    devices_online: int = 0
    retained_cleared: int = 0
    ingest_isolations: int = 0


REJECT_REASONS: Final = frozenset(
    {"malformed", "oversized", "device_mismatch", "wrong_type", "unknown_transfer", "rate_limited"}
    | {"out_of_range", "unknown_device", "revoked_device", "rejected", "queue_full"}
    | {"foreign_bundle"}
)
