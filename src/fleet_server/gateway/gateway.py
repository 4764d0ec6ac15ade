"""The fleet server's MQTT gateway: the server end of every device topic.

Owns the orchestration: subscribing to the gateway role's list in ``Topics``
(``gateway_subscriptions``: telemetry, events and block requests through the shared
subscription ``$share/<group>/...`` so several server workers split the load; ``reported`` and
``status`` plainly, because retained messages never reach shared subscriptions), parsing and
checking each message against the device id in its topic (the broker ACL makes that the
certificate CN), counting every refusal by reason, and the housekeeping thread that
republishes every device's latest desired-state document, retained, each time the MQTT session
(re)connects (a broker without persistence forgets retained messages on restart).

Per device: every refusal is also counted against the device that caused it
(``misbehaviour``; a bounded ``MisbehaviourBook``); presence (``online``) is the device's status
*and* live traffic within ``presence_timeout_seconds`` (``PresenceBook``), never a retained
status alone; an invalid retained ``status`` or ``reported`` document is cleared (an empty
retained message) so consumers do not keep receiving it; blocks are served only for bundles the
device's latest desired state names (``blocks.Entitlements``).

Remote diagnostics: command answers (``.../commands/resp``) and support-bundle blocks
(``.../upload/data``) go to ``fleet_server.diagnostics.service.Diagnostics`` when one is
attached (``attach_diagnostics``); a malformed answer counts against its device.

Talks to the broker only through ``edge_agent.common.transport.Transport`` (the paho adapter in
production, ``edge_agent.common.memory`` in unit tests).

Delegates: parsing to ``fleet_server.gateway.ingest_parse``, batched telemetry storage and its
acknowledgement rule to ``fleet_server.gateway.ingest`` (handlers only parse and enqueue into
per-device
fair queues, so one transaction stores many messages and one device's backlog does not delay
another's acks), block serving and waves to ``fleet_server.delivery.block_server``. Does not create
or close
the MQTT client (the caller does), sign desired states (``fleet_server.delivery.desired``) or serve
HTTP/metrics (``stats()`` feeds them). Its settings and counters are value types of
``fleet_server.gateway.config`` (importable from here too).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Final

from edge_agent.common.mqtt_types import Message
from edge_agent.common.ratelimit import RateLimiter
from edge_agent.common.transport import Transport
from edge_agent.errors import ContractError, EdgefleetError, TransportError
from edge_agent.wire.reported import MAX_REPORTED_BYTES, ReportedState
from edge_agent.wire.telemetry import StatusMessage, TelemetryAck
from edge_agent.wire.topics import Topics
from edge_agent.wire.transfer import MAX_MESSAGE_BYTES, BlockRequest
from fleet_server.config import GatewayConfig
from fleet_server.delivery.block_server import BlockServer, Pacer
from fleet_server.delivery.blocks import Entitlements
from fleet_server.delivery.desired import parse_document
from fleet_server.diagnostics.service import Diagnostics
from fleet_server.errors import RegistryError, RegistryUnavailableError
from fleet_server.gateway.config import REJECT_REASONS, GatewayStats
from fleet_server.gateway.ingest import IngestWorker
from fleet_server.gateway.ingest_parse import (
    ACCEPTED_ENCODINGS,
    parse_telemetry,
    refusal_reason,
)
from fleet_server.gateway.misbehaviour import DeviceMisbehaviour, MisbehaviourBook, PresenceBook
from fleet_server.registry.store import Registry
from fleet_server.registry.values import IngestResult

__all__ = ["Gateway"]

log = logging.getLogger(__name__)

_HOUSEKEEPING_EVERY: Final = 0.2  # seconds between session checks
_LOG_EVERY: Final = 10.0  # seconds between two log lines about the same reject reason
# A worker starting beside a busy broker waits this long for its subscriptions' SUBACKs (the
# client's 5 s default failed a start on a heavily loaded machine); a start that fails is loud.
SUBACK_TIMEOUT_S: Final = 30.0


class Gateway:
    """The server end of the device topics; thread-safe.

    Args:
        registry: the fleet registry.
        client: the server's MQTT session, any ``Transport`` (in production
            ``MqttClient(MqttConfig(device_id="<label>.server", announce_status=False,
            clean_start=False, ...))``); connected by the caller before or after ``start``.
        config: settings (validated here).
        clock: wall clock (seconds); used for rate-limited logging.
        rate_clock: monotonic clock (seconds) of the per-device message rate limit (a test
            moves it by hand instead of waiting for tokens).

    Raises:
        ServerConfigError: ``config`` is invalid.
    """

    def __init__(
        self,
        registry: Registry,
        client: Transport,
        config: GatewayConfig,
        *,
        clock: Callable[[], float] = time.time,
        rate_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        config.validate()
        self._registry = registry
        self._client = client
        self._config = config
        self._clock = clock
        self._topics = Topics(config.prefix)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._messages: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self._last_log: dict[str, float] = {}
        self._presence = PresenceBook(config.presence_timeout_seconds)
        self._misbehaviour = MisbehaviourBook()
        self._entitlements = Entitlements(self._entitled_bundles)
        self._stop = threading.Event()
        self._diagnostics: Diagnostics | None = None
        self._housekeeper: threading.Thread | None = None
        self._seen_connects = 0
        self._limiter = RateLimiter(
            config.device_rate_per_second,
            config.device_burst,
            clock=rate_clock,
            max_clients=1_000_000,
        )
        self._ingest = IngestWorker(
            registry,
            self._ack,
            max_batch=config.ingest_max_batch,
            max_wait=config.ingest_max_wait_seconds,
            capacity=max(10_000, 20 * config.ingest_max_batch),
            per_device=config.device_queue,
            on_refused=self._misbehaviour.add,
        )
        self._blocks = BlockServer(
            registry,
            client,
            self._topics,
            bundles_dir=Path(config.bundles_dir),
            block_size=config.block_size,
            broadcast_min_devices=config.broadcast_min_devices,
            round_seconds=config.resend_round_seconds,
            pacer=Pacer(config.max_blocks_per_second),
            count=self._count,
            entitled=self._entitlements.allows,
            refuse=self._misbehaviour.add,
        )

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the worker threads and subscribe (now if connected, else on connect).

        Raises:
            SubscribeError: the broker refused a subscription.
            TransportTimeoutError: no SUBACK within ``SUBACK_TIMEOUT_S``.
        """
        self._ingest.start()
        self._blocks.start()
        self._housekeeper = threading.Thread(
            target=self._housekeep, name="fleet-housekeeping", daemon=True
        )
        self._housekeeper.start()
        for sub in self._topics.gateway_subscriptions(self._config.share_group):
            self._client.subscribe(
                sub.filter, self._on_message, qos=sub.qos, timeout=SUBACK_TIMEOUT_S
            )

    def close(self) -> None:
        """Stop the threads; telemetry already queued is stored (and acked if connected).

        Does not close the MQTT client. Never raises.
        """
        self._stop.set()
        if self._housekeeper is not None:
            self._housekeeper.join(5.0)
        self._blocks.close()
        self._ingest.close()

    # ------------------------------------------------------------------ public API
    def attach_diagnostics(self, diagnostics: Diagnostics) -> None:
        """Route command answers and upload blocks to ``diagnostics`` (before ``start``)."""
        self._diagnostics = diagnostics

    def publish_desired(self, device_id: str, document: bytes) -> None:
        """Publish a signed desired-state document, retained, QoS 1, to the device.

        Raises:
            ContractError: ``device_id`` is not a valid device id.
            NotConnectedError: no live MQTT session (it is republished on the next connect).
            PublishError: the client refused the message.
        """
        self._entitlements.forget(device_id)
        p = self._topics.publication("desired", device_id)
        self._client.publish(p.topic, document, p.qos, p.retain)
        self._count("desired_published", 1)

    def drain(self, timeout: float) -> bool:
        """Wait until the telemetry queued so far is stored (or refused) and its acks handed
        to the client; for tests, which wait on this instead of sleeping.

        Messages the MQTT client has received but not yet passed to the gateway are not covered.

        Returns:
            False if the ingest was not idle within ``timeout`` seconds.
        """
        return self._ingest.drain(timeout)

    def start_wave(self, sha256: str) -> str:
        """Broadcast every block of a published bundle once on its wave topic, paced.

        Returns:
            The wave id (the transfer id; the topic is ``<prefix>/broadcast/<wave id>``).

        Raises:
            ModelNotPublishedError: no published bundle has this SHA-256, or its file in
                ``bundles_dir`` is missing or does not match.
            RegistryUnavailableError: the database failed.
            ContractError: the bundle cannot be cut into blocks of ``block_size``.
        """
        return self._blocks.start_wave(sha256)

    def stats(self) -> GatewayStats:
        """A consistent snapshot of every counter."""
        ingest = self._ingest.stats()
        with self._lock:
            c = self._counts
            rejected = Counter(self._rejected)
            rejected.update(dict(ingest.refused))
            if ingest.dropped_queue_full:
                rejected["queue_full"] += ingest.dropped_queue_full
            online = self._presence.view()
            return GatewayStats(
                messages=dict(self._messages),
                items_inserted=ingest.inserted,
                duplicates=ingest.duplicates,
                lost=ingest.lost,
                rejected=dict(rejected),
                acks_sent=c["acks_sent"],
                ack_failures=c["ack_failures"],
                db_failures=c["db_failures"] + ingest.db_failures,
                ingest_pending=self._ingest.pending(),
                block_requests=c["block_requests"],
                blocks_unicast=c["blocks_unicast"],
                blocks_broadcast=c["blocks_broadcast"],
                reported_stored=c["reported_stored"],
                reported_labels_refused=c["reported_labels_refused"],
                desired_published=c["desired_published"],
                devices_online=sum(1 for s in online.values() if s.state == "online"),
                retained_cleared=c["retained_cleared"],
                ingest_isolations=ingest.isolations,
            )

    def online(self) -> dict[str, StatusMessage]:
        """Every device's effective status (online and offline; see ``PresenceBook``)."""
        return self._presence.view()

    def misbehaviour(
        self, device_id: str | None = None, *, top: int = 20
    ) -> list[DeviceMisbehaviour]:
        """Refusals per device: one device's (``device_id``) or the ``top`` worst, most first."""
        if device_id is not None:
            return [self._misbehaviour.of(device_id)]
        return self._misbehaviour.top(top)

    # ------------------------------------------------------------------ handlers
    def _on_message(self, message: Message) -> None:
        """Dispatch one message (MQTT handler thread). Never raises."""
        try:
            kind, device_id = self._topics.parse(message.topic)
        except ContractError:
            self._reject("malformed", None)
            return
        if device_id is None:
            return
        with self._lock:
            self._messages[kind] += 1
        if not message.retain:
            self._presence.heard(device_id)
        if kind != "status" and self._limiter.acquire(device_id) > 0:
            self._reject("rate_limited", device_id)  # not acked: the device sends it again
            return
        if kind in ("command_resp", "upload_data"):
            self._on_diagnostics(kind, device_id, message)
            return
        handler = {
            "telemetry": self._on_telemetry,
            "events": self._on_telemetry,
            "reported": self._on_reported,
            "status": self._on_status,
            "blocks_req": self._on_block_request,
        }.get(kind)
        if handler is None:
            return
        try:
            handler(kind, device_id, message.payload)
        except Exception:  # a bug must not stop the handler thread; count and go on
            self._reject("malformed", device_id)
            log.exception("gateway handler for %s failed", message.topic)

    def _on_diagnostics(self, kind: str, device_id: str, message: Message) -> None:
        diagnostics = self._diagnostics
        if diagnostics is None:
            return  # this worker issues no commands
        try:
            if kind == "upload_data":
                diagnostics.on_upload_block(device_id, message)
                return
            dropped = diagnostics.on_answer(device_id, message)
        except EdgefleetError as exc:
            self._count("db_failures", 1)
            log.warning("command answer of %s not recorded: %s", device_id, exc)
            return
        if dropped in ("answer_malformed", "answer_uncorrelated", "offer_malformed"):
            self._reject("malformed", device_id)

    def _on_telemetry(self, kind: str, device_id: str, payload: bytes) -> None:
        parsed = parse_telemetry(kind, device_id, payload)
        if isinstance(parsed, str):
            self._reject(parsed, device_id)
        else:
            self._ingest.put(parsed)

    def _on_reported(self, _kind: str, device_id: str, payload: bytes) -> None:
        if not payload:
            return  # a retained message being cleared
        if len(payload) > MAX_REPORTED_BYTES:
            self._reject("oversized", device_id, clear="reported")
            return
        try:
            state = ReportedState.from_bytes(payload)
        except ContractError:
            self._reject("malformed", device_id, clear="reported")
            return
        if state.device_id != device_id:
            self._reject("device_mismatch", device_id, clear="reported")
            return
        try:
            self._registry.record_reported(device_id, state.to_dict())
        except RegistryUnavailableError as exc:
            self._count("db_failures", 1)
            log.warning("reported state of %s not stored: %s", device_id, exc)
            return
        except RegistryError as exc:
            self._reject(refusal_reason(exc), device_id)
            return
        self._count("reported_stored", 1)
        if state.labels_refused:
            self._count("reported_labels_refused", state.labels_refused)

    def _on_status(self, _kind: str, device_id: str, payload: bytes) -> None:
        if not payload:
            self._presence.status(device_id, None)
            return
        try:
            status = StatusMessage.from_bytes(payload)
        except ContractError:
            reason = "oversized" if len(payload) > 4096 else "malformed"
            self._reject(reason, device_id, clear="status")
            return
        if status.device_id != device_id:
            self._reject("device_mismatch", device_id, clear="status")
            return
        # The broker keeps per-topic order, so the last one received is the current one
        # (comparing ``at`` would be wrong: the will carries its connection's time).
        self._presence.status(device_id, status)

    def _on_block_request(self, _kind: str, device_id: str, payload: bytes) -> None:
        self._count("block_requests", 1)
        if len(payload) > MAX_MESSAGE_BYTES:
            self._reject("oversized", device_id)
            return
        try:
            request = BlockRequest.from_bytes(payload)
        except EdgefleetError:
            self._reject("malformed", device_id)
            return
        self._blocks.submit(device_id, request)

    # ------------------------------------------------------------------ acks
    def _ack(self, result: IngestResult) -> None:
        """Publish the acknowledgement of one stored message (ingest thread).

        QoS 0: an ack is cumulative and the device resends whatever stays unacknowledged, so a
        lost one costs a resend; at QoS 1 it would wait in the client's window of unacked
        publishes, which a broker that drops PUBACKs under a flood (Mosquitto 2.0 past
        ``max_queued_messages``) freezes until the session reconnects.
        """
        ack = TelemetryAck(
            device_id=result.device_id,
            upto_seq=result.acked_upto,
            accepts=ACCEPTED_ENCODINGS if self._config.packed_telemetry else (),
        )
        try:
            p = self._topics.publication("ack", result.device_id)
            self._client.publish(p.topic, ack.to_bytes(), p.qos, p.retain)
        except (TransportError, ContractError):
            self._count("ack_failures", 1)
            return
        self._count("acks_sent", 1)

    # ------------------------------------------------------------------ entitlements
    def _entitled_bundles(self, device_id: str) -> frozenset[str]:
        """SHA-256s of the bundles the device's newest stored desired state names (serving
        bundles, shadows and the agent package).

        Raises:
            RegistryError: the database failed.
            MetadataFormatError: the stored document does not parse.
        """
        record = self._registry.latest_desired(device_id)
        if record is None:
            return frozenset()
        desired = parse_document(record.document)
        shadows = (a.shadow.bundle_sha256 for a in desired.models.values() if a.shadow)
        agent = () if desired.agent is None else (desired.agent.bundle_sha256,)
        return frozenset((*(a.bundle_sha256 for a in desired.models.values()), *shadows, *agent))

    # ------------------------------------------------------------------ housekeeping
    def _housekeep(self) -> None:
        while not self._stop.wait(_HOUSEKEEPING_EVERY):
            connects = self._client.stats().connects
            if connects > self._seen_connects and self._client.connected:
                try:
                    self._republish_desired()
                except (TransportError, RegistryError) as exc:
                    log.info("desired-state republish incomplete, retrying: %s", exc)
                    continue
                self._seen_connects = connects

    def _republish_desired(self) -> None:
        """Publish every active device's latest desired state again (retained).

        Raises:
            TransportError: the session dropped meanwhile.
            RegistryError: the database failed.
        """
        n = 0
        # One query per page of devices: a query per device made every (re)connect of every
        # worker cost a database round trip per enrolled device, beside the ingest.
        for record in self._registry.latest_desired_all():
            if self._stop.is_set():
                return
            self.publish_desired(record.device_id, record.document)
            n += 1
        log.info("republished %d desired-state documents", n)

    # ------------------------------------------------------------------ counting
    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            if name in REJECT_REASONS:
                self._rejected[name] += n
            else:
                self._counts[name] += n

    def _reject(self, reason: str, device_id: str | None, *, clear: str | None = None) -> None:
        """Count a refused message against its device; ``clear``: the retained topic kind
        (``status``/``reported``) to empty so the broker stops handing the garbage out."""
        now = self._clock()
        with self._lock:
            self._rejected[reason] += 1
            quiet = now - self._last_log.get(reason, -math.inf) < _LOG_EVERY
            if not quiet:
                self._last_log[reason] = now
        if device_id is not None:
            self._misbehaviour.add(device_id, reason)
        if not quiet:
            log.warning("gateway rejected a message (%s) from %s", reason, device_id)
        if clear is not None and device_id is not None and self._limiter.acquire(device_id) == 0:
            try:
                # An empty retained message clears it; ``clear`` is a retained kind.
                p = self._topics.publication(clear, device_id)
                self._client.publish(p.topic, b"", p.qos, p.retain)
            except (TransportError, ContractError):
                return
            self._count("retained_cleared", 1)
