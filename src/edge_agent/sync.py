"""Fleet sync: the device's MQTT loop (desired state in, bundles in blocks, telemetry out).

Owns the orchestration on the device; every decision lives in a pure module it calls:

- **Desired state** (retained ``.../desired``): verified with the online key, expiry and the
  anti-replay version (``trust.desired.verify_desired_state``), persisted atomically once
  accepted, then applied model by model: nothing to do when the version is active; a version that
  failed here before is not fetched again; an older version still kept on disk is switched to;
  anything else is downloaded.
- **Bundles** arrive in blocks (``download.Download``: windowed requests on ``.../blocks/req``,
  blocks on ``.../blocks/resp`` or a wave's ``<prefix>/broadcast/<transfer id>``); a partial file
  survives restarts. The finished file is checked against the signed length and digest, its
  ``targets.json`` against the assignment, and only then given to the model store, which verifies
  the builder signatures again and health-checks the new version (rolling back by itself).
- **Reported state** (retained ``.../reported``, ``reported.ReportedState``) whenever what the
  device runs or downloads changes, and again after every reconnect.
- **Telemetry**: a report every ``report_interval_seconds`` and every agent event go through the
  on-disk outbox and ``uplink.Uplink`` (acknowledged batches); events are also published live.

Threads: MQTT handlers (on the adapter's handler thread) only queue or write a block; one sync
thread does everything else, so installs never run concurrently. The agent keeps serving its
current models through every fault here (broker or server down, a bad document, a bad bundle).
"""

from __future__ import annotations

import contextlib
import hashlib
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
from edge_agent.agent import Agent
from edge_agent.bundle import read_raw
from edge_agent.config import AgentConfig
from edge_agent.contract import BundleManifest
from edge_agent.download import Download
from edge_agent.durable import write_atomic
from edge_agent.errors import EdgefleetError, OutboxCorruptError, TransportError
from edge_agent.identity import IdentityStore
from edge_agent.mqtt import Message, MqttClient, MqttConfig
from edge_agent.outbox import Outbox
from edge_agent.reported import ModelReport, ReportedState, TransferReport
from edge_agent.telemetry import Resources, event_from_registry, report_from_status
from edge_agent.topics import Topics
from edge_agent.transfer import BlockData
from edge_agent.trust.desired import (
    DesiredState,
    ModelAssignment,
    check_bundle_identity,
    check_targets_digest,
    verify_desired_state,
)
from edge_agent.uplink import MAX_ITEM_BYTES, Uplink

__all__ = ["SyncAgent", "sync_client"]

log = logging.getLogger("edge_agent.sync")

TICK_SECONDS = 0.2
#: Bundles refused here that are remembered (by SHA-256) so they are not fetched again.
MAX_REFUSED = 64
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
        client: MqttClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Open the outbox and prepare (not open) the MQTT session.

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
        self.client = client or sync_client(config)
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
            events_topic=self._topics.device("events", self._device_id),
            max_items=sync.batch_max_items,
            max_bytes=sync.batch_max_bytes,
            ack_timeout=sync.ack_timeout_seconds,
        )
        self._desired_path = self._dir / "desired.json"
        self._accepted: DesiredState | None = None
        self._accepted_bytes = b""
        self._downloads: dict[str, Download] = {}
        self._dl_lock = threading.Lock()
        self._outcomes: dict[str, tuple[str, str]] = {}
        self._inbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._events: queue.SimpleQueue[dict[str, object]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_reported = b""
        self._reported_at = 0.0
        self._logged_quarter: dict[str, int] = {}
        self._refused_path = self._dir / "refused.json"
        self._refused: dict[str, str] = {}
        self._windows_dropped = 0
        self._status_path = self._dir / "status.json"
        self._status_written = b""
        self._status_at = 0.0
        self._connects = 0
        self._drops = 0
        self._report_due = time.monotonic() + FIRST_REPORT_SECONDS
        self._window_start = clock()
        self.counts: dict[str, int] = {
            "desired_accepted": 0,
            "desired_rejected": 0,
            "bad_blocks": 0,
            "installs": 0,
            "install_failures": 0,
        }

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Subscribe, connect (in the background) and start the sync thread."""
        self._load_refused()
        self._load_accepted()
        self._agent.registry.event_sink = self._events.put
        t, d = self._topics, self._device_id
        self.client.subscribe(t.device("desired", d), lambda m: self._queue(m.payload))
        self.client.subscribe(t.device("ack", d), lambda m: self.uplink.on_ack(m.payload))
        self.client.subscribe(t.device("blocks_resp", d), self._on_block)
        self.client.subscribe(t.broadcast_filter(), self._on_block)
        self.client.connect()
        self._thread = threading.Thread(target=self._run, name="sync", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread, keep partial downloads for the next start, disconnect. Never raises."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
        self._agent.registry.event_sink = None
        busy = self._thread is not None and self._thread.is_alive()
        if busy:  # still installing: leave its files open for the process exit to close
            log.warning("sync thread still busy at shutdown; not waiting for it")
        else:
            with self._dl_lock:
                for dl in self._downloads.values():
                    dl.close()
        self.client.close()
        if not busy:
            self.outbox.close()

    def status(self) -> dict[str, Any]:
        """A JSON-safe snapshot for ``edge-agent status``."""
        with self._dl_lock:
            downloads = {
                n: {"version": d.assignment.version, "received": d.received, "total": d.total}
                for n, d in self._downloads.items()
            }
        return {
            "connected": self.client.connected,
            "desired_version": self._accepted.version if self._accepted else 0,
            "downloads": downloads,
            "outcomes": {n: {"outcome": o, "reason": r} for n, (o, r) in self._outcomes.items()},
            "counts": dict(self.counts),
            "uplink": vars(self.uplink.stats()),
            "outbox_entries": self.outbox.stats().entries,
        }

    # ------------------------------------------------------------------ handlers (MQTT thread)
    def _queue(self, payload: bytes) -> None:
        self._inbox.put(payload)
        self._wake.set()

    def _on_block(self, message: Message) -> None:
        try:
            block = BlockData.from_bytes(message.payload)
        except EdgefleetError as exc:
            self.counts["bad_blocks"] += 1
            log.debug("block refused: %s", exc)
            return
        with self._dl_lock:
            dl = next(
                (d for d in self._downloads.values() if d.transfer_id == block.transfer_id), None
            )
            if dl is None:
                return  # another transfer's wave, or one this device finished
            try:
                dl.accept(block)
            except EdgefleetError as exc:
                self.counts["bad_blocks"] += 1
                log.warning("%s: block %d refused: %s", dl.name, block.index, exc)
                return
            except OSError as exc:
                log.error("%s: cannot write block: %s", dl.name, exc)
                return
            if dl.complete:
                self._wake.set()

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
                topic = self._topics.device("desired", self._device_id)
                self.client.subscribe(topic, lambda m: self._queue(m.payload))
        while True:
            try:
                payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            self._handle_desired(payload)
        self._drive_downloads()
        self._drain_events()
        if time.monotonic() >= self._report_due:
            self._report_due = time.monotonic() + self._config.sync.report_interval_seconds
            self._add_report()
        self.uplink.pump()
        self._publish_reported()
        self._write_status()

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
            return
        self._accepted, self._accepted_bytes = state, data
        self._apply(state)

    def _handle_desired(self, data: bytes) -> None:
        if data == self._accepted_bytes:
            return  # the retained copy again (every reconnect)
        last = self._accepted.version if self._accepted else self._version_of_saved()
        try:
            state = verify_desired_state(
                self._store.root,
                data,
                now=datetime.now(UTC),
                device_id=self._device_id,
                last_version=last,
            )
        except EdgefleetError as exc:
            self.counts["desired_rejected"] += 1
            log.warning("desired state refused: %s", exc)
            self._event(None, None, "desired_rejected", str(exc))
            return
        try:
            write_atomic(self._desired_path, data, mode=0o600)
        except OSError as exc:
            log.error("cannot persist the desired state, not acting on it: %s", exc)
            return
        self.counts["desired_accepted"] += 1
        log.info("desired state v%d accepted: %s", state.version, dict(state.models))
        self._accepted, self._accepted_bytes = state, data
        self._apply(state)

    def _version_of_saved(self) -> int:
        # The saved document failed verification at start (expired): its version still counts.
        if not self._accepted_bytes:
            return 0
        try:
            signed = json.loads(self._accepted_bytes)["signed"]
            version = signed["version"]
            return version if isinstance(version, int) else 0
        except (ValueError, KeyError, TypeError):
            return 0

    def _apply(self, state: DesiredState) -> None:
        with self._dl_lock:
            for name in list(self._downloads):
                a = state.models.get(name)
                if a is None or a != self._downloads[name].assignment:
                    self._downloads.pop(name).abandon()
        for name, assignment in state.models.items():
            try:
                self._apply_one(name, assignment)
            except EdgefleetError as exc:
                self._outcomes[name] = ("failed", str(exc))
                log.error("%s: cannot apply v%d: %s", name, assignment.version, exc)
        self._prune_downloads(state)

    def _prune_downloads(self, state: DesiredState) -> None:
        """Delete partial or finished downloads of bundles no longer assigned (disk space)."""
        keep = {(n, a.bundle_sha256) for n, a in state.models.items()}
        root = self._dir / "downloads"
        try:
            dirs = [d for d in root.iterdir() if d.is_dir()] if root.is_dir() else []
            for d in dirs:
                for f in d.iterdir():
                    if (d.name, f.name.split(".", 1)[0]) not in keep:
                        f.unlink(missing_ok=True)
                        log.info("removed %s (no longer assigned)", f)
        except OSError as exc:
            log.warning("cannot prune old downloads: %s", exc)

    def _refuse(self, sha256: str, reason: str) -> None:
        """Remember a bundle that failed verification here, so it is not fetched again."""
        self._refused[sha256] = reason[:200]
        while len(self._refused) > MAX_REFUSED:
            self._refused.pop(next(iter(self._refused)))
        try:
            write_atomic(self._refused_path, json.dumps(self._refused).encode(), mode=0o600)
        except OSError as exc:
            log.warning("cannot persist refused bundles: %s", exc)

    def _load_refused(self) -> None:
        try:
            data = json.loads(self._refused_path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", self._refused_path, exc)
            return
        if isinstance(data, dict):
            self._refused = {str(k): str(v) for k, v in list(data.items())[-MAX_REFUSED:]}

    def _apply_one(self, name: str, a: ModelAssignment) -> None:
        st = self._store.state(name)
        record = next((r for r in st.versions if r.version == a.version), None)
        if st.active == a.version:
            self._outcomes[name] = ("installed", "")
            return
        if record is not None and record.status == "failed":
            self._outcomes[name] = ("failed", f"failed on this device before: {record.reason}")
            return
        if record is not None:  # kept on disk, not failed: the server sends the device back
            self._agent.revert_to(name, a.version, f"desired state names v{a.version}")
            self._outcomes[name] = self._outcome_of(name, a.version)
            return
        refused = self._refused.get(a.bundle_sha256)
        if refused is not None:  # verified and refused here before: not downloaded again
            self._outcomes[name] = ("failed", f"refused before: {refused}")
            return
        done = self._dir / "downloads" / name / f"{a.bundle_sha256}.bundle"
        if _sha256_of(done) == a.bundle_sha256:
            # Downloaded and verified before a crash or restart: install it, do not fetch again.
            log.info("%s v%d: installing the bundle downloaded before", name, a.version)
            self._install_file(name, a, done)
            return
        if a.version < st.high_water:
            self._outcomes[name] = (
                "failed",
                f"v{a.version} is older than v{st.high_water} (rollback protection)",
            )
            return
        with self._dl_lock:
            if name in self._downloads:
                return
            sync = self._config.sync
            try:
                dl = Download(
                    name,
                    a,
                    self._dir / "downloads" / name,
                    window=sync.block_window,
                    retry_seconds=sync.block_retry_seconds,
                )
            except OSError as exc:
                self._outcomes[name] = ("failed", f"cannot start the download: {exc}")
                return
            self._downloads[name] = dl
        self._outcomes[name] = ("downloading", "")
        log.info(
            "%s v%d: downloading %d bytes (%d/%d blocks already here)",
            name,
            a.version,
            a.bundle_length,
            dl.resumed_blocks,
            dl.total,
        )
        self._event(name, a.version, "transfer_started", f"{a.bundle_length} bytes")

    # ------------------------------------------------------------------ downloads
    def _drive_downloads(self) -> None:
        done: list[Download] = []
        with self._dl_lock:
            for dl in self._downloads.values():
                if dl.complete:
                    done.append(dl)
                    continue
                quarter = 4 * dl.received // dl.total
                if quarter > self._logged_quarter.get(dl.name, 0):
                    self._logged_quarter[dl.name] = quarter
                    log.info(
                        "%s v%d: %d/%d blocks",
                        dl.name,
                        dl.assignment.version,
                        dl.received,
                        dl.total,
                    )
                request = dl.due_request()
                if request is not None:
                    # Offline: asked again after block_retry_seconds.
                    with contextlib.suppress(TransportError):
                        topic = self._topics.device("blocks_req", self._device_id)
                        self._publish(topic, request.to_bytes())
            for dl in done:
                del self._downloads[dl.name]
                self._logged_quarter.pop(dl.name, None)
        for dl in done:  # outside the lock: installing takes a while, blocks may keep coming
            self._install(dl)

    def _install(self, dl: Download) -> None:
        name, a = dl.name, dl.assignment
        try:
            path = dl.finish()
        except (EdgefleetError, OSError) as exc:
            self._outcomes[name] = ("failed", f"download: {exc}")
            self._event(name, a.version, "transfer_failed", str(exc))
            return
        log.info("%s v%d: downloaded, installing", name, a.version)
        self._install_file(name, a, path)

    def _install_file(self, name: str, a: ModelAssignment, path: Path) -> None:
        """Check a complete, digest-verified download against ``a`` and install it."""
        try:
            raw = read_raw(path)
            check_targets_digest(a, raw.targets_bytes)
            check_bundle_identity(name, a, BundleManifest.from_bytes(raw.manifest_bytes))
            self._agent.install(path)
        except EdgefleetError as exc:
            self.counts["install_failures"] += 1
            self._outcomes[name] = ("failed", str(exc))
            self._event(name, a.version, "install_failed", str(exc))
            self._refuse(a.bundle_sha256, str(exc))
            log.error("%s v%d: install failed: %s", name, a.version, exc)
            return
        finally:
            path.unlink(missing_ok=True)
        self.counts["installs"] += 1
        self._outcomes[name] = self._outcome_of(name, a.version)
        if self._outcomes[name][0] == "installed":
            self._event(name, a.version, "installed", "")

    def _outcome_of(self, name: str, version: int) -> tuple[str, str]:
        """What the store says became of ``version``: serving, or rolled back and why."""
        st = self._store.state(name)
        if st.active == version:
            return ("installed", "")
        record = next((r for r in st.versions if r.version == version), None)
        return ("rolled_back", record.reason if record else f"v{st.active} is serving instead")

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

    # ------------------------------------------------------------------ reported state
    def reported(self) -> ReportedState:
        """What the device runs and downloads now."""
        accepted = self._accepted.models if self._accepted else {}
        with self._dl_lock:
            progress = {
                n: TransferReport(d.assignment.version, d.received, d.total, d.plan.length)
                for n, d in self._downloads.items()
            }
        models = {}
        for name in sorted(set(self._store.names()) | set(accepted))[:32]:
            try:
                st = self._store.state(name)
            except EdgefleetError:
                continue
            a = accepted.get(name)
            outcome, reason = self._outcomes.get(name, ("pending", ""))
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

    def _publish_reported(self) -> None:
        state = self.reported()
        body = ReportedState(
            state.device_id, 0.0, state.agent_version, state.desired_version, state.models
        ).to_bytes()
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

    def _write_status(self) -> None:
        """``status.json`` beside the outbox for ``edge-agent status`` (at most once a second)."""
        now = time.monotonic()
        if now - self._status_at < 1.0:
            return
        self._status_at = now
        try:
            body = json.dumps(
                {**self.status(), "reported": self.reported().to_dict()}, sort_keys=True
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
    def _publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, 1, False)


def _sha256_of(path: Path) -> str | None:
    """The file's SHA-256, or None when it is missing or unreadable."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


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
