"""Applying accepted desired states on the device: revert, download, verify, install.

Owns what happens to each model an accepted desired state names: nothing when the version is
active; nothing again for a version that failed here or a bundle refused here before (by
SHA-256, remembered across restarts); a switch back to a kept version the server names; a
finished download found after a restart is installed without fetching it again; otherwise a
``Download`` (windowed block requests, resumable). A finished download is checked against the
assignment (signed length and digest, ``targets.json`` digest, model identity) and handed to the
agent's install, which verifies the builder signatures and health-checks the version. Downloads
of bundles no longer assigned are deleted. Outcomes (installed, rolled back, failed and why) are
kept for the reported state.

A model's *shadow* (``ModelAssignment.shadow``, a rollout's shadow phase) is
``shadow_deploy.ShadowDeployer``'s, run after the serving assignments; when the document names a
staged (shadow) version for serving, it is installed here from the kept file (verified again, on
probation) without a download.

Does not verify desired-state documents (``desired_intake`` does) or talk MQTT (``loop`` does):
block requests leave through the ``request`` callback, blocks arrive through ``accept_block``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.bundle import read_raw
from edge_agent.common.durable import write_atomic
from edge_agent.config import SyncConfig
from edge_agent.contract import BundleManifest
from edge_agent.errors import EdgefleetError, TransportError
from edge_agent.serving.agent import Agent
from edge_agent.strict_json import loads as strict_loads
from edge_agent.sync.download import Download
from edge_agent.sync.ops.agent_deploy import AgentDeployer
from edge_agent.sync.shadow_deploy import ShadowDeployer, sha256_of
from edge_agent.trust.assignment import ModelAssignment, check_bundle_identity, check_targets_digest
from edge_agent.trust.desired import DesiredState
from edge_agent.wire.reported import TransferReport
from edge_agent.wire.transfer import BlockData, BlockRequest

__all__ = ["MAX_REFUSED", "Deployer"]

log = logging.getLogger("edge_agent.sync.loop")

Event = Callable[[str | None, int | None, str, str], None]

#: Bundles refused here that are remembered (by SHA-256) so they are not fetched again.
MAX_REFUSED = 64
# 64 digests and reasons of at most 200 characters: far below this.
_MAX_REFUSED_FILE = 256 * 1024


class Deployer:
    """Applies desired states for one agent. ``accept_block`` may run on another thread."""

    def __init__(
        self,
        agent: Agent,
        directory: Path,
        sync: SyncConfig,
        *,
        event: Event,
        wake: Callable[[], None],
    ) -> None:
        self._agent = agent
        self._dir = directory
        self._sync = sync
        self._event = event
        self._wake = wake
        self._lock = threading.Lock()
        self.downloads: dict[str, Download] = {}
        self.outcomes: dict[str, tuple[str, str]] = {}
        self.counts: dict[str, int] = {"bad_blocks": 0, "installs": 0, "install_failures": 0}
        self._logged_quarter: dict[str, int] = {}
        self._refused_path = directory / "refused.json"
        self._refused: dict[str, str] = {}
        self.agent_update = AgentDeployer.from_env(
            directory, sync, lambda: agent.store.root, event=event, wake=wake
        )
        self.shadows = ShadowDeployer(
            agent,
            directory,
            sync,
            event=event,
            wake=wake,
            refused=self._refused.get,
            refuse=self._refuse,
            counts=self.counts,
        )

    @property
    def shadow_outcomes(self) -> dict[str, tuple[int, str, str]]:
        """Per model, its shadow's (version, outcome, reason), for the reported state."""
        return self.shadows.outcomes

    def accept_block(self, block: BlockData) -> None:
        """Write a block into the download it belongs to (ignored if none; never raises)."""
        with self._lock:
            dl = next(
                (d for d in self.downloads.values() if d.transfer_id == block.transfer_id), None
            )
            if dl is None:
                # the agent package's, a shadow's, another transfer's wave, or one finished
                if not self.agent_update.accept_block(block):
                    self.shadows.accept_block(block)
                return
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
                self._wake()

    def progress(self) -> dict[str, TransferReport]:
        """The downloads in progress, for the reported state."""
        with self._lock:
            return {
                n: TransferReport(d.assignment.version, d.received, d.total, d.plan.length)
                for n, d in self.downloads.items()
            }

    def status(self) -> dict[str, Any]:
        """Downloads and outcomes, JSON-safe."""
        with self._lock:
            downloads = {
                n: {"version": d.assignment.version, "received": d.received, "total": d.total}
                for n, d in self.downloads.items()
            }
        snapshot = dict(self.outcomes)  # written by the sync thread; read from others
        outcomes = {n: {"outcome": o, "reason": r} for n, (o, r) in snapshot.items()}
        agent = self.agent_update.outcome
        return {
            "downloads": downloads,
            "outcomes": outcomes,
            "shadows": self.shadows.status(),
            "agent": {"outcome": agent[0], "reason": agent[1]},
        }

    def close(self) -> None:
        """Persist download progress and release the files (a restart resumes)."""
        with self._lock:
            for dl in self.downloads.values():
                dl.close()
        self.agent_update.close()
        self.shadows.close()

    def apply(self, state: DesiredState) -> None:
        """Act on an accepted desired state, model by model (see the module docstring)."""
        with self._lock:
            for name in list(self.downloads):
                a = state.models.get(name)
                if a is None or a.serving() != self.downloads[name].assignment:
                    self.downloads.pop(name).abandon()
        for name, assignment in state.models.items():
            try:
                self._apply_one(name, assignment.serving())
            except EdgefleetError as exc:
                self.outcomes[name] = ("failed", str(exc))
                log.error("%s: cannot apply v%d: %s", name, assignment.version, exc)
        self.shadows.apply(state)  # after serving: a shadow promoted to serve is installed
        self.agent_update.apply(state)
        self._prune_downloads(state)

    def _prune_downloads(self, state: DesiredState) -> None:
        """Delete partial or finished downloads of bundles no longer assigned (disk space)."""
        keep = {(n, a.bundle_sha256) for n, a in state.models.items()}
        keep |= self.shadows.keep(state)
        keep |= self.agent_update.keep()
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

    def load(self) -> None:
        """Read the bundles refused before (call once, before ``apply``)."""
        try:
            data = strict_loads(self._refused_path.read_bytes(), max_bytes=_MAX_REFUSED_FILE)
        except FileNotFoundError:
            return
        except (OSError, EdgefleetError) as exc:
            log.warning("ignoring unreadable %s: %s", self._refused_path, exc)
            return
        if isinstance(data, dict):
            self._refused.clear()  # in place: the shadow deployer reads this dict too
            self._refused.update({str(k): str(v) for k, v in list(data.items())[-MAX_REFUSED:]})

    def _apply_one(self, name: str, a: ModelAssignment) -> None:
        st = self._agent.store.state(name)
        record = next((r for r in st.versions if r.version == a.version), None)
        if st.active == a.version:
            self.outcomes[name] = self._outcome_of(name, a.version)
            return
        if record is not None and record.status == "failed":
            self.outcomes[name] = ("failed", f"failed on this device before: {record.reason}")
            return
        if record is not None and record.status == "staged":  # the shadow now serves
            self._promote(name, a)
            return
        if record is not None:  # kept on disk, not failed: the server sends the device back
            self._agent.revert_to(name, a.version, f"desired state names v{a.version}")
            self.outcomes[name] = self._outcome_of(name, a.version)
            return
        refused = self._refused.get(a.bundle_sha256)
        if refused is not None:  # verified and refused here before: not downloaded again
            self.outcomes[name] = ("failed", f"refused before: {refused}")
            return
        done = self._dir / "downloads" / name / f"{a.bundle_sha256}.bundle"
        if sha256_of(done) == a.bundle_sha256:
            # Downloaded and verified before a crash or restart: install it, do not fetch again.
            log.info("%s v%d: installing the bundle downloaded before", name, a.version)
            self._install_file(name, a, done)
            return
        if a.version < st.high_water:
            self.outcomes[name] = (
                "failed",
                f"v{a.version} is older than v{st.high_water} (rollback protection)",
            )
            return
        with self._lock:
            if name in self.downloads:
                return
            sync = self._sync
            try:
                dl = Download(
                    name,
                    a,
                    self._dir / "downloads" / name,
                    window=sync.block_window,
                    retry_seconds=sync.block_retry_seconds,
                )
            except OSError as exc:
                self.outcomes[name] = ("failed", f"cannot start the download: {exc}")
                return
            self.downloads[name] = dl
        self.outcomes[name] = ("downloading", "")
        log.info(
            "%s v%d: downloading %d bytes (%d/%d blocks already here)",
            name,
            a.version,
            a.bundle_length,
            dl.resumed_blocks,
            dl.total,
        )
        self._event(name, a.version, "transfer_started", f"{a.bundle_length} bytes")

    def _promote(self, name: str, a: ModelAssignment) -> None:
        """Install the staged (shadow) version of ``a`` for serving, from the kept file."""
        path = self._agent.store.bundle_path(name, a.version)
        try:
            raw = read_raw(path)
            check_targets_digest(a, raw.targets_bytes)
            check_bundle_identity(name, a, BundleManifest.from_bytes(raw.manifest_bytes))
            self._agent.install(path)
        except EdgefleetError as exc:
            self.counts["install_failures"] += 1
            self.outcomes[name] = ("failed", str(exc))
            self._event(name, a.version, "install_failed", str(exc))
            log.error("%s v%d: install of the staged version failed: %s", name, a.version, exc)
            return
        self.counts["installs"] += 1
        self.outcomes[name] = self._outcome_of(name, a.version)
        if self.outcomes[name][0] == "installed":
            self._event(name, a.version, "installed", "from the shadow")

    def drive(self, request: Callable[[BlockRequest], None]) -> None:
        """Ask for due blocks (through ``request``) and install finished downloads."""
        done: list[Download] = []
        with self._lock:
            for dl in self.downloads.values():
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
                due = dl.due_request()
                if due is not None:
                    # Offline: asked again after block_retry_seconds.
                    with contextlib.suppress(TransportError):
                        request(due)
            for dl in done:
                del self.downloads[dl.name]
                self._logged_quarter.pop(dl.name, None)
        for dl in done:  # outside the lock: installing takes a while, blocks may keep coming
            self._install(dl)
        self.shadows.drive(request)
        self.agent_update.drive(request)

    def _install(self, dl: Download) -> None:
        name, a = dl.name, dl.assignment
        try:
            path = dl.finish()
        except (EdgefleetError, OSError) as exc:
            self.outcomes[name] = ("failed", f"download: {exc}")
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
            self.outcomes[name] = ("failed", str(exc))
            self._event(name, a.version, "install_failed", str(exc))
            self._refuse(a.bundle_sha256, str(exc))
            log.error("%s v%d: install failed: %s", name, a.version, exc)
            return
        finally:
            path.unlink(missing_ok=True)
        self.counts["installs"] += 1
        self.outcomes[name] = self._outcome_of(name, a.version)
        if self.outcomes[name][0] == "installed":
            self._event(name, a.version, "installed", "")

    def _outcome_of(self, name: str, version: int) -> tuple[str, str]:
        """What the store says became of ``version``: serving, down, or rolled back and why."""
        st = self._agent.store.state(name)
        if st.active == version and st.down is not None and st.down.version == version:
            # Installed but nothing can serve it (e.g. its golden samples fail here, and no
            # good version is kept): for the fleet that is a failed install, with the cause.
            return ("failed", f"v{version} cannot serve: {st.down.reason}")
        if st.active == version:
            return ("installed", "")
        record = next((r for r in st.versions if r.version == version), None)
        return ("rolled_back", record.reason if record else f"v{st.active} is serving instead")
