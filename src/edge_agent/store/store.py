"""The on-disk model store: verified install, atomic activation, rollback, verified load.

Layout under ``state_dir``::

    trust/root.json                       the newest trusted root (rotated by verified updates)
    models/<name>/state.json              the ``ModelState`` (the commit point of every change)
    models/<name>/v<version>/bundle.efb   each kept version, exactly as verified

Crash safety: an install verifies the bundle fully in memory, writes ``v<N>/bundle.efb``
atomically (temp, fsync, rename, fsync dir), and only then replaces ``state.json`` atomically.
A crash before that rename leaves the old state, whose bundle files are untouched; a crash
after it leaves the new state, whose bundle is already complete. Leftover temp files and
version directories the state does not name are removed at open.

Loading re-verifies the bundle from disk against the current root (defence in depth) with the
install time as the reference time: integrity and trust are re-checked, but a model that was
valid when installed is not switched off because its metadata has since expired.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from edge_agent.bundle import LoadedBundle, bundle_bytes, read_bundle, read_raw
from edge_agent.common import durable
from edge_agent.contract import BundleManifest, DeviceProfile
from edge_agent.errors import (
    BundleFormatError,
    BundleVerificationError,
    ContractError,
    ModelNotFoundError,
    ModelStoreError,
)
from edge_agent.store.root_file import RootFile
from edge_agent.store.state import ModelState, VersionRecord
from edge_agent.trust import TrustedRoot, walk_root_chain

log = logging.getLogger("edge_agent.store")

Clock = Callable[[], datetime]


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class InstallResult:
    """What an install changed."""

    name: str
    version: int
    previous: int | None
    removed: tuple[int, ...]


class ModelStore:
    """Installed models of one device. Not thread-safe: the agent serialises store changes."""

    def __init__(
        self,
        state_dir: Path,
        root: TrustedRoot,
        device: DeviceProfile,
        *,
        keep_versions: int = 3,
        clock: Clock | None = None,
    ) -> None:
        """Open (or create) a store and clean up what a crash may have left.

        Raises:
            ModelStoreError: the state directory cannot be created or read.
        """
        self.dir = Path(state_dir)
        self.device = device
        self.keep = keep_versions
        self._clock = clock or (lambda: datetime.now(UTC))
        try:
            (self.dir / "models").mkdir(parents=True, exist_ok=True)
            (self.dir / "trust").mkdir(exist_ok=True)
        except OSError as exc:
            raise ModelStoreError(f"cannot create state directory {self.dir}: {exc}") from exc
        self._rlock = threading.RLock()
        self._depth = 0
        self._root_file = RootFile(self.dir / "trust" / "root.json")
        with self._locked():
            # root_warning: why a newer provisioned root was not taken (empty: it was, or none).
            self.root, self.root_warning = self._root_file.open(root)
        self.recover()

    # ------------------------------------------------------------------------------- trust
    def update_root(self, data: bytes) -> TrustedRoot:
        """Rotate to the next root version (verified against the current one) and persist it.

        Raises:
            as ``update_roots``.
        """
        return self.update_roots([data])

    def update_roots(self, chain: Sequence[bytes]) -> TrustedRoot:
        """Walk ``chain`` from the trusted root (``trust.walk_root_chain``) and persist the result.

        Versions already trusted are skipped; nothing is written unless a newer root was
        accepted, and then only the final one, atomically, under the store lock (so the
        CLI and the daemon never overwrite each other's rotation).

        Returns:
            The trusted root afterwards (unchanged when the chain held nothing new).

        Raises:
            MetadataFormatError, RootRotationError: the chain is refused; the trusted root is
                unchanged.
            ExpiredMetadataError: the chain was walked and persisted, but its final root has
                expired (python-tuf semantics: intermediate roots may be expired, the final
                one must not).
            ModelStoreError: the stored root cannot be read or written.
        """
        with self._locked():
            self.refresh_root()
            new = walk_root_chain(self.root, chain)
            if new is self.root:
                return self.root
            # As python-tuf's updater: the rotation stands even when the final root has
            # expired (revocations take effect), then the expiry is reported; a device with an
            # expired root acts on nothing new (every check fails) until a fresh root arrives.
            self._root_file.write(new)
            log.info("trusted root rotated: v%d -> v%d", self.root.version, new.version)
            self.root = new
            self.root_warning = ""
            new.check_expiry(self._clock())
            return new

    def refresh_root(self) -> bool:
        """Take a newer root another process (``edge-agent root update``) stored; True if changed.

        The stored copy is written only after verification (``update_roots``), under the
        store lock; here it is checked for its self-signature and a higher version.

        Raises:
            ModelStoreError: the stored root cannot be read or is not valid.
        """
        stored = self._root_file.read()
        if stored is None or stored.version <= self.root.version:
            return False
        log.info("trusted root v%d picked up (was v%d)", stored.version, self.root.version)
        self.root = stored
        return True

    # ------------------------------------------------------------------------------ queries
    def names(self) -> list[str]:
        return sorted(
            p.name for p in (self.dir / "models").iterdir() if (p / "state.json").is_file()
        )

    def state(self, name: str) -> ModelState:
        """The state of ``name`` (empty if never installed).

        Raises:
            ModelStoreError: the state file is corrupt.
        """
        path = self._model_dir(name) / "state.json"
        if not path.is_file():
            return ModelState(name=name)
        try:
            return ModelState.from_bytes(path.read_bytes())
        except ContractError as exc:
            raise ModelStoreError(f"{path}: {exc}") from exc

    def bundle_path(self, name: str, version: int) -> Path:
        return self._model_dir(name) / f"v{version}" / "bundle.efb"

    # ----------------------------------------------------------------------------- install
    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise store changes across threads (RLock) and processes (flock on the dir).

        Re-entrant within this process: only the outermost holder takes the file lock.
        """
        with self._rlock:
            self._depth += 1
            try:
                if self._depth == 1:
                    with durable.exclusive_lock(self.dir):
                        yield
                else:
                    yield
            finally:
                self._depth -= 1

    def install(self, bundle: Path, *, force: bool = False) -> InstallResult:
        """Verify ``bundle`` against the trusted root and make it the active version (locked).

        Raises:
            as ``_install``.
        """
        with self._locked():
            return self._install(bundle, force=force)

    def stage(self, bundle: Path) -> InstallResult:
        """Verify ``bundle`` exactly as ``install`` does and keep it without activating it.

        A rollout's shadow: the builder signatures, the device profile and rollback protection
        (not older than the high-water version) are checked as for a serving install; the
        version is recorded as ``staged`` and never serves until it is installed for serving.

        Raises:
            BundleFormatError, BundleVerificationError: the bundle is not installable.
            ModelStoreError: the version failed here before or is active; the disk write failed.
        """
        with self._locked():
            return self._install(bundle, stage=True)

    def unstage(self, name: str, version: int) -> None:
        """Remove a staged version (its shadow was withdrawn). Never touches other versions.

        Raises:
            ModelStoreError: the state cannot be written.
        """
        with self._locked():
            state = self.state(name)
            new = state.unstage(version, _iso(self._clock()))
            if new is not state:
                self._save(new)
                self._remove_versions(name, (version,))

    def _install(self, bundle: Path, *, force: bool = False, stage: bool = False) -> InstallResult:
        """Verify ``bundle`` against the trusted root and make it the active version.

        Raises:
            BundleFormatError, BundleVerificationError: the bundle is not installable; nothing
                on disk changes.
            ModelStoreError: the version failed here before (without ``force``), or the disk
                write failed (the active model is untouched).
        """
        now = self._clock()
        # The unverified manifest only picks which state to check against; everything used
        # afterwards comes from the verified read, which must name the same model and version.
        try:
            probe = BundleManifest.from_bytes(read_raw(bundle).manifest_bytes)
        except ContractError as exc:
            raise BundleFormatError(f"{bundle}: manifest is not readable: {exc}") from exc
        state = self.state(probe.name)
        same = next((r for r in state.versions if r.version == probe.version), None)
        loaded = read_bundle(
            bundle,
            self.root,
            now=now,
            device=self.device,
            installed_version=state.high_water or None,
            installed_manifest_sha256=same.manifest_sha256 if same else None,
        )
        m = loaded.manifest
        name = m.name
        if (name, m.version) != (probe.name, probe.version):
            raise BundleFormatError(f"{bundle} changed while it was being installed")
        rec = VersionRecord(m.version, loaded.verified.manifest_sha256, _iso(now))
        removed: tuple[int, ...] = ()
        if stage:
            new_state = state.stage(rec, _iso(now))
        else:
            new_state, removed = state.install(rec, keep=self.keep, now=_iso(now), force=force)
        data = bundle_bytes(
            loaded.targets_bytes, loaded.manifest_bytes, loaded.artifact, m.artifact.format
        )
        target = self.bundle_path(name, m.version)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            durable.write_atomic(target, data)
            durable.write_atomic(self._model_dir(name) / "state.json", new_state.to_bytes())
        except OSError as exc:
            raise ModelStoreError(f"cannot install {name} v{m.version}: {exc}") from exc
        self._remove_versions(name, removed)
        return InstallResult(name, m.version, state.active, removed)

    # --------------------------------------------------------------------- status changes
    def mark_good(self, name: str, version: int) -> ModelState:
        """Probation passed: ``version`` becomes a rollback target.

        Raises:
            ModelStoreError: ``version`` is no longer the active one (changed meanwhile).
        """
        with self._locked():
            state = self.state(name)
            self._expect_active(state, version)
            return self._save(state.set_status(version, "good", "", _iso(self._clock())))

    def rollback(
        self, name: str, reason: str, *, failed: bool = True, from_version: int | None = None
    ) -> ModelState:
        """Return ``name`` to its newest other good version and record why.

        Args:
            from_version: the version the caller judged; refused if another is active now (a
                verdict must never land on the version an operator switched to meanwhile).

        Raises:
            ModelStoreError: no other good version is kept, the active version changed, or the
                state cannot be written.
        """
        with self._locked():
            state = self.state(name)
            if from_version is not None:
                self._expect_active(state, from_version)
            return self._save(state.rollback(reason, _iso(self._clock()), failed=failed))

    def fail_to(
        self, name: str, target: int, reason: str, *, from_version: int | None = None
    ) -> ModelState:
        """Mark the active version failed and return to ``target`` (see ``ModelState.fail_to``).

        Raises:
            ModelStoreError: the active version changed, or the state cannot be written.
        """
        with self._locked():
            state = self.state(name)
            if from_version is not None:
                self._expect_active(state, from_version)
            return self._save(state.fail_to(target, reason, _iso(self._clock())))

    def revert_to(self, name: str, target: int, reason: str) -> ModelState:
        """Serve the kept version ``target`` again (see ``ModelState.revert_to``).

        Raises:
            ModelNotFoundError: ``target`` is not installed.
            ModelStoreError: ``target`` failed here before, or the state cannot be written.
        """
        with self._locked():
            state = self.state(name)
            return self._save(state.revert_to(target, reason, _iso(self._clock())))

    def mark_down(self, name: str, version: int, reason: str) -> bool:
        """Record that the active ``version`` of ``name`` cannot serve, and why.

        Returns:
            True when this is news (not already recorded with the same version and reason).

        Raises:
            ModelStoreError: ``version`` is no longer active, or the state cannot be written.
        """
        with self._locked():
            state = self.state(name)
            new = state.mark_down(version, reason, _iso(self._clock()))
            if new is state:
                return False
            self._save(new)
            return True

    def clear_down(self, name: str, version: int) -> None:
        """The active ``version`` of ``name`` serves (again): drop its down record, if any.

        Raises:
            ModelStoreError: the state cannot be read or written.
        """
        with self._locked():
            state = self.state(name)
            if state.down is None or state.active != version:
                return
            self._save(state.clear_down(_iso(self._clock())))

    @staticmethod
    def _expect_active(state: ModelState, version: int) -> None:
        if state.active != version:
            raise ModelStoreError(
                f"{state.name} v{version} is no longer active (v{state.active} is)"
            )

    def _save(self, state: ModelState) -> ModelState:
        try:
            durable.write_atomic(self._model_dir(state.name) / "state.json", state.to_bytes())
        except OSError as exc:
            raise ModelStoreError(f"cannot write state of {state.name}: {exc}") from exc
        return state

    # -------------------------------------------------------------------------------- load
    def load(self, name: str, version: int | None = None) -> LoadedBundle:
        """Read and re-verify an installed version (the active one by default).

        Raises:
            ModelNotFoundError: nothing installed / active under that name or version.
            BundleFormatError, BundleVerificationError: the file on disk no longer verifies.
        """
        state = self.state(name)
        v = state.active if version is None else version
        if v is None:
            raise ModelNotFoundError(f"no active version of {name!r}")
        rec = state.record(v)
        path = self.bundle_path(name, v)
        if not path.is_file():
            raise ModelNotFoundError(f"{name} v{v} is recorded but its bundle is missing")
        try:
            installed_at = datetime.strptime(rec.installed_at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                tzinfo=UTC
            )
        except ValueError as exc:
            raise ModelStoreError(f"{name} v{v}: bad install time in state: {exc}") from exc
        loaded = read_bundle(
            path, self.root, now=installed_at, installed_version=None, device=self.device
        )
        if loaded.verified.manifest_sha256 != rec.manifest_sha256:
            raise BundleVerificationError(f"{name} v{v} on disk is not the bundle installed")
        return loaded

    # ----------------------------------------------------------------------------- recovery
    def recover(self) -> None:
        """Remove temp files and version directories no state refers to (crash leftovers).

        Runs under the store lock, so it never sees another process's install in progress.
        """
        with self._locked():
            self._recover()

    def _recover(self) -> None:
        durable.remove_stale_temps(self.dir)
        for model_dir in (self.dir / "models").iterdir():
            if not model_dir.is_dir():
                continue
            try:
                state = self.state(model_dir.name)
            except ModelStoreError:
                continue  # keep everything; the operator must look at a corrupt state
            kept = {r.version for r in state.versions}
            for vdir in model_dir.glob("v*"):
                if vdir.is_dir() and vdir.name[1:].isdigit() and int(vdir.name[1:]) not in kept:
                    shutil.rmtree(vdir, ignore_errors=True)

    def _remove_versions(self, name: str, versions: tuple[int, ...]) -> None:
        for v in versions:
            shutil.rmtree(self._model_dir(name) / f"v{v}", ignore_errors=True)

    def _model_dir(self, name: str) -> Path:
        if "/" in name or name.startswith(".") or not name:
            raise ModelNotFoundError(f"invalid model name {name!r}")
        return self.dir / "models" / name
