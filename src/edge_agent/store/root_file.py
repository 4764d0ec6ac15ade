"""The device's stored root (``<state_dir>/trust/root.json``): read, choose, write atomically.

Owns only the file I/O around the trust decisions: which root to trust at start is
``trust.choose_root``'s decision, walking a chain is ``trust.apply_root_chain``'s. The store
(``edge_agent.store.store``) calls these under its lock.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge_agent.common import durable
from edge_agent.errors import BundleVerificationError, ModelStoreError
from edge_agent.trust import TrustedRoot, choose_root

__all__ = ["RootFile"]

log = logging.getLogger("edge_agent.store")


class RootFile:
    """The stored root of one state directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def open(self, provisioned: TrustedRoot) -> tuple[TrustedRoot, str]:
        """The root to trust at start, and a warning when a newer provisioned root was refused.

        Raises:
            ModelStoreError: the stored root is unreadable or not valid, or cannot be written.
        """
        choice = choose_root(self.read(), provisioned)
        if choice.warning:
            log.warning("%s", choice.warning)
        if choice.persist:
            self.write(choice.root)
        return choice.root, choice.warning

    def read(self) -> TrustedRoot | None:
        """The stored root (its self-signature checked), or None when there is none yet.

        Raises:
            ModelStoreError: unreadable, or not a root signed by its own threshold.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ModelStoreError(f"cannot read stored root {self.path}: {exc}") from exc
        try:
            return TrustedRoot.from_bytes(data)
        except BundleVerificationError as exc:
            raise ModelStoreError(f"stored root {self.path} is not valid: {exc}") from exc

    def write(self, root: TrustedRoot) -> None:
        """Replace the stored root atomically (temp file, fsync, rename, fsync dir).

        Raises:
            ModelStoreError: the write failed; the previous stored root is intact.
        """
        try:
            durable.write_atomic(self.path, root.to_bytes())
        except OSError as exc:
            raise ModelStoreError(f"cannot write the trusted root: {exc}") from exc
