"""The ``agent`` entry of accepted desired states: fetch the agent package, stage it.

Owns what the fleet sync does about the agent's own software (issue 15): when the accepted
desired state names an agent release (``trust.agent_release.AgentAssignment``) that this
device does not run, the package is downloaded by the same block transfer as model bundles
(resumable, capped by the signed length, checked against the signed digest), checked to be
the assigned release, verified with the builder keys and staged beside the running release
(``selfupdate.install.stage_package``). The launcher then stops this agent, tries the new one
and rolls back by itself if it fails (``edge_agent.selfupdate``). Also owns the ``agent`` part
of the reported state (``wire.reported.AgentReport``): the release running, the assigned
one, and what became of it, read from the launcher's state file.

Only an agent that a launcher runs (``EDGEFLEET_AGENT_ROOT`` set) advertises the
``agent-update`` capability; the server sends the ``agent`` entry to no other device. Does
not verify desired states (``desired_intake``) nor talk MQTT (``loop``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from edge_agent.bundle.agent_archive import LoadedAgentPackage
from edge_agent.config import SyncConfig
from edge_agent.errors import EdgefleetError, TransportError
from edge_agent.selfupdate.install import stage_package
from edge_agent.selfupdate.releases import BASE, ENV_AGENT_ROOT, Layout
from edge_agent.sync.download import Download
from edge_agent.sync.shadow_deploy import sha256_of
from edge_agent.trust import TrustedRoot
from edge_agent.trust.agent_release import AgentAssignment, check_agent_package
from edge_agent.trust.desired import DesiredState
from edge_agent.wire.reported import AgentReport, TransferReport
from edge_agent.wire.transfer import BlockData, BlockRequest

__all__ = ["DOWNLOAD_DIR", "AgentDeployer"]

log = logging.getLogger("edge_agent.sync.loop")

#: Where agent packages are downloaded, under the sync directory's ``downloads/`` (not a
#: model name: those start with a letter or digit).
DOWNLOAD_DIR = "_agent"

Event = Callable[[str | None, int | None, str, str], None]


class AgentDeployer:
    """The agent assignment of one device. ``accept_block`` may run on another thread."""

    def __init__(
        self,
        layout: Layout | None,
        directory: Path,
        sync: SyncConfig,
        root: Callable[[], TrustedRoot],
        *,
        event: Event,
        wake: Callable[[], None],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.layout = layout
        self._dir = directory / "downloads" / DOWNLOAD_DIR
        self._sync = sync
        self._root = root
        self._event = event
        self._wake = wake
        self._clock = clock
        self._lock = threading.Lock()  # the download: blocks arrive on the MQTT thread
        self.download: Download | None = None
        self._finished: Path | None = None  # a complete package to stage at the next drive
        self.assigned: AgentAssignment | None = None
        self.outcome: tuple[str, str] = ("pending", "")
        self._refused: dict[str, str] = {}

    @classmethod
    def from_env(
        cls,
        directory: Path,
        sync: SyncConfig,
        root: Callable[[], TrustedRoot],
        *,
        event: Event,
        wake: Callable[[], None],
    ) -> AgentDeployer:
        """The deployer of this process: with a layout when a launcher runs it."""
        where = os.environ.get(ENV_AGENT_ROOT)
        layout = Layout.open(Path(where)) if where else None
        return cls(layout, directory, sync, root, event=event, wake=wake)

    @property
    def capable(self) -> bool:
        """Whether this agent can act on an ``agent`` assignment (a launcher runs it)."""
        return self.layout is not None

    # ------------------------------------------------------------------ desired state
    def apply(self, state: DesiredState) -> None:
        """Act on the accepted desired state's ``agent`` entry (module docstring)."""
        a = state.agent
        with self._lock:
            dl = self.download
            if dl is not None and (a is None or a.bundle() != dl.assignment):
                dl.abandon()
                self.download = None
        self._finished = None
        self.assigned = a
        if a is None:
            self.outcome = ("pending", "")
            return
        if self.layout is None:
            self.outcome = ("failed", "this agent is not run by a launcher: it cannot update")
            return
        settled = self._settled(a)
        if settled is not None:
            self.outcome = settled
            return
        refused = self._refused.get(a.bundle_sha256)
        if refused is not None:
            self.outcome = ("failed", f"refused before: {refused}")
            return
        done = self._dir / f"{a.bundle_sha256}.bundle"
        if sha256_of(done) == a.bundle_sha256:  # downloaded before a restart: stage it
            self._finished = done
            self.outcome = ("downloading", "")
            return
        with self._lock:
            if self.download is None:
                try:
                    self.download = Download(
                        DOWNLOAD_DIR,
                        a.bundle(),
                        self._dir,
                        window=self._sync.block_window,
                        retry_seconds=self._sync.block_retry_seconds,
                    )
                except OSError as exc:
                    self.outcome = ("failed", f"cannot start the download: {exc}")
                    return
                log.info("agent release %d: downloading %d bytes", a.release, a.bundle_length)
                self._event(None, None, "agent_transfer_started", f"release {a.release}")
        self.outcome = ("downloading", "")

    def _settled(self, a: AgentAssignment) -> tuple[str, str] | None:
        """The outcome when nothing is to be fetched: running, on trial, failed here."""
        assert self.layout is not None
        st = self.layout.load_state()
        if self.layout.current() == str(a.release):
            trying = st.state == "trying" and st.candidate == a.release
            return ("trying", "") if trying else ("installed", "")
        if a.release in st.failed:
            why = st.reason if st.candidate == a.release else "failed its trial here before"
            return ("rolled_back", why)
        if st.state in ("staged", "trying") and st.candidate == a.release:
            return ("trying", "")
        return None

    # ------------------------------------------------------------------ blocks
    def accept_block(self, block: BlockData) -> bool:
        """Write a block of the package download; False when it is not this transfer's."""
        with self._lock:
            dl = self.download
            if dl is None or dl.transfer_id != block.transfer_id:
                return False
            try:
                dl.accept(block)
            except EdgefleetError as exc:
                log.warning("agent package: block %d refused: %s", block.index, exc)
                return True
            except OSError as exc:
                log.error("agent package: cannot write block: %s", exc)
                return True
            complete = dl.complete
        if complete:
            self._wake()
        return True

    def drive(self, request: Callable[[BlockRequest], None]) -> None:
        """Ask for due blocks; stage a finished download."""
        a = self.assigned
        if a is None:
            return
        path, self._finished = self._finished, None
        with self._lock:
            dl = self.download
            if dl is not None and not dl.complete:
                due = dl.due_request()
                if due is not None:
                    with contextlib.suppress(TransportError):  # offline: asked again later
                        request(due)
                return
            self.download = None
        if dl is not None:
            try:
                path = dl.finish()
            except (EdgefleetError, OSError) as exc:
                self.outcome = ("failed", f"download: {exc}")
                return
        if path is not None:  # outside the lock: building the release takes seconds
            self._stage(a, path)

    def _stage(self, a: AgentAssignment, path: Path) -> None:
        assert self.layout is not None

        def is_assigned(loaded: LoadedAgentPackage) -> None:
            check_agent_package(a, loaded.targets_bytes, loaded.verified)

        try:
            result = stage_package(
                self.layout, path, self._root(), now=self._clock(), check=is_assigned
            )
        except (EdgefleetError, TimeoutError) as exc:
            self.outcome = ("failed", str(exc)[:1024])
            self._refused[a.bundle_sha256] = str(exc)[:200]
            self._event(None, None, "agent_install_failed", f"release {a.release}: {exc}")
            log.error("agent release %d: not staged: %s", a.release, exc)
            return
        finally:
            path.unlink(missing_ok=True)
        self.outcome = ("trying", "")
        self._event(None, None, "agent_staged", f"release {result.release}")
        log.info("agent release %d staged: the launcher switches to it", result.release)

    # ------------------------------------------------------------------ reporting
    def keep(self) -> set[tuple[str, str]]:
        """(directory, SHA-256) of the download to keep when old downloads are pruned."""
        a = self.assigned
        return set() if a is None else {(DOWNLOAD_DIR, a.bundle_sha256)}

    def report(self) -> AgentReport | None:
        """The ``agent`` part of the reported state (None: no launcher runs this agent)."""
        if self.layout is None:
            return None
        current = self.layout.current()
        st = self.layout.load_state()
        a = self.assigned
        outcome, reason = self.outcome
        if a is not None:
            outcome, reason = self._settled(a) or self.outcome
        with self._lock:
            dl = self.download
            transfer = (
                None
                if dl is None or a is None
                else TransferReport(a.release, dl.received, dl.total, dl.plan.length)
            )
        return AgentReport(
            release=None if current == BASE else int(current),
            assigned=None if a is None else a.release,
            outcome=outcome,
            reason=reason[:1024],
            failed=st.failed,
            transfer=transfer,
        )

    def close(self) -> None:
        """Persist download progress (a restart resumes). Never raises."""
        with self._lock:
            if self.download is not None:
                self.download.close()
