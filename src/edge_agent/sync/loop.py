"""Fleet sync: the device's MQTT loop (desired state in, bundles in blocks, telemetry out).

Owns the orchestration on the device; every decision lives in a pure module it calls:

- **Desired state** (retained ``.../desired``): verified with the online key, expiry and the
  anti-replay version (``trust.desired.verify_desired_state``), persisted atomically once
  accepted, then applied model by model by ``deploy.Deployer`` (revert to a kept version,
  download, verify, install; see there).
- **Bundles** arrive in blocks (``download.Download``: windowed requests on ``.../blocks/req``,
  blocks on ``.../blocks/resp`` or a wave's ``<prefix>/broadcast/<transfer id>``); a partial file
  survives restarts.
- **Reported state** (retained ``.../reported``, ``reported.ReportedState``) whenever what the
  device runs or downloads changes, and again after every reconnect.
- **Telemetry**: a report every ``report_interval_seconds`` and every agent event go through the
  on-disk outbox and ``uplink.Uplink`` (acknowledged batches, the one path of an event); drift
  windows that start an alert add a ``drift_alert`` event, the cloud fallback's breaker adds
  ``fallback_breaker_open``/``_closed``.

Subscribes to the device role's list in ``Topics`` (``sync_subscriptions``) and talks to the
broker only through ``edge_agent.common.transport.Transport`` (the paho adapter in production,
``edge_agent.common.memory_broker`` in unit tests, driven with ``start(background=False)`` and
``step``).

Threads: MQTT handlers (on the adapter's handler thread) only queue or write a block; one sync
thread does everything else, so installs never run concurrently. The agent keeps serving its
current models through every fault here (broker or server down, a bad document, a bad bundle).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge_agent import __version__
from edge_agent.common.durable import write_atomic
from edge_agent.common.identity import IdentityStore
from edge_agent.common.mqtt import MqttClient, MqttConfig
from edge_agent.common.mqtt_types import Handler, Message
from edge_agent.common.transport import Transport
from edge_agent.config import AgentConfig
from edge_agent.errors import (
    EdgefleetError,
    ExpiredMetadataError,
    OutboxCorruptError,
    TransportError,
)
from edge_agent.serving.agent import Agent
from edge_agent.strict_json import loads as strict_loads
from edge_agent.sync.deploy import Deployer
from edge_agent.sync.outbox import Outbox
from edge_agent.sync.uplink import MAX_ITEM_BYTES, Uplink
from edge_agent.trust import split_roots
from edge_agent.trust.desired import (
    DesiredState,
    verify_desired_state,
)
from edge_agent.wire.reported import ModelReport, ReportedState
from edge_agent.wire.telemetry import Resources, event_from_registry, report_from_status
from edge_agent.wire.telemetry_build import drift_alert_entries
from edge_agent.wire.topics import Topics
from edge_agent.wire.transfer import BlockData, BlockRequest

__all__ = ["SyncAgent", "sync_client"]

log = logging.getLogger("edge_agent.sync.loop")

TICK_SECONDS = 0.2
#: A report must fit one telemetry message with room to spare for the batch around it.
MAX_REPORT_BYTES = MAX_ITEM_BYTES
PROGRESS_REPORT_SECONDS = 1.0
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
    ) -> None:
        """Open the outbox and prepare (not open) the MQTT session.

        ``client`` is any ``Transport`` (default: ``sync_client(config)``, the paho adapter;
        ``edge_agent.common.memory_broker.MemoryClient`` in unit tests).

        Raises:
            ConfigError: invalid MQTT settings.
            TransportError: the identity's TLS material cannot be loaded.
            OutboxError: the outbox cannot be created.
        """
        sync = config.sync
        self._config = config
        self._agent = agent
        self._store = agent.store
        self._clock = clock
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
        )
        self._desired_path = self._dir / "desired.json"
        self._accepted: DesiredState | None = None
        self._accepted_bytes = b""
        self._saved_version = 0  # of a saved document that no longer verifies (replays)
        self._last_message = b""
        self._inbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._events: queue.SimpleQueue[dict[str, object]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._deploy = Deployer(agent, self._dir, sync, event=self._event, wake=self._wake.set)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_reported = b""
        self._reported_at = 0.0
        self._windows_dropped = 0
        self._status_path = self._dir / "status.json"
        self._status_written = b""
        self._status_at = 0.0
        self._connects = 0
        self._drops = 0
        self._report_due = time.monotonic() + FIRST_REPORT_SECONDS
        self._window_start = clock()
        self._counts: dict[str, int] = {
            "desired_accepted": 0,
            "desired_rejected": 0,
            "root_rotations": 0,
            "roots_rejected": 0,
        }

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
        }

    def close(self) -> None:
        """Stop the thread, keep partial downloads for the next start, disconnect. Never raises."""
        self._stop.set()
        self._wake.set()
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
        """Desired states accepted/rejected, bad blocks, installs and install failures."""
        return {**self._counts, **self._deploy.counts}

    def status(self) -> dict[str, Any]:
        """A JSON-safe snapshot for ``edge-agent status``."""
        return {
            "connected": self.client.connected,
            "desired_version": self._accepted.version if self._accepted else 0,
            "root_version": self._store.root.version,
            **self._deploy.status(),
            "counts": self.counts,
            "uplink": vars(self.uplink.stats()),
            "outbox_entries": self.outbox.stats().entries,
        }

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
            self._last_reported = b""  # the broker may have lost the retained copy
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
        self._deploy.drive(self._request_blocks)
        self._drain_events()
        if time.monotonic() >= self._report_due:
            self._report_due = time.monotonic() + self._config.sync.report_interval_seconds
            self._add_report()
        self.uplink.pump()
        state = self.reported()  # read once a step: it reads every model's state from disk
        self._publish_reported(state)
        self._write_status(state)

    # ------------------------------------------------------------------ desired state
    def _load_accepted(self) -> None:
        try:
            data = self._desired_path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("cannot read the accepted desired state: %s", exc)
            return
        try:
            state = verify_desired_state(
                self._store.root,
                data,
                now=datetime.now(UTC),
                device_id=self._device_id,
                last_version=0,
            )
        except EdgefleetError as exc:
            # Expired while the agent was down, or damaged: keep serving what is installed and
            # wait for a newer document (a replay of this one stays refused by its version).
            log.warning("accepted desired state no longer applies: %s", exc)
            self._accepted_bytes = data
            self._saved_version = _saved_version(data)
            return
        self._accepted, self._accepted_bytes = state, data
        self._deploy.apply(state)

    def _handle_desired(self, message: bytes) -> None:
        if message == self._last_message:
            return  # the accepted message's retained copy again (every reconnect)
        try:
            data, roots = split_roots(message)
        except EdgefleetError as exc:
            self._refuse_desired(exc)
            return
        if roots:
            self._rotate_root(roots)  # first: the desired state may need the new keys
        if data == self._accepted_bytes:
            self._last_message = message
            return
        last = self._accepted.version if self._accepted else self._saved_version
        try:
            state = verify_desired_state(
                self._store.root,
                data,
                now=datetime.now(UTC),
                device_id=self._device_id,
                last_version=last,
            )
        except EdgefleetError as exc:
            self._refuse_desired(exc)
            return
        try:
            write_atomic(self._desired_path, data, mode=0o600)
        except OSError as exc:
            log.error("cannot persist the desired state, not acting on it: %s", exc)
            return
        self._counts["desired_accepted"] += 1
        log.info("desired state v%d accepted: %s", state.version, dict(state.models))
        self._accepted, self._accepted_bytes = state, data
        self._last_message = message  # a refused one is judged again when it comes again
        self._deploy.apply(state)

    def _refuse_desired(self, exc: EdgefleetError) -> None:
        self._counts["desired_rejected"] += 1
        log.warning("desired state refused: %s", exc)
        self._event(None, None, "desired_rejected", str(exc))

    def _rotate_root(self, roots: tuple[bytes, ...]) -> None:
        """Walk the root chain that came with a desired state; the store persists the result.

        A refused chain changes nothing (the device keeps its root) and is reported as a
        ``desired_rejected`` event; the desired state beside it is still judged on its own.
        """
        before = self._store.root.version
        try:
            root = self._store.update_roots(roots)
        except ExpiredMetadataError as exc:  # walked and kept, but the final root has expired
            self._counts["root_rotations"] += 1
            version = self._store.root.version
            log.error("trusted root v%d has expired; nothing new is acted on: %s", version, exc)
            self._event(None, None, "desired_rejected", f"root chain: {exc}")
            return
        except EdgefleetError as exc:
            self._counts["roots_rejected"] += 1
            log.warning("root chain refused, keeping root v%d: %s", before, exc)
            self._event(None, None, "desired_rejected", f"root chain refused: {exc}")
            return
        if root.version != before:
            self._counts["root_rotations"] += 1  # the store logs the rotation

    # ------------------------------------------------------------------ telemetry
    def _event(self, model: str | None, version: int | None, kind: str, detail: str) -> None:
        self._events.put(
            {"model": model, "version": version, "event": kind, "detail": detail, "at": time.time()}
        )

    def _drain_events(self) -> None:
        while True:
            try:
                entry = self._events.get_nowait()
            except queue.Empty:
                return
            try:
                event = event_from_registry(self._device_id, 0, entry)
                if event is not None:
                    self.uplink.add_event(event)
            except EdgefleetError as exc:
                log.error("event not recorded: %s", exc)

    def _add_report(self) -> None:
        windows = []
        while self._agent.drift_windows:
            try:
                windows.append(self._agent.drift_windows.popleft())
            except IndexError:
                break
        now = self._clock()
        try:
            dropped = {kind: d.entries for (_p, kind), d in self.outbox.dropped().items()}
            up = self.uplink.stats()
            if up.unsendable_dropped:
                dropped["unsendable"] = up.unsendable_dropped
            status = self._agent.status()
            resources = _resources(self._agent.registry.memory_used())
            kept = windows
            while True:
                if self._windows_dropped:
                    dropped["drift_windows"] = self._windows_dropped
                report = report_from_status(
                    self._device_id,
                    0,
                    status,
                    kept,
                    now,
                    window_start=self._window_start,
                    resources=resources,
                    telemetry_dropped=dropped,
                )
                if len(report.to_bytes()) <= MAX_REPORT_BYTES or not kept:
                    break
                # Too many or too wide drift windows for one message: keep the newest half
                # and count the rest (a report the server would refuse would jam the outbox).
                self._windows_dropped += len(kept) - len(kept) // 2
                kept = kept[len(kept) - len(kept) // 2 :] if len(kept) > 1 else []
            self.uplink.add_report(report)
        except EdgefleetError as exc:
            # Keep the windows for the next report (the outbox may be full for a moment).
            self._agent.drift_windows.extendleft(reversed(windows))
            log.error("telemetry report not recorded: %s", exc)
            return
        self._window_start = now
        for entry in drift_alert_entries(windows, now):  # once: windows are not re-read now
            self._events.put(entry)

    # ------------------------------------------------------------------ reported state
    def reported(self) -> ReportedState:
        """What the device runs and downloads now."""
        accepted = self._accepted.models if self._accepted else {}
        progress = self._deploy.progress()
        models = {}
        for name in sorted(set(self._agent.store.names()) | set(accepted))[:32]:
            try:
                st = self._agent.store.state(name)
            except EdgefleetError:
                continue
            a = accepted.get(name)
            outcome, reason = self._deploy.outcomes.get(name, ("pending", ""))
            models[name] = ModelReport(
                active=st.active,
                kept=tuple(sorted((r.version for r in st.versions), reverse=True))[:16],
                assigned=a.version if a else None,
                outcome=outcome,
                reason=reason[:1024],
                transfer=progress.get(name),
            )
        return ReportedState(
            device_id=self._device_id,
            at=self._clock(),
            agent_version=__version__,
            desired_version=self._accepted.version if self._accepted else 0,
            models=models,
        )

    def _publish_reported(self, state: ReportedState) -> None:
        body = dataclasses.replace(state, at=0.0).to_bytes()  # what changed, not when
        now = time.monotonic()
        if body == self._last_reported:
            return
        downloading = any(m.transfer is not None for m in state.models.values())
        if (
            downloading
            and self._last_reported
            and now - self._reported_at < PROGRESS_REPORT_SECONDS
        ):
            return
        try:
            self.client.publish(
                self._topics.device("reported", self._device_id), state.to_bytes(), 1, True
            )
        except TransportError:
            return  # offline: published after the reconnect
        self._last_reported = body
        self._reported_at = now

    def _write_status(self, state: ReportedState) -> None:
        """``status.json`` beside the outbox for ``edge-agent status`` (at most once a second)."""
        now = time.monotonic()
        if now - self._status_at < 1.0:
            return
        self._status_at = now
        try:
            body = json.dumps(
                {**self.status(), "reported": state.to_dict()}, sort_keys=True
            ).encode()
        except (EdgefleetError, ValueError, TypeError) as exc:
            log.debug("sync status not written: %s", exc)
            return
        if body != self._status_written:
            try:
                write_atomic(self._status_path, body)
            except OSError as exc:
                log.debug("sync status not written: %s", exc)
                return
            self._status_written = body

    # ------------------------------------------------------------------ helpers
    def _request_blocks(self, request: BlockRequest) -> None:
        self._publish(self._topics.device("blocks_req", self._device_id), request.to_bytes())

    def _publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, 1, False)


def sync_client(config: AgentConfig) -> MqttClient:
    """The device's MQTT session for ``config.sync`` (not connected yet).

    Shared by the sync loop and the cloud-fallback transport: one TLS session per device.

    Raises:
        ConfigError: invalid MQTT settings.
        TransportError: the identity's TLS material cannot be loaded.
    """
    sync = config.sync
    identity = IdentityStore(Path(sync.identity_dir))
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


def _saved_version(data: bytes) -> int:
    """The version of the saved document that failed verification at start (expired, most
    likely): it still counts, so a replay of it stays refused. 0 when unreadable (damaged)."""
    try:
        doc = strict_loads(data, max_bytes=len(data), what="saved desired state")
    except EdgefleetError:
        return 0
    signed = doc.get("signed") if isinstance(doc, dict) else None
    version = signed.get("version") if isinstance(signed, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) else 0


def _resources(model_memory: int) -> Resources:
    rss = 0
    try:
        statm = Path("/proc/self/statm").read_text()
        rss = int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return Resources(
        rss_bytes=rss, cpu_seconds=t.user + t.system, model_memory_bytes=max(0, model_memory)
    )
