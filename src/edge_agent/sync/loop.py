"""Fleet sync: the device's MQTT loop (desired state in, bundles in blocks, telemetry out).

Owns the orchestration on the device, its threads and its lifecycle; every step is done by a
module it drives:

- **Desired state** (retained ``.../desired``): queued by the MQTT handler, judged on the sync
  thread by ``desired_intake.DesiredIntake`` (root chain, then the document: online key, expiry,
  anti-replay version; persisted once accepted), then applied model by model by
  ``deploy.Deployer`` (revert to a kept version, download, verify, install; see there).
- **Bundles** arrive in blocks (``download.Download``: windowed requests on ``.../blocks/req``,
  blocks on ``.../blocks/resp`` or a wave's ``<prefix>/broadcast/<transfer id>``); a partial file
  survives restarts.
- **Reported state** (retained ``.../reported``, ``reporting.ReportedPublisher``) whenever what
  the device runs or downloads changes, and again after every reconnect; ``status.json`` beside
  it (``reporting.StatusFile``).
- **Remote diagnostics** (``.../commands``, ``.../upload/req``): handed to
  ``commands.CommandRunner``, which judges and runs each signed command on a thread of its own
  and answers on ``.../commands/resp``; a support bundle's blocks go out on ``.../upload/data``.
- **Certificate renewal** (``renewal.CertRenewer``, with the paho adapter only): a new key and
  CSR on ``.../cert/req`` before the certificate expires, a reconnect with the new pair, then a
  confirmation so the CA revokes the old one.
- **Telemetry**: a report every ``report_interval_seconds`` and every agent event go through
  ``telemetry_feed.TelemetryFeed`` into the on-disk outbox and ``uplink.Uplink`` (acknowledged
  batches, the one path of an event); drift windows that start an alert add a ``drift_alert``
  event, the cloud fallback's breaker adds ``fallback_breaker_open``/``_closed``.

Subscribes to the device role's list in ``Topics`` (``sync_subscriptions``) and talks to the
broker only through ``edge_agent.common.transport.Transport`` (the paho adapter in production,
``edge_agent.common.memory`` in unit tests, driven with ``start(background=False)`` and
``step``).

Threads: MQTT handlers (on the adapter's handler thread) only queue or write a block; one sync
thread does everything else, so installs never run concurrently. The agent keeps serving its
current models through every fault here (broker or server down, a bad document, a bad bundle).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge_agent import __version__
from edge_agent.common.identity import IdentityStore
from edge_agent.common.logring import LogRing
from edge_agent.common.mqtt import MqttClient
from edge_agent.common.mqtt_types import Handler, Message, MqttConfig
from edge_agent.common.transport import Transport
from edge_agent.config import AgentConfig
from edge_agent.errors import EdgefleetError, OutboxCorruptError, TransportError
from edge_agent.serving.agent import Agent
from edge_agent.sync.deploy import Deployer
from edge_agent.sync.desired_intake import DesiredIntake
from edge_agent.sync.ops.commands import CommandRunner, health_check
from edge_agent.sync.ops.renewal import CertRenewer, RenewalPolicy
from edge_agent.sync.ops.support_bundle import BundleSources
from edge_agent.sync.outbox import Outbox
from edge_agent.sync.reporting import ReportedPublisher, StatusFile, device_labels
from edge_agent.sync.telemetry_feed import TelemetryFeed
from edge_agent.sync.uplink import Uplink
from edge_agent.wire.reported import ReportedState
from edge_agent.wire.topics import Topics
from edge_agent.wire.transfer import BlockData, BlockRequest

__all__ = ["SyncAgent", "sync_client"]

log = logging.getLogger("edge_agent.sync.loop")

TICK_SECONDS = 0.2
FIRST_REPORT_SECONDS = 1.0


class SyncAgent:
    """The device's side of fleet sync. ``start`` once, ``close`` once; see the module doc."""

    def __init__(
        self,
        config: AgentConfig,
        agent: Agent,
        *,
        client: Transport | None = None,
        clock: Callable[[], float] = time.time,
        log_ring: LogRing | None = None,
        restart: Callable[[], None] | None = None,
    ) -> None:
        """Open the outbox and prepare (not open) the MQTT session.

        ``client`` is any ``Transport`` (default: ``sync_client(config)``, the paho adapter;
        ``edge_agent.common.memory.MemoryClient`` in unit tests). ``log_ring``: the recent
        log records a ``logs`` command reads (None: ``logs`` is refused); ``restart``: how a
        ``restart`` command stops the daemon (None: refused).

        Raises:
            ConfigError: invalid MQTT settings.
            TransportError: the identity's TLS material cannot be loaded.
            OutboxError: the outbox cannot be created.
        """
        sync = config.sync
        self._config = config
        self._agent = agent
        self._store = agent.store
        self._device_id = config.device_id
        self._topics = Topics(sync.prefix)
        self._dir = Path(config.store.state_dir) / "sync"
        self._dir.mkdir(parents=True, exist_ok=True)
        self.client: Transport = client or sync_client(config)
        outbox_path = self._dir / "outbox.db"
        try:
            self.outbox = Outbox(outbox_path, sync.outbox_max_bytes)
        except OutboxCorruptError as exc:
            log.error("telemetry outbox is corrupt, starting a new one: %s", exc)
            self.outbox = Outbox.recover(outbox_path, sync.outbox_max_bytes)
        self.uplink = Uplink(
            self.outbox,
            self._publish,
            device_id=self._device_id,
            telemetry_topic=self._topics.device("telemetry", self._device_id),
            max_items=sync.batch_max_items,
            max_bytes=sync.batch_max_bytes,
            ack_timeout=sync.ack_timeout_seconds,
            ack_timeout_max=sync.ack_timeout_max_seconds,
            coalesce_seconds=sync.report_coalesce_seconds,
        )
        self._desired_path = self._dir / "desired.json"
        self._inbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._events: queue.SimpleQueue[dict[str, object]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._feed = TelemetryFeed(
            agent, self.outbox, self.uplink, self._events, device_id=self._device_id, clock=clock
        )
        self._deploy = Deployer(agent, self._dir, sync, event=self._feed.event, wake=self._wake.set)
        self._intake = DesiredIntake(
            self._store,
            self._device_id,
            self._desired_path,
            apply=self._deploy.apply,
            event=self._feed.event,
        )
        self._reporter = ReportedPublisher(
            self._store,
            self._deploy,
            self.client,
            self._topics.publication("reported", self._device_id),
            device_id=self._device_id,
            clock=clock,
            labels=device_labels(config.labels),
        )
        self._status_file = StatusFile(self._dir / "status.json")
        self.commands = CommandRunner(
            self._device_id,
            self._store,
            self._dir,
            self.client,
            self._topics,
            commands_per_minute=sync.commands_per_minute,
            upload_bytes_per_day=sync.upload_bytes_per_day,
            sources=BundleSources(
                device_id=self._device_id,
                status=lambda: {"agent": agent.status(), "sync": self.status()},
                reported=lambda: self.reported().to_dict(),
                store=lambda: {n: self._store.state(n).to_dict() for n in self._store.names()},
                config=config,
                events=lambda: list(self._feed.recent),
                logs=log_ring,
            ),
            health_check=lambda model: health_check(agent, model),
            restart=restart,
            capture=agent.capture,
            clock=clock,
        )
        self._renewer: CertRenewer | None = None
        if isinstance(self.client, MqttClient):  # renewal switches the paho session's TLS
            cert_req = self._topics.publication("cert_req", self._device_id)
            transport = self.client
            self._renewer = CertRenewer(
                IdentityStore(Path(sync.identity_dir)),
                self._device_id,
                publish=lambda b: transport.publish(
                    cert_req.topic, b, cert_req.qos, cert_req.retain
                ),
                switch=self.client.switch_identity,
                event=lambda kind, detail: self._feed.event(None, None, kind, detail),
                policy=RenewalPolicy(
                    sync.renew_fraction,
                    sync.renew_timeout_seconds,
                    sync.renew_retry_min_seconds,
                    sync.renew_retry_max_seconds,
                ),
            )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connects = 0
        self._drops = 0
        self._report_due = time.monotonic() + FIRST_REPORT_SECONDS

    # ------------------------------------------------------------------ lifecycle
    def start(self, *, background: bool = True) -> None:
        """Subscribe (the device role's list in ``Topics``), connect and start the sync thread.

        ``background=False`` starts no thread: the caller drives the loop with ``step`` (tests
        on the in-memory transport and a fake clock).
        """
        self._deploy.load()
        self._load_accepted()
        self._agent.registry.event_sink = self._events.put
        if self._agent.cloud is not None:
            self._agent.cloud.event_sink = self._events.put
        for sub in self._topics.sync_subscriptions(self._device_id):
            self.client.subscribe(sub.filter, self._handlers[sub.kind], qos=sub.qos)
        self.client.connect()
        if background:
            self.commands.start()
            self._thread = threading.Thread(target=self._run, name="sync", daemon=True)
            self._thread.start()

    def step(self) -> None:
        """One pass of the sync thread's work (what it does on every tick or wake-up)."""
        self._step()

    @property
    def _handlers(self) -> dict[str, Handler]:
        """The handler of each kind in ``Topics.sync_subscriptions``."""
        return {
            "desired": self._on_desired,
            "ack": self._on_ack,
            "blocks_resp": self._on_block,
            "broadcast": self._on_block,
            "commands": self.commands.on_command,
            "upload_req": self.commands.on_upload_request,
            "cert_resp": self._renewer.on_response if self._renewer else _ignore,
        }

    def close(self) -> None:
        """Stop the thread, keep partial downloads for the next start, disconnect. Never raises."""
        self._stop.set()
        self._wake.set()
        self.commands.close()
        if self._thread is not None:
            self._thread.join(30)
        self._agent.registry.event_sink = None
        if self._agent.cloud is not None:
            self._agent.cloud.event_sink = None
        busy = self._thread is not None and self._thread.is_alive()
        if busy:  # still installing: leave its files open for the process exit to close
            log.warning("sync thread still busy at shutdown; not waiting for it")
        else:
            self._deploy.close()
        self.client.close()
        if not busy:
            self.outbox.close()

    @property
    def counts(self) -> dict[str, int]:
        """Desired states accepted/rejected, bad blocks, installs and install failures, and
        remote commands run and refused (``commands_ran_<name>``, ``commands_refused_<code>``)."""
        return {**self._intake.counts, **self._deploy.counts, **self.commands.stats()}

    def status(self) -> dict[str, Any]:
        """A JSON-safe snapshot for ``edge-agent status``."""
        accepted = self._intake.accepted
        return {
            "connected": self.client.connected,
            "desired_version": accepted.version if accepted else 0,
            "root_version": self._store.root.version,
            **self._deploy.status(),
            "counts": self.counts,
            "uplink": vars(self.uplink.stats()),
            "outbox_entries": self.outbox.stats().entries,
            "certificate": self._renewer.status() if self._renewer else None,
        }

    def has_reported(self) -> bool:
        """Connected, and this connection's reported state has been published."""
        return bool(self.client.connected) and self._reporter.published

    def reported(self) -> ReportedState:
        """What the device runs and downloads now."""
        return self._reporter.build(self._intake.accepted)

    # ------------------------------------------------------------------ handlers (MQTT thread)
    def _on_desired(self, message: Message) -> None:
        self._inbox.put(message.payload)
        self._wake.set()

    def _on_ack(self, message: Message) -> None:
        self.uplink.on_ack(message.payload)

    def _on_block(self, message: Message) -> None:
        try:
            block = BlockData.from_bytes(message.payload)
        except EdgefleetError as exc:
            self._deploy.counts["bad_blocks"] += 1
            log.debug("block refused: %s", exc)
            return
        self._deploy.accept_block(block)

    # ------------------------------------------------------------------ the sync thread
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(TICK_SECONDS)
            self._wake.clear()
            try:
                self._step()
            except Exception:  # the sync loop must outlive anything one step throws
                log.exception("sync step failed")

    def _step(self) -> None:
        stats = self.client.stats()
        if stats.connects != self._connects:
            self._connects = stats.connects
            self._reporter.forget()  # the broker may have lost the retained copy
            self.uplink.reset_in_flight()
        if stats.drops != self._drops:
            # The handler queue overflowed (a block wave): the desired state may have been one
            # of the dropped messages. Subscribing again makes the broker resend the retained
            # copy (an unchanged one is ignored); a lost ack only delays the next resend.
            self._drops = stats.drops
            with contextlib.suppress(TransportError):
                for sub in self._topics.sync_subscriptions(self._device_id):
                    if sub.kind == "desired":
                        self.client.subscribe(sub.filter, self._on_desired, qos=sub.qos)
        while True:
            try:
                payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            self._handle_desired(payload)
        if self._renewer is not None:
            self._renewer.drive()
        self._deploy.drive(self._request_blocks)
        self._feed.drain_events()
        if time.monotonic() >= self._report_due:
            self._report_due = time.monotonic() + self._config.sync.report_interval_seconds
            self._feed.add_report()
        self.uplink.pump()
        state = self.reported()  # read once a step: it reads every model's state from disk
        self._reporter.publish(state)
        self._status_file.write(self.status, state)

    # ------------------------------------------------------------------ desired state
    def _load_accepted(self) -> None:
        self._intake.load()

    def _handle_desired(self, message: bytes) -> None:
        self._intake.handle(message)

    # ------------------------------------------------------------------ helpers
    def _request_blocks(self, request: BlockRequest) -> None:
        self._publish(self._topics.device("blocks_req", self._device_id), request.to_bytes())

    def _publish(self, topic: str, payload: bytes) -> None:
        """Publish on one of this device's topics with its kind's QoS and retain flag."""
        p = self._topics.publication_of(topic)
        self.client.publish(p.topic, payload, p.qos, p.retain)


def _ignore(_message: Message) -> None:
    """Renewal responses when renewal is off (an in-memory transport in tests)."""


def sync_client(config: AgentConfig) -> MqttClient:
    """The device's MQTT session for ``config.sync`` (not connected yet).

    Shared by the sync loop and the cloud-fallback transport: one TLS session per device.

    Raises:
        ConfigError: invalid MQTT settings.
        TransportError: the identity's TLS material cannot be loaded.
    """
    sync = config.sync
    identity = IdentityStore(Path(sync.identity_dir))
    try:  # finish or discard a renewal a crash interrupted, before the files are loaded
        identity.recover(config.device_id, datetime.now(UTC))
    except OSError as exc:
        log.error("identity recovery failed: %s", exc)
    return MqttClient(
        MqttConfig(
            host=sync.host,
            port=sync.port,
            device_id=config.device_id,
            ca_path=identity.ca_path,
            cert_path=identity.cert_path,
            key_path=identity.key_path,
            prefix=sync.prefix,
            keepalive=sync.keepalive,
            reconnect_max=sync.reconnect_max_seconds,
            agent_version=__version__,
        )
    )
