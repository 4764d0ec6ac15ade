"""The fleet server's root of trust and the chain of root versions it ships to devices.

Layout: ``signing.root_path`` is the root the fleet's devices were provisioned with (it is never
written); every later version an operator rotates to is kept as
``<registry.state_dir>/roots/<N>.root.json``, exactly as signed, written atomically.

Owns: loading the provisioned root and walking the stored versions at start, accepting new
versions (``rotate``: each must pass the device's own rule, ``edge_agent.trust.apply_root_chain``,
plus a check by the caller, before anything is written), and ``chain()``, the versions a device
may be missing, which ``fleet_server.delivery.desired`` puts beside every desired state it signs.
The
current root is what the bundle library and cloud fallback verify bundles with.

Several workers: the ``roots`` directory must be shared like ``bundles_dir`` (each worker reads
it at start; a worker that did not rotate picks the new versions up at its next start).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from edge_agent.common import durable
from edge_agent.errors import BundleVerificationError
from edge_agent.trust import TrustedRoot, apply_root_chain, parse_metadata
from edge_agent.trust.rotation import MAX_CHAIN_LENGTH
from fleet_server.errors import ServerConfigError

__all__ = ["ServerRoots"]

log = logging.getLogger(__name__)

Check = Callable[[TrustedRoot], None]


class ServerRoots:
    """The provisioned root, the versions rotated to since, and the current (newest) root."""

    def __init__(
        self, provisioned: bytes, directory: Path, *, clock: Callable[[], datetime]
    ) -> None:
        """Trust ``provisioned`` and walk the versions stored in ``directory``.

        Raises:
            ServerConfigError: the provisioned root is not valid, or a stored version does not
                chain from it (the directory was tampered with or mixed up).
        """
        self._dir = Path(directory)
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self._provisioned = TrustedRoot.from_bytes(provisioned)
            stored = self._stored()
            above = [d for v, d in stored if v > self._provisioned.version]
            self._current = TrustedRoot.from_chain(provisioned, above)
        except BundleVerificationError as exc:
            raise ServerConfigError(f"root chain in {self._dir.name}/ is not valid: {exc}") from exc
        # Versions below the provisioned file were verified when they were rotated to (the
        # root_path may be a key store's root.json, which every rotation rewrites): devices
        # still on them need them, and check each one themselves.
        below = [d for v, d in stored if 1 < v < self._provisioned.version]
        here = [bytes(provisioned)] if self._provisioned.version > 1 else []
        self._chain = [*below, *here, *above]

    @classmethod
    def open(
        cls, root_path: Path, directory: Path, *, clock: Callable[[], datetime]
    ) -> ServerRoots:
        """Load ``root_path`` (the provisioned root) and the rotations stored in ``directory``.

        Raises:
            ServerConfigError: unreadable or invalid root, or a broken chain.
        """
        try:
            data = Path(root_path).read_bytes()
        except OSError as exc:
            raise ServerConfigError(f"signing.root_path {root_path} cannot be read: {exc}") from exc
        return cls(data, directory, clock=clock)

    def _stored(self) -> list[tuple[int, bytes]]:
        if not self._dir.is_dir():
            return []
        out = []
        for path in self._dir.glob("*.root.json"):
            head = path.name.split(".", 1)[0]
            if head.isascii() and head.isdigit():
                out.append((int(head), path.read_bytes()))
        return sorted(out)

    @property
    def current(self) -> TrustedRoot:
        """The newest trusted root."""
        return self._current

    def chain(self) -> list[bytes]:
        """Root versions after the provisioned v1, oldest first (the newest 64 at most)."""
        with self._lock:
            return list(self._chain[-MAX_CHAIN_LENGTH:])

    def rotate(self, chain: Sequence[bytes], check: Check | None = None) -> TrustedRoot:
        """Accept the newer versions in ``chain`` and store each one; return the current root.

        ``check`` sees the candidate root before anything is written and may refuse it.

        Raises:
            MetadataFormatError, RootRotationError, ExpiredMetadataError: the chain is refused
                (nothing is written).
            Whatever ``check`` raises (nothing is written).
            OSError: a version could not be written (those before it are kept: a valid prefix).
        """
        with self._lock:
            old = self._current
            new = apply_root_chain(old, chain, now=self._clock())
            if new is old:
                return old
            if check is not None:
                check(new)
            self._dir.mkdir(parents=True, exist_ok=True)
            for data in chain:
                version = int(parse_metadata(data, "root").signed.version)
                if old.version < version <= new.version:
                    durable.write_atomic(self._dir / f"{version}.root.json", bytes(data))
                    self._chain.append(bytes(data))
            self._current = new
        log.info("root rotated: v%d -> v%d", old.version, new.version)
        return new
