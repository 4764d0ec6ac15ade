"""A rollout's shadow on the device: stage the assigned shadow bundle and run it, or drop it.

Owns what happens to each model's ``shadow`` (``ModelAssignment.shadow``, a rollout's shadow
phase) in an accepted desired state: the same path as a serving bundle (a bundle refused here
before is not fetched again, rollback protection against the high-water version, a finished
download found after a restart, the signed length and digest, the targets digest, the identity,
the builder signatures), but the bundle is *staged* (``ModelStore.stage``: kept, never active)
and then run as the model's shadow at the document's fraction
(``ModelLifecycle.assign_shadow``); it never answers a client. A shadow no longer assigned
stops and its staged version is removed. Outcomes per model (version, ``downloading`` /
``installed`` / ``pending`` / ``failed``, reason) are kept for the reported state.

Does not own the serving assignments, the refused-bundle memory or installing a staged version
for serving (``edge_agent.sync.deploy.Deployer`` does, and calls this after the serving
assignments), nor verifying documents (``desired_intake``) or MQTT (``loop``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.bundle import read_raw
from edge_agent.config import SyncConfig
from edge_agent.contract import BundleManifest
from edge_agent.errors import EdgefleetError, TransportError
from edge_agent.serving.agent import Agent
from edge_agent.sync.download import Download
from edge_agent.trust.assignment import (
    ShadowAssignment,
    check_bundle_identity,
    check_targets_digest,
)
from edge_agent.trust.desired import DesiredState
from edge_agent.wire.transfer import BlockData, BlockRequest

__all__ = ["ShadowDeployer", "sha256_of"]

log = logging.getLogger("edge_agent.sync.loop")

ShadowEvent = Callable[[str | None, int | None, str, str], None]


class ShadowDeployer:
    """Applies the shadow assignments of desired states for one agent (see the module doc).

    ``accept_block`` may run on another thread; the rest on the sync thread.

    Args:
        agent: the agent (its store and lifecycle).
        directory: the sync directory (downloads under ``downloads/<name>/``).
        sync: block window and retry settings.
        event: records an event for telemetry.
        wake: wakes the sync loop (a download completed).
        refused: the reason a bundle (by SHA-256) was refused here before, or None.
        refuse: remembers a bundle refused here.
        counts: the deployer's counters (``bad_blocks``, ``install_failures``).
    """

    def __init__(
        self,
        agent: Agent,
        directory: Path,
        sync: SyncConfig,
        *,
        event: ShadowEvent,
        wake: Callable[[], None],
        refused: Callable[[str], str | None],
        refuse: Callable[[str, str], None],
        counts: dict[str, int],
    ) -> None:
        self._agent = agent
        self._dir = directory
        self._sync = sync
        self._event = event
        self._wake = wake
        self._refused = refused
        self._refuse = refuse
        self.counts = counts
        self._lock = threading.Lock()
        self.downloads: dict[str, Download] = {}
        # name -> (shadow version, outcome, reason), for the reported state.
        self.outcomes: dict[str, tuple[int, str, str]] = {}
        self._assigned: dict[str, ShadowAssignment] = {}  # as the accepted state assigns them

    def keep(self, state: DesiredState) -> set[tuple[str, str]]:
        """(model, SHA-256) of the shadow bundles ``state`` assigns (downloads to keep)."""
        return {(n, a.shadow.bundle_sha256) for n, a in state.models.items() if a.shadow}

    def status(self) -> dict[str, Any]:
        """Per model, its shadow's version, outcome and reason, JSON-safe."""
        return {
            n: {"version": v, "outcome": o, "reason": r}
            for n, (v, o, r) in dict(self.outcomes).items()
        }

    def accept_block(self, block: BlockData) -> None:
        """Write a block into the shadow download it belongs to (ignored if none)."""
        with self._lock:
            dl = next(
                (d for d in self.downloads.values() if d.transfer_id == block.transfer_id), None
            )
            if dl is None:
                return
            try:
                dl.accept(block)
            except EdgefleetError as exc:
                self.counts["bad_blocks"] += 1
                log.warning("%s (shadow): block %d refused: %s", dl.name, block.index, exc)
                return
            except OSError as exc:
                log.error("%s (shadow): cannot write block: %s", dl.name, exc)
                return
            if dl.complete:
                self._wake()

    def close(self) -> None:
        """Persist download progress and release the files (a restart resumes)."""
        with self._lock:
            for dl in self.downloads.values():
                dl.close()

    def apply(self, state: DesiredState) -> None:
        """Stage and run, or stop and remove, each model's shadow as ``state`` says."""
        self._assigned = {n: a.shadow for n, a in state.models.items() if a.shadow is not None}
        with self._lock:
            for name in list(self.downloads):
                s = self._assigned.get(name)
                if s is None or s.bundle() != self.downloads[name].assignment:
                    self.downloads.pop(name).abandon()
        for name in sorted({*state.models, *self.outcomes}):
            shadow = self._assigned.get(name)
            try:
                self._apply_one(name, shadow)
            except EdgefleetError as exc:
                if shadow is not None:
                    self.outcomes[name] = (shadow.version, "failed", str(exc))
                log.error("%s: cannot apply the shadow: %s", name, exc)

    def drive(self, request: Callable[[BlockRequest], None]) -> None:
        """Ask for due blocks (through ``request``) and stage finished downloads."""
        done: list[Download] = []
        with self._lock:
            for dl in self.downloads.values():
                if dl.complete:
                    done.append(dl)
                    continue
                due = dl.due_request()
                if due is not None:
                    with contextlib.suppress(TransportError):  # asked again later
                        request(due)
            for dl in done:
                del self.downloads[dl.name]
        for dl in done:  # outside the lock: staging takes a while
            self._install(dl)

    def _apply_one(self, name: str, s: ShadowAssignment | None) -> None:
        """Stage and run the assigned shadow of ``name``, or stop and remove it (None)."""
        lifecycle = self._agent.lifecycle
        st = self._agent.store.state(name)
        for r in st.versions:  # staged versions no longer assigned
            if r.status == "staged" and (s is None or r.version != s.version):
                lifecycle.unstage(name, r.version)
        if s is None:
            lifecycle.assign_shadow(name, None)
            self.outcomes.pop(name, None)
            return
        a = s.bundle()
        record = next((r for r in st.versions if r.version == s.version), None)
        if st.active is not None and st.active >= s.version:
            lifecycle.assign_shadow(name, None)  # it serves already (or something newer does)
            self.outcomes.pop(name, None)
            return
        if record is not None and record.status == "failed":
            why = f"failed on this device before: {record.reason}"
            self.outcomes[name] = (s.version, "failed", why)
            return
        if record is not None:
            self._run_shadow(name, s)
            return
        refused = self._refused(a.bundle_sha256)
        if refused is not None:
            self.outcomes[name] = (s.version, "failed", f"refused before: {refused}")
            return
        done = self._dir / "downloads" / name / f"{a.bundle_sha256}.bundle"
        if sha256_of(done) == a.bundle_sha256:
            self._stage_file(name, s, done)
            return
        if s.version < st.high_water:
            why = f"v{s.version} is older than v{st.high_water} (rollback protection)"
            self.outcomes[name] = (s.version, "failed", why)
            return
        with self._lock:
            if name in self.downloads:
                return
            try:
                dl = Download(
                    name,
                    a,
                    self._dir / "downloads" / name,
                    window=self._sync.block_window,
                    retry_seconds=self._sync.block_retry_seconds,
                )
            except OSError as exc:
                why = f"cannot start the download: {exc}"
                self.outcomes[name] = (s.version, "failed", why)
                return
            self.downloads[name] = dl
        self.outcomes[name] = (s.version, "downloading", "")
        log.info("%s v%d (shadow): downloading %d bytes", name, s.version, s.bundle_length)
        self._event(name, s.version, "transfer_started", f"shadow, {s.bundle_length} bytes")

    def _stage_file(self, name: str, s: ShadowAssignment, path: Path) -> None:
        """Check a complete, digest-verified shadow download against ``s``, stage and run it."""
        a = s.bundle()
        try:
            raw = read_raw(path)
            check_targets_digest(a, raw.targets_bytes)
            check_bundle_identity(name, a, BundleManifest.from_bytes(raw.manifest_bytes))
            self._agent.lifecycle.stage(path)
        except EdgefleetError as exc:
            self.counts["install_failures"] += 1
            self.outcomes[name] = (s.version, "failed", str(exc))
            self._event(name, s.version, "install_failed", f"shadow: {exc}")
            self._refuse(a.bundle_sha256, str(exc))
            log.error("%s v%d: shadow install failed: %s", name, s.version, exc)
            return
        finally:
            path.unlink(missing_ok=True)
        log.info("%s v%d: staged as the shadow (not serving)", name, s.version)
        self._run_shadow(name, s)

    def _run_shadow(self, name: str, s: ShadowAssignment) -> None:
        running = self._agent.lifecycle.assign_shadow(name, s.version, s.fraction)
        if running == s.version:
            self.outcomes[name] = (s.version, "installed", "")
            return
        error = self._agent.candidates.shadow_errors.get(name)
        if error is not None:
            self.outcomes[name] = (s.version, "failed", error)
            # A bundle that cannot run here (golden samples, load) is remembered like a refused
            # one: assigned again, it is answered from memory, never downloaded again.
            self._refuse(s.bundle().bundle_sha256, error)
        else:  # set up when the live model serves
            self.outcomes[name] = (s.version, "pending", f"{name} is not serving")

    def _install(self, dl: Download) -> None:
        state = self._assigned.get(dl.name)
        try:
            path = dl.finish()
        except (EdgefleetError, OSError) as exc:
            if state is not None:
                self.outcomes[dl.name] = (state.version, "failed", f"download: {exc}")
            self._event(dl.name, dl.assignment.version, "transfer_failed", f"shadow: {exc}")
            return
        if state is None or state.bundle() != dl.assignment:
            path.unlink(missing_ok=True)  # withdrawn meanwhile
            return
        self._stage_file(dl.name, state, path)


def sha256_of(path: Path) -> str | None:
    """The file's SHA-256, or None when it is missing or unreadable."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()
