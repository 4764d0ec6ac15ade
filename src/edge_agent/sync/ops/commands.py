"""Remote diagnostics on the device: judge each signed command, run it, answer it.

Owns the device's command workflow, on a thread of its own (a support bundle or a health check
must not hold up installs or telemetry on the sync thread):

1. The MQTT handler queues the message (at most ``QUEUE_SIZE``; beyond, it answers
   ``command_limited`` at once).
2. The command rate (``sync.commands_per_minute``, a token bucket) is checked first.
3. ``edge_agent.trust.command.verify_command``: online-key signature, expiry, this device,
   sequence greater than the last accepted one.
4. The sequence is persisted (``commands.json``, atomically) *before* anything runs, so a
   redelivered ``restart`` cannot restart the agent twice.
5. ``arguments()`` gives the typed arguments of a name on the fixed list, then the one function
   for that name runs: ``ping``, ``logs`` (the ``LogRing``), ``support-bundle`` (built by
   ``support_bundle``, offered by ``upload.UploadServer``), ``restart`` (the daemon's drain,
   then exit code ``EXIT_RESTART``), ``health-check`` (the model's golden samples),
   ``capture-config`` and ``capture-upload`` (``capture_upload.CaptureUploader``).

Every refusal is counted by its error code (``counts``) and answered on
``<prefix>/devices/<id>/commands/resp`` with the request's correlation data whenever the
message carried any (a message without correlation data gets no answer: there is nothing to
match it to). Nothing here runs a shell or a program: each name is one method.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from edge_agent import __version__
from edge_agent.common.durable import write_atomic
from edge_agent.common.logring import LogRing
from edge_agent.common.mqtt_types import Message, MessageProperties
from edge_agent.common.ratelimit import TokenBucket
from edge_agent.common.transport import Transport
from edge_agent.errors import (
    CommandFailedError,
    CommandLimitError,
    ContractError,
    EdgefleetError,
    TransportError,
)
from edge_agent.runtime.golden import check_golden
from edge_agent.serving.agent import Agent
from edge_agent.serving.capture import CaptureRing
from edge_agent.store import ModelStore
from edge_agent.strict_json import loads as strict_loads
from edge_agent.sync.ops.capture_upload import CaptureUploader
from edge_agent.sync.ops.support_bundle import BundleSources, build_support_bundle
from edge_agent.sync.ops.upload import UploadServer
from edge_agent.trust.capture_settings import UploadSettings
from edge_agent.trust.command import (
    MAX_COMMAND_BYTES,
    CaptureUploadArgs,
    CommandArgs,
    HealthCheckArgs,
    LogsArgs,
    SignedCommand,
    SupportBundleArgs,
    verify_command,
)
from edge_agent.wire.ops.diagnostics import MAX_CORRELATION_BYTES, CommandAnswer
from edge_agent.wire.topics import Topics

__all__ = ["EXIT_RESTART", "QUEUE_SIZE", "CommandRunner", "health_check"]

log = logging.getLogger("edge_agent.sync.ops.commands")

#: The exit code of ``edge-agent run`` after a ``restart`` command (EX_TEMPFAIL). The systemd
#: unit restarts the agent on it (``Restart=always``; ``RestartForceExitStatus=75`` also under
#: ``Restart=on-failure``); any other service manager must restart on a non-zero exit.
EXIT_RESTART: Final = 75
QUEUE_SIZE: Final = 32
#: How long a ``restart`` waits for its answer to reach the broker before draining.
ANSWER_WAIT_SECONDS: Final = 5.0


class CommandRunner:
    """One device's command intake; see the module doc. ``start`` once, ``close`` once.

    Args:
        device_id: this device.
        store: the model store (its trusted root verifies commands).
        directory: the sync state directory (``commands.json``, ``upload_budget.json``).
        client: the broker session.
        topics: the topic tree.
        commands_per_minute: the command rate.
        upload_bytes_per_day: the daily upload budget.
        sources: what a support bundle holds.
        health_check: runs a model's golden samples, returns a JSON-safe result; raises
            ``CommandFailedError`` when the model is not loaded.
        restart: asks the daemon to drain and exit with ``EXIT_RESTART``; None when the agent
            runs without a service manager (then ``restart`` is refused).
        capture: the capture ring, None when capture is off (then the ``capture-*`` commands
            fail).
        clock: wall-clock seconds.
    """

    def __init__(
        self,
        device_id: str,
        store: ModelStore,
        directory: Path,
        client: Transport,
        topics: Topics,
        *,
        commands_per_minute: int,
        upload_bytes_per_day: int,
        sources: BundleSources,
        health_check: Callable[[str], dict[str, Any]],
        restart: Callable[[], None] | None,
        capture: CaptureRing | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._device_id = device_id
        self._store = store
        self._client = client
        self._answer_topic = topics.device("command_resp", device_id)
        self._sources = sources
        self._health_check = health_check
        self._restart = restart
        self._clock = clock
        self._started = clock()
        self._path = directory / "commands.json"
        self._last_sequence = self._load()
        self._bucket = TokenBucket(commands_per_minute / 60.0, commands_per_minute, clock())
        self._queue: queue.Queue[Message | None] = queue.Queue(QUEUE_SIZE)
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        upload_topic = topics.publication("upload_data", device_id)
        self.uploads = UploadServer(
            directory / "upload_budget.json",
            upload_bytes_per_day,
            lambda payload: self._client.publish(
                upload_topic.topic, payload, upload_topic.qos, upload_topic.retain
            ),
            clock=clock,
        )
        self.capture = CaptureUploader(device_id, capture, directory, self.uploads, clock=clock)
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the command thread."""
        self._thread = threading.Thread(target=self._run, name="commands", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the command thread after the command it is running. Never raises."""
        if self._thread is not None:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                with self._lock:
                    while not self._queue.empty():
                        self._queue.get_nowait()
                self._queue.put_nowait(None)
            self._thread.join(30)

    @property
    def last_sequence(self) -> int:
        """The sequence of the last accepted command (0 if none)."""
        return self._last_sequence

    def stats(self) -> dict[str, int]:
        """Commands run and refused (by error code), and upload counters."""
        with self._lock:
            out = {f"commands_{k}": v for k, v in self.counts.items()}
        out.update({f"upload_{k}": v for k, v in self.uploads.counts.items()})
        return out

    # ------------------------------------------------------------------ MQTT handlers
    def on_command(self, message: Message) -> None:
        """Queue one command message (MQTT handler thread). Never raises."""
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self._refuse(message, None, None, CommandLimitError("the command queue is full"))

    def on_upload_request(self, message: Message) -> None:
        """Serve one upload block request (MQTT handler thread). Never raises."""
        self.uploads.on_request(message.payload)

    # ------------------------------------------------------------------ the command thread
    def _run(self) -> None:
        while True:
            message = self._queue.get()
            if message is None:
                return
            try:
                self.handle(message)
            except Exception:  # the command thread must outlive anything one command throws
                log.exception("command handling failed")

    def handle(self, message: Message) -> None:
        """Judge, run and answer one command message (the command thread; tests call it)."""
        if self._bucket.take(self._clock()) > 0:
            self._refuse(message, None, None, CommandLimitError("over the command rate"))
            return
        try:
            command = verify_command(
                self._store.root,
                message.payload,
                now=datetime.fromtimestamp(self._clock(), UTC),
                device_id=self._device_id,
                last_sequence=self._last_sequence,
            )
        except EdgefleetError as exc:
            self._refuse(message, *_ids(message.payload), exc)
            return
        try:
            self._save(command.sequence)
        except OSError as exc:  # not persisted: running it could let a replay run it again
            self._refuse(message, command.command_id, command.name, CommandFailedError(str(exc)))
            return
        try:
            args = command.arguments()
            result = self._execute(command, args)
        except EdgefleetError as exc:
            self._refuse(message, command.command_id, command.name, exc)
            return
        with self._lock:
            self.counts[f"ran_{command.name}"] += 1
        log.info("ran command %s (%s)", command.name, command.command_id)
        self._answer(
            message, CommandAnswer(self._device_id, command.command_id, command.name, True, result)
        )
        if command.name == "restart" and self._restart is not None:
            self._restart()

    def _execute(self, command: SignedCommand, args: CommandArgs) -> dict[str, Any]:
        if command.name == "ping":
            return {
                "agent_version": __version__,
                "time": round(self._clock(), 3),
                "uptime_seconds": round(self._clock() - self._started, 3),
                "last_sequence": command.sequence,
            }
        if isinstance(args, LogsArgs):
            return self._logs(args)
        if isinstance(args, SupportBundleArgs):
            if self.uploads.remaining() < 1:
                raise CommandLimitError("the daily upload budget is used up")
            data = build_support_bundle(self._sources, args.max_bytes, clock=self._clock)
            return self.uploads.offer(data).to_dict()
        if isinstance(args, HealthCheckArgs):
            return self._health_check(args.model)
        if isinstance(args, UploadSettings):
            return self.capture.configure(args)
        if isinstance(args, CaptureUploadArgs):
            return self.capture.upload(args)
        if command.name == "restart":
            if self._restart is None:
                raise CommandFailedError("this agent runs without a service manager to restart it")
            return {"restarting": True, "exit_code": EXIT_RESTART}
        raise CommandFailedError(f"no action for {command.name}")  # unreachable: fixed list

    def _logs(self, args: LogsArgs) -> dict[str, Any]:
        ring: LogRing | None = self._sources.logs
        if ring is None:
            raise CommandFailedError("this agent keeps no log records")
        records, truncated = ring.query(
            level=args.level, since=args.since, max_lines=args.max_lines, max_bytes=args.max_bytes
        )
        while True:
            result = {
                "records": [r.to_dict() for r in records],
                "truncated": truncated,
                "dropped": ring.dropped,
            }
            try:  # JSON escapes can make the text longer than its budget: keep the newer half
                CommandAnswer(self._device_id, None, None, True, result).to_bytes()
            except ContractError:
                records, truncated = records[len(records) // 2 :], True
                continue
            return result

    # ------------------------------------------------------------------ answers
    def _refuse(
        self, message: Message, command_id: str | None, name: str | None, exc: EdgefleetError
    ) -> None:
        with self._lock:
            self.counts[f"refused_{exc.code}"] += 1
        log.warning("refused a command (%s): %s", exc.code, exc)
        self._answer(
            message, CommandAnswer.refusal(self._device_id, command_id, name, exc.code, str(exc))
        )

    def _answer(self, message: Message, answer: CommandAnswer) -> None:
        correlation = message.properties.correlation_data
        if not correlation or len(correlation) > MAX_CORRELATION_BYTES:
            with self._lock:
                self.counts["unanswerable"] += 1
            return
        try:
            handle = self._client.publish(
                self._answer_topic,
                answer.to_bytes(),
                1,
                False,
                MessageProperties(correlation_data=correlation),
            )
            if answer.name == "restart" and answer.ok:
                self._client.wait_published(handle, ANSWER_WAIT_SECONDS)
        except (TransportError, ContractError) as exc:
            with self._lock:
                self.counts["answer_failed"] += 1
            log.warning("command answer not sent: %s", exc)

    # ------------------------------------------------------------------ persistence
    def _load(self) -> int:
        try:
            doc = strict_loads(self._path.read_bytes(), max_bytes=1024, what="commands.json")
        except FileNotFoundError:
            return 0
        except (OSError, EdgefleetError) as exc:
            # Unreadable: refuse nothing we cannot prove is new? A corrupt file must not stop
            # the agent; the server's sequences only grow, so starting over at 0 lets replays
            # of still-valid commands through until their expiry. Log it loudly.
            log.error("commands.json unreadable, anti-replay sequence reset: %s", exc)
            return 0
        value = doc.get("last_sequence") if isinstance(doc, dict) else None
        return value if type(value) is int and value >= 0 else 0

    def _save(self, sequence: int) -> None:
        self._last_sequence = sequence
        write_atomic(self._path, f'{{"last_sequence": {sequence}}}'.encode())


def health_check(agent: Agent, model: str) -> dict[str, Any]:
    """Run the golden samples of the serving version of ``model`` again.

    Raises:
        CommandFailedError: ``model`` is not loaded.
    """
    loaded = agent.registry.get(model)
    if loaded is None:
        raise CommandFailedError(f"model {model!r} is not loaded")
    manifest = loaded.pipeline.manifest
    result = check_golden(manifest, loaded.pipeline.runtime)
    return {
        "model": model,
        "version": manifest.version,
        "total": result.total,
        "passed": result.passed,
        "ok": result.ok,
        "failures": [f[:200] for f in result.failures[:10]],
    }


def _ids(payload: bytes) -> tuple[str | None, str | None]:
    """Command id and name of a refused message, when its signed part parses (for the answer)."""
    if len(payload) > MAX_COMMAND_BYTES:
        return None, None
    try:
        doc = strict_loads(payload, max_bytes=len(payload) + 1, what="command")
        command = SignedCommand.from_dict(doc["signed"]) if isinstance(doc, dict) else None
    except (EdgefleetError, KeyError):
        return None, None
    return (command.command_id, command.name) if command is not None else (None, None)
