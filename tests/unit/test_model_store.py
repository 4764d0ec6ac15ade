"""The model store: verified install, activation, keep-N, rollback, crash safety, disk full."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tarfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from edge_agent.common import durable
from edge_agent.errors import (
    BundleFormatError,
    DigestMismatchError,
    ModelNotFoundError,
    ModelStoreError,
    RollbackError,
)
from edge_agent.store import ModelStore
from model_builder.keystore import KeyStore
from support import DEVICE, NOW, make_bundle, members, repack, write


@pytest.fixture
def keys(tmp_path: Path) -> KeyStore:
    return KeyStore.init(tmp_path / "keys", now=NOW)


def open_store(directory: Path, keys: KeyStore, keep: int = 2) -> ModelStore:
    clock = iter(NOW + timedelta(seconds=i) for i in range(10_000))
    return ModelStore(
        directory, keys.trusted_root(), DEVICE, keep_versions=keep, clock=lambda: next(clock)
    )


def bundle_file(tmp_path: Path, keys: KeyStore, version: int, size: int = 64) -> Path:
    art = bytes([version % 256]) * size
    return write(tmp_path, make_bundle(keys, art, version=version), f"digits-{version}.efb")


def test_install_activates_and_load_reverifies(tmp_path: Path, keys: KeyStore) -> None:
    store = open_store(tmp_path / "state", keys)
    res = store.install(bundle_file(tmp_path, keys, 1))
    assert (res.name, res.version, res.previous) == ("digits", 1, None)
    assert store.state("digits").active == 1
    assert store.load("digits").manifest.version == 1
    assert store.names() == ["digits"]


def test_keep_n_previous_versions_and_prefer_good_ones(tmp_path: Path, keys: KeyStore) -> None:
    store = open_store(tmp_path / "state", keys, keep=2)
    for v in (1, 2, 3, 4):
        store.install(bundle_file(tmp_path, keys, v))
        if v == 1:
            store.mark_good("digits", 1)
    state = store.state("digits")
    kept = [r.version for r in state.versions]
    assert state.active == 4
    assert 1 in kept, "the last good version must survive pruning"
    assert len(kept) == 3  # two previous plus the active one
    assert sorted(p.name for p in (tmp_path / "state" / "models" / "digits").glob("v*")) == [
        f"v{v}" for v in kept
    ]


def test_rollback_returns_to_last_good_and_records_why(tmp_path: Path, keys: KeyStore) -> None:
    store = open_store(tmp_path / "state", keys)
    store.install(bundle_file(tmp_path, keys, 1))
    store.mark_good("digits", 1)
    store.install(bundle_file(tmp_path, keys, 2))
    state = store.rollback("digits", "golden samples failed")
    assert state.active == 1
    assert state.record(2).status == "failed"
    assert state.events[-1]["event"] == "rollback"
    assert "golden samples failed" in state.events[-1]["detail"]
    with pytest.raises(ModelStoreError, match="failed on this device"):
        store.install(bundle_file(tmp_path, keys, 2))
    assert store.install(bundle_file(tmp_path, keys, 2), force=True).version == 2


def test_rollback_without_good_version_is_refused(tmp_path: Path, keys: KeyStore) -> None:
    store = open_store(tmp_path / "state", keys)
    store.install(bundle_file(tmp_path, keys, 1))
    with pytest.raises(ModelStoreError, match="no other good version"):
        store.rollback("digits", "manual")


def test_server_revert_to_a_kept_version_still_on_probation(tmp_path: Path, keys: KeyStore) -> None:
    store = open_store(tmp_path / "state", keys)
    store.install(bundle_file(tmp_path, keys, 1))  # never finished probation
    store.install(bundle_file(tmp_path, keys, 2))
    state = store.revert_to("digits", 1, "rollout aborted")
    assert state.active == 1
    assert state.record(2).status == "rolled_back"  # not failed: it may be sent again later
    assert "rollout aborted" in state.events[-1]["detail"]
    assert store.load("digits").manifest.version == 1
    store.install(bundle_file(tmp_path, keys, 3))
    failed = store.fail_to("digits", 1, "health check")
    assert failed.record(3).status == "failed"
    with pytest.raises(ModelStoreError, match="failed here before"):
        store.revert_to("digits", 3, "no")
    with pytest.raises(ModelNotFoundError):
        store.revert_to("digits", 9, "no")


def test_install_of_older_version_is_refused_even_after_local_rollback(
    tmp_path: Path, keys: KeyStore
) -> None:
    store = open_store(tmp_path / "state", keys)
    for v in (1, 2, 3):
        store.install(bundle_file(tmp_path, keys, v))
        store.mark_good("digits", v)
    store.rollback("digits", "manual", failed=False)
    assert store.state("digits").active == 2
    with pytest.raises(RollbackError):
        store.install(bundle_file(tmp_path, keys, 1))


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_bad_bundle_leaves_active_model_untouched(
    tmp_path: Path, keys: KeyStore, damage: str
) -> None:
    store = open_store(tmp_path / "state", keys)
    store.install(bundle_file(tmp_path, keys, 1))
    good = bundle_file(tmp_path, keys, 2).read_bytes()
    if damage == "truncate":
        bad = good[: len(good) // 2]
    elif damage == "flip":
        parts = members(good)
        parts["model.onnx"] = b"\x00" + parts["model.onnx"][1:]
        bad = repack(parts)
    else:
        bad = os.urandom(5000)
    with pytest.raises((BundleFormatError, DigestMismatchError)):
        store.install(write(tmp_path, bad, "bad.efb"))
    assert store.state("digits").active == 1
    assert store.load("digits").manifest.version == 1


def test_corrupted_bundle_on_disk_fails_verification_at_load(
    tmp_path: Path, keys: KeyStore
) -> None:
    store = open_store(tmp_path / "state", keys)
    store.install(bundle_file(tmp_path, keys, 1, size=4096))
    path = store.bundle_path("digits", 1)
    with tarfile.open(path) as tar:
        offset = tar.getmember("model.onnx").offset_data
    data = bytearray(path.read_bytes())
    data[offset + 100] ^= 0xFF  # bit rot inside the artifact
    path.write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError):
        store.load("digits")


class SimulatedCrash(BaseException):
    """Raised by the fault injector: the process 'dies' here."""


@contextlib.contextmanager
def crash_at(step: int) -> Iterator[list[str]]:
    """Make the ``step``-th durable-write primitive raise, as if power failed right there."""
    calls: list[str] = []
    real_write, real_fsync, real_replace = os.write, os.fsync, Path.replace

    def gate(name: str) -> None:
        calls.append(name)
        if len(calls) == step:
            raise SimulatedCrash(name)

    def write(fd: int, data: object) -> int:
        gate("write")
        return real_write(fd, data)  # type: ignore[arg-type]

    def fsync(fd: int) -> None:
        gate("fsync")
        real_fsync(fd)

    def replace(self: Path, target: object) -> Path:
        gate("replace")
        return real_replace(self, target)  # type: ignore[arg-type]

    mp = pytest.MonkeyPatch()
    mp.setattr(durable.os, "write", write)
    mp.setattr(durable.os, "fsync", fsync)
    mp.setattr(Path, "replace", replace)
    try:
        yield calls
    finally:
        mp.undo()


def test_crash_at_every_durable_step_leaves_a_valid_active_model(
    tmp_path: Path, keys: KeyStore
) -> None:
    v1, v2 = bundle_file(tmp_path, keys, 1), bundle_file(tmp_path, keys, 2)
    probe = open_store(tmp_path / "probe", keys)
    probe.install(v1)
    with crash_at(10_000) as calls:
        probe.install(v2)
    steps = len(calls)
    assert steps >= 6  # write+fsync+replace+dir fsync for the bundle and for the state
    outcomes = set()
    for step in range(1, steps + 1):
        state_dir = tmp_path / f"s{step}"
        open_store(state_dir, keys).install(v1)
        with pytest.raises(SimulatedCrash), crash_at(step):
            open_store(state_dir, keys).install(v2)
        store = open_store(state_dir, keys)  # "reboot"
        active = store.state("digits").active
        assert active in (1, 2)
        assert store.load("digits").manifest.version == active
        assert not list(state_dir.rglob(f"{durable.TMP_PREFIX}*"))
        outcomes.add(active)
    assert outcomes == {1, 2}, "crash points must cover both sides of the commit"


def test_disk_full_during_install_is_a_clear_error(
    tmp_path: Path, keys: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(tmp_path / "state", keys)
    store.install(bundle_file(tmp_path, keys, 1))
    real_write = os.write

    def full(fd: int, data: object) -> int:
        if len(data) > 1000:  # type: ignore[arg-type]
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(durable.os, "write", full)
    with pytest.raises(ModelStoreError, match="No space left"):
        store.install(bundle_file(tmp_path, keys, 2, size=50_000))
    monkeypatch.undo()
    assert open_store(tmp_path / "state", keys).load("digits").manifest.version == 1
    assert not list((tmp_path / "state").rglob(f"{durable.TMP_PREFIX}*"))


def test_real_disk_full_on_a_small_tmpfs(tmp_path: Path, keys: KeyStore) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        store = open_store(mnt / "state", keys)
        store.install(bundle_file(tmp_path, keys, 1, size=20_000))
        with pytest.raises(ModelStoreError, match="No space left"):
            store.install(bundle_file(tmp_path, keys, 2, size=400_000))
        again = open_store(mnt / "state", keys)
        assert again.load("digits").manifest.version == 1
        assert not list((mnt / "state").rglob(f"{durable.TMP_PREFIX}*"))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
