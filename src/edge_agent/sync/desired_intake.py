"""Desired-state intake on the device: the root chain first, then the document, then persist.

Owns what the device has accepted: the last verified desired state (``desired.json``, written
atomically once accepted, before anything acts on it), the version a saved document that no
longer verifies still holds against replays, and the counters of accepted and refused
documents and of root rotations. For each message: ``trust.split_roots`` separates the root
chain, the store walks it (``ModelStore.update_roots``; a refused chain changes nothing), then
``trust.desired.verify_desired_state`` judges the document with the (possibly new) root, the
clock and the anti-replay version. An accepted state goes to ``apply`` (``deploy.Deployer``).

Does not talk MQTT, queue messages or install anything (``loop`` and ``deploy`` do), and decides
nothing about trust itself (``edge_agent.trust`` does). Runs on the sync thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from edge_agent.common.durable import write_atomic
from edge_agent.errors import EdgefleetError, ExpiredMetadataError
from edge_agent.store import ModelStore
from edge_agent.strict_json import loads as strict_loads
from edge_agent.sync.deploy import Event
from edge_agent.trust import split_roots
from edge_agent.trust.desired import DesiredState, verify_desired_state

__all__ = ["DesiredIntake"]

log = logging.getLogger("edge_agent.sync.loop")


class DesiredIntake:
    """Judges desired-state messages for one device; see the module doc.

    Args:
        store: the model store (its trusted root verifies, its ``update_roots`` rotates).
        device_id: the device a document must name.
        path: where the accepted document is kept across restarts.
        apply: called with every accepted state (and the saved one at ``load``).
        event: records a ``desired_rejected`` event for telemetry.
    """

    def __init__(
        self,
        store: ModelStore,
        device_id: str,
        path: Path,
        *,
        apply: Callable[[DesiredState], None],
        event: Event,
    ) -> None:
        self._store = store
        self._device_id = device_id
        self._path = path
        self._apply = apply
        self._event = event
        self._accepted: DesiredState | None = None
        self._accepted_bytes = b""
        self._saved_version = 0  # of a saved document that no longer verifies (replays)
        self._last_message = b""
        self.counts: dict[str, int] = {
            "desired_accepted": 0,
            "desired_rejected": 0,
            "root_rotations": 0,
            "roots_rejected": 0,
        }

    @property
    def accepted(self) -> DesiredState | None:
        """The desired state in force (None before the first accepted one)."""
        return self._accepted

    def load(self) -> None:
        """Apply the saved document if it still verifies, else remember its version. Never
        raises (an unreadable or damaged file is logged)."""
        try:
            data = self._path.read_bytes()
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
            self._saved_version = saved_version(data)
            return
        self._accepted, self._accepted_bytes = state, data
        self._apply(state)

    def handle(self, message: bytes) -> None:
        """Judge one ``.../desired`` message (root chain and document). Never raises: a refusal
        is counted, logged and recorded as a ``desired_rejected`` event."""
        if message == self._last_message:
            return  # the accepted message's retained copy again (every reconnect)
        try:
            data, roots = split_roots(message)
        except EdgefleetError as exc:
            self._refuse(exc)
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
            self._refuse(exc)
            return
        try:
            write_atomic(self._path, data, mode=0o600)
        except OSError as exc:
            log.error("cannot persist the desired state, not acting on it: %s", exc)
            return
        self.counts["desired_accepted"] += 1
        log.info("desired state v%d accepted: %s", state.version, dict(state.models))
        self._accepted, self._accepted_bytes = state, data
        self._last_message = message  # a refused one is judged again when it comes again
        self._apply(state)

    def _refuse(self, exc: EdgefleetError) -> None:
        self.counts["desired_rejected"] += 1
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
            self.counts["root_rotations"] += 1
            version = self._store.root.version
            log.error("trusted root v%d has expired; nothing new is acted on: %s", version, exc)
            self._event(None, None, "desired_rejected", f"root chain: {exc}")
            return
        except EdgefleetError as exc:
            self.counts["roots_rejected"] += 1
            log.warning("root chain refused, keeping root v%d: %s", before, exc)
            self._event(None, None, "desired_rejected", f"root chain refused: {exc}")
            return
        if root.version != before:
            self.counts["root_rotations"] += 1  # the store logs the rotation


def saved_version(data: bytes) -> int:
    """The version of the saved document that failed verification at start (expired, most
    likely): it still counts, so a replay of it stays refused. 0 when unreadable (damaged)."""
    try:
        doc = strict_loads(data, max_bytes=len(data), what="saved desired state")
    except EdgefleetError:
        return 0
    signed = doc.get("signed") if isinstance(doc, dict) else None
    version = signed.get("version") if isinstance(signed, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) else 0
