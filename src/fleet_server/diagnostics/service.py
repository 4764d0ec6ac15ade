"""Remote diagnostics on the server: issue signed commands, take the answers, pull the uploads.

Owns the orchestration (``Diagnostics``): resolving a device or a group into per-device
commands (each addressed and sequenced on its own), signing them (``commands``), recording them
(``book``), publishing each on ``<prefix>/devices/<id>/commands`` with MQTT v5 request/response
properties (response topic ``.../commands/resp``, correlation data = the command id, message
expiry interval = the command's remaining life, so the broker drops it from an offline
device's session when it could no longer run), matching answers back (``on_answer``: the
correlation data names the command, the topic's device must be the command's), starting the
block pull of a support bundle (``uploads``) and a housekeeping thread (expiry, stalled
uploads). Every refused answer, block or request is counted by reason (``stats``).

Device answers are hostile: the size is capped by ``CommandAnswer``'s parser, strings are kept
as data (the admin API returns them JSON-encoded; the CLI prints them escaped), an answer for a
command this server did not send to that device is counted and dropped.

Does not subscribe (the gateway routes ``command_resp`` and ``upload_data`` here) or serve HTTP
(``fleet_server.admin.ops.diagnostics``).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

from securesystemslib.signer import Signer

from edge_agent.common.mqtt_types import Message, MessageProperties
from edge_agent.common.transport import Transport
from edge_agent.errors import ContractError, EdgefleetError, TransportError
from edge_agent.wire.ops.diagnostics import CommandAnswer, UploadOffer
from edge_agent.wire.topics import Topics
from edge_agent.wire.transfer import BlockRequest
from fleet_server.diagnostics.book import RETENTION_SECONDS, CommandBook, CommandRecord
from fleet_server.diagnostics.commands import (
    DEFAULT_TTL,
    default_arguments,
    make_command,
    new_command_id,
    sign_command,
)
from fleet_server.diagnostics.uploads import UploadAssembler, UploadResult
from fleet_server.errors import (
    DiagnosticsError,
    SupportBundleNotReadyError,
    UnknownDeviceError,
    UnknownGroupError,
)
from fleet_server.registry.store import Registry

__all__ = ["DEFAULT_MAX_PENDING", "Diagnostics", "IssueResult"]

log = logging.getLogger(__name__)

DEFAULT_MAX_PENDING: Final = 16
_TICK_SECONDS: Final = 0.5
_PRUNE_EVERY_SECONDS: Final = 3600.0
_CORRELATION_RE = re.compile(rb"[0-9a-f]{32}")
_CODE_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")


@dataclass(frozen=True)
class IssueResult:
    """What one request to issue a command produced: a record per device that got one, and
    per device that did not, why."""

    commands: tuple[CommandRecord, ...]
    errors: dict[str, str]


class Diagnostics:
    """The server's remote diagnostics; see the module doc. ``start`` once, ``close`` once.

    Args:
        registry: the fleet registry (devices and groups).
        client: the server's MQTT session.
        topics: the topic tree.
        signers: the online (``timestamp``) signers, as for desired state.
        directory: ``<state_dir>/diagnostics`` (the command book, support bundles).
        clock: timezone-aware now.
        monotonic: monotonic seconds (upload retries and deadlines).
        max_pending: pending commands kept per device.
        upload_retry_seconds: silence after which missing upload blocks are asked for again.
        upload_deadline_seconds: an upload not complete this long after it started fails.

    Raises:
        DiagnosticsError: the state directory cannot be used.
    """

    def __init__(
        self,
        registry: Registry,
        client: Transport,
        topics: Topics,
        signers: Sequence[Signer],
        directory: Path,
        *,
        clock: Callable[[], datetime],
        monotonic: Callable[[], float] = time.monotonic,
        max_pending: int = DEFAULT_MAX_PENDING,
        upload_retry_seconds: float = 2.0,
        upload_deadline_seconds: float = 600.0,
    ) -> None:
        self._registry = registry
        self._client = client
        self._topics = topics
        self._signers = list(signers)
        self._clock = clock
        self._book = CommandBook(directory / "commands.db", max_pending)
        try:
            self._uploads = UploadAssembler(
                directory / "support-bundles",
                self._send_request,
                self._upload_done,
                clock=monotonic,
                retry_seconds=upload_retry_seconds,
                deadline_seconds=upload_deadline_seconds,
            )
        except OSError as exc:
            raise DiagnosticsError(f"support-bundle directory unusable: {exc}") from exc
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pruned_at = -_PRUNE_EVERY_SECONDS
        self._on_answer: dict[str, Callable[[CommandRecord, CommandAnswer], bool]] = {}
        self._on_upload: dict[str, Callable[[CommandRecord, Path], None]] = {}

    def listen(
        self,
        name: str,
        *,
        answer: Callable[[CommandRecord, CommandAnswer], bool],
        upload: Callable[[CommandRecord, Path], None],
    ) -> None:
        """Hand the answers and verified uploads of command ``name`` to another service
        (``fleet_server.capture``): ``answer`` sees each successful answer first and says
        whether to pull the upload it offers (``result["offer"]``); ``upload`` gets each
        verified file and owns it from then on."""
        self._on_answer[name] = answer
        self._on_upload[name] = upload

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Resume the uploads that were in progress and start the housekeeping thread.

        Raises:
            DiagnosticsError: the state file failed.
        """
        for record in self._book.in_state("uploading"):
            self._resume(record)
        self._thread = threading.Thread(target=self._run, name="diagnostics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread, abandon uploads in progress (resumed at the next start), close the
        book. Never raises."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        self._uploads.close()
        self._book.close()

    def _run(self) -> None:
        while not self._stop.wait(_TICK_SECONDS):
            try:
                self.tick()
            except EdgefleetError as exc:
                log.warning("diagnostics housekeeping failed: %s", exc)

    def tick(self) -> None:
        """Expire unanswered commands, ask again for stalled upload blocks; once an hour, delete
        support bundles older than the book's retention (their records go with them).

        Raises:
            DiagnosticsError: the state file failed.
        """
        now = self._clock().timestamp()
        expired = self._book.expire(now)
        if expired:
            self._count("expired", len(expired))
        self._uploads.tick()
        if now - self._pruned_at >= _PRUNE_EVERY_SECONDS:
            self._pruned_at = now
            self._count("bundles_pruned", self._uploads.prune(RETENTION_SECONDS, now))

    # ------------------------------------------------------------------ operator actions
    def issue(
        self,
        name: str,
        args: dict[str, Any],
        *,
        device_id: str | None = None,
        group: str | None = None,
        ttl: timedelta = DEFAULT_TTL,
    ) -> IssueResult:
        """Sign, record and publish ``name`` for one device or every active device of a group.

        Raises:
            ValueError: neither or both of ``device_id`` and ``group``, or a bad ``ttl``.
            UnknownCommandError, CommandArgumentError: the command is not on the fixed list or
                its arguments are out of bounds (nothing is sent).
            UnknownDeviceError: ``device_id`` is not enrolled, or is revoked.
            UnknownGroupError: the group has no active device.
            CommandQueueFullError: one device and it has too many pending commands (for a
                group, that device is listed in ``errors``).
            DiagnosticsError: the state file failed.
            TransportError: one device and the command could not be published.
        """
        if (device_id is None) == (group is None):
            raise ValueError("give a device id or a group")
        full_args = default_arguments(name, args)
        if device_id is not None:
            record = self._registry.get_device(device_id)
            if record.revoked_at is not None:
                raise UnknownDeviceError(f"device {device_id} is revoked")
            return IssueResult((self._issue_one(device_id, name, full_args, ttl),), {})
        devices = [d.id for d in self._registry.list_devices(group=group, include_revoked=False)]
        if not devices:
            raise UnknownGroupError(f"group {group!r} has no active device")
        done: list[CommandRecord] = []
        errors: dict[str, str] = {}
        for device in devices:
            try:
                done.append(self._issue_one(device, name, full_args, ttl))
            except (EdgefleetError, ValueError) as exc:
                errors[device] = str(exc)
        return IssueResult(tuple(done), errors)

    def _issue_one(
        self, device_id: str, name: str, args: dict[str, Any], ttl: timedelta
    ) -> CommandRecord:
        now = self._clock().replace(microsecond=0)
        command_id = new_command_id()
        sequence = self._book.allocate(
            device_id, name, args, command_id, now.timestamp(), (now + ttl).timestamp()
        )
        try:
            command = make_command(device_id, sequence, name, args, now, ttl, command_id)
            data = sign_command(command, self._signers)
            p = self._topics.publication("commands", device_id)
            self._client.publish(
                p.topic,
                data,
                p.qos,
                p.retain,
                MessageProperties(
                    response_topic=self._topics.device("command_resp", device_id),
                    correlation_data=command_id.encode("ascii"),
                    message_expiry=max(1, int(ttl.total_seconds())),
                ),
            )
        except (EdgefleetError, ValueError):
            self._book.discard(command_id)
            raise
        self._count(f"issued_{name}")
        log.info("issued %s to %s (%s, sequence %d)", name, device_id, command_id, sequence)
        return self._book.get(command_id)

    def get(self, command_id: str, device_id: str | None = None) -> CommandRecord:
        """One command.

        Raises:
            UnknownCommandRecordError: no such command (for that device).
            DiagnosticsError: the state file failed.
        """
        return self._book.get(command_id, device_id)

    def of_device(self, device_id: str, limit: int = 100) -> list[CommandRecord]:
        """A device's newest commands first.

        Raises:
            DiagnosticsError: the state file failed.
        """
        return self._book.of_device(device_id, limit)

    def bundle_path(self, device_id: str, command_id: str) -> Path:
        """The verified support bundle of a ``support-bundle`` command.

        Raises:
            UnknownCommandRecordError: no such command for that device.
            SupportBundleNotReadyError: not a support-bundle command, or not uploaded (yet).
            DiagnosticsError: the state file failed.
        """
        record = self._book.get(command_id, device_id)
        path = self._uploads.path(command_id)
        if record.name != "support-bundle" or record.state != "uploaded" or not path.is_file():
            raise SupportBundleNotReadyError(
                f"command {command_id} has no support bundle ({record.name}, {record.state})"
            )
        return path

    def stats(self) -> dict[str, int]:
        """Counters: issued, answered, refused by code, dropped answers by reason, uploads."""
        with self._lock:
            out = dict(self._counts)
        out.update({f"upload_{k}": v for k, v in self._uploads.counts.items()})
        out["uploads_active"] = self._uploads.active()
        return out

    # ------------------------------------------------------------------ from the gateway
    def on_answer(self, device_id: str, message: Message) -> str | None:
        """Record one answer (gateway handler thread).

        Returns:
            None when recorded, else the reason it was dropped (the gateway counts it).

        Raises:
            DiagnosticsError: the state file failed.
        """
        correlation = message.properties.correlation_data or b""
        if not _CORRELATION_RE.fullmatch(correlation):
            return self._drop("answer_uncorrelated")
        try:
            answer = CommandAnswer.from_bytes(message.payload)
        except ContractError:
            return self._drop("answer_malformed")
        command_id = correlation.decode("ascii")
        record = self._book.find(command_id)
        if (
            record is None
            or record.device_id != device_id
            or answer.device_id != device_id
            or answer.command_id not in (None, command_id)
        ):
            return self._drop("answer_unknown")
        now = self._clock().timestamp()
        states = ("pending", "expired")  # a late answer still tells what the device did
        if not answer.ok:
            code = answer.error_code if _CODE_RE.fullmatch(answer.error_code or "") else "other"
            if self._book.settle(
                command_id, "refused", answer=answer.to_dict(), at=now, from_states=states
            ):
                self._count(f"refused_{code}")
            return None
        if record.name == "support-bundle":
            return self._accept_offer(record, answer, now, answer.result)
        listener = self._on_answer.get(record.name)
        if listener is not None:
            try:
                pull = listener(record, answer)
            except EdgefleetError as exc:
                log.error("%s answer %s not handled: %s", record.name, command_id, exc)
                pull = False
            offer = answer.result.get("offer") if isinstance(answer.result, dict) else None
            if pull and isinstance(offer, dict):
                return self._accept_offer(record, answer, now, offer)
        if self._book.settle(
            command_id, "answered", answer=answer.to_dict(), at=now, from_states=states
        ):
            self._count(f"answered_{record.name}")
        return None

    def on_upload_block(self, device_id: str, message: Message) -> None:
        """Write one support-bundle block (gateway handler thread). Never raises."""
        self._uploads.on_block(device_id, message.payload)

    # ------------------------------------------------------------------ uploads
    def _accept_offer(
        self, record: CommandRecord, answer: CommandAnswer, now: float, raw_offer: object
    ) -> str | None:
        try:
            offer = UploadOffer.from_dict(raw_offer)
        except ContractError:
            self._book.settle(
                record.id,
                "refused",
                answer=answer.to_dict(),
                at=now,
                from_states=("pending", "expired"),
            )
            return self._drop("offer_malformed")
        if not self._book.settle(
            record.id,
            "uploading",
            answer=answer.to_dict(),
            at=now,
            upload={**offer.to_dict(), "received": False},
            from_states=("pending", "expired"),
        ):
            return self._drop("answer_duplicate")
        self._count(f"answered_{record.name}")
        try:
            self._uploads.start(record.id, record.device_id, offer)
        except OSError as exc:
            self._book.settle(
                record.id,
                "upload_failed",
                from_states=("uploading",),
                upload={**offer.to_dict(), "received": False, "error": str(exc)},
            )
        return None

    def _resume(self, record: CommandRecord) -> None:
        try:
            offer = UploadOffer.from_dict(
                {k: v for k, v in (record.upload or {}).items() if k not in ("received", "error")}
            )
            self._uploads.start(record.id, record.device_id, offer)
        except (ContractError, OSError) as exc:
            self._book.settle(
                record.id,
                "upload_failed",
                from_states=("uploading",),
                upload={**(record.upload or {}), "error": str(exc)},
            )

    def _send_request(self, device_id: str, request: BlockRequest) -> None:
        p = self._topics.publication("upload_req", device_id)
        try:
            self._client.publish(p.topic, request.to_bytes(), p.qos, p.retain)
        except TransportError:
            self._count("upload_request_failed")
            raise

    def _upload_done(self, result: UploadResult) -> None:
        upload = {"length": result.length, "sha256": result.sha256, "received": result.ok}
        if not result.ok:
            upload["error"] = result.reason
        try:
            self._book.settle(
                result.command_id,
                "uploaded" if result.ok else "upload_failed",
                upload=upload,
                from_states=("uploading",),
            )
        except DiagnosticsError as exc:
            log.error("support bundle %s: state not recorded: %s", result.command_id, exc)
        listener = self._on_upload.get(self._name_of(result.command_id))
        if listener is not None:
            self._count("uploads_verified" if result.ok else "uploads_failed")
            if result.ok and result.path is not None:
                try:
                    listener(self._book.get(result.command_id), result.path)
                except EdgefleetError as exc:
                    log.error("upload %s not taken: %s", result.command_id, exc)
            return
        self._count("bundles_uploaded" if result.ok else "bundles_failed")
        log.info(
            "support bundle %s from %s: %s",
            result.command_id,
            result.device_id,
            "verified" if result.ok else result.reason,
        )

    def _name_of(self, command_id: str) -> str:
        try:
            record = self._book.find(command_id)
        except DiagnosticsError as exc:
            log.error("upload %s: command not readable: %s", command_id, exc)
            return ""
        return "" if record is None else record.name

    # ------------------------------------------------------------------ counting
    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _drop(self, reason: str) -> str:
        self._count(reason)
        return reason
