"""The agent's own software as a signed target: one test per attack, honest package first.

Every attack test first shows the honest package passing, then the attacked one failing with
its specific typed error, so a test fails if the protection is removed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata

from edge_agent.bundle import read_bundle
from edge_agent.bundle.agent_archive import agent_package_bytes, read_agent_package
from edge_agent.errors import (
    BundleFormatError,
    DigestMismatchError,
    ExpiredMetadataError,
    IncompatibleTargetError,
    LengthMismatchError,
    MetadataFormatError,
    MixAndMatchError,
    RollbackError,
    SignatureThresholdError,
)
from edge_agent.trust import TrustedRoot
from edge_agent.trust.agent_release import (
    AGENT_KIND,
    AgentCompatibility,
    AgentHost,
    AgentRelease,
    make_agent_targets,
    verify_agent_release,
)
from model_builder.agent_package import agent_release_for, package_agent, wheel_version
from model_builder.errors import InputDataError
from model_builder.keystore import KeyStore
from support import NOW, make_bundle, write

HOST = AgentHost(python="3.11", platform="linux", arch="x86_64", config_schema=1)


def fake_wheel(directory: Path, version: str = "0.2.0", declared: str | None = None) -> Path:
    """A minimal edgefleet wheel: the file name and METADATA carry the version."""
    path = directory / f"edgefleet-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(
            f"edgefleet-{version}.dist-info/METADATA",
            f"Metadata-Version: 2.1\nName: edgefleet\nVersion: {declared or version}\n",
        )
        zf.writestr("edge_agent/__init__.py", f'__version__ = "{version}"\n')
    return path


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore.init(tmp_path / "keys", now=NOW)


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    return fake_wheel(tmp_path)


def _root(store: KeyStore) -> TrustedRoot:
    return TrustedRoot.from_bytes(store.root_bytes())


def _release(wheel: Path, release: int = 5, **compat: object) -> AgentRelease:
    kw: dict[str, object] = {"python": "3.11", "arch": ("x86_64", "aarch64")} | compat
    return agent_release_for(wheel, release=release, **kw)  # type: ignore[arg-type]


def _package(store: KeyStore, wheel: Path, release: int = 5, **compat: object) -> bytes:
    return package_agent(wheel, _release(wheel, release, **compat), store, now=NOW)


def _members(data: bytes) -> list[bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [tar.extractfile(m).read() for m in tar]  # type: ignore[union-attr]


def _read(store: KeyStore, tmp_path: Path, data: bytes, **kw: object) -> object:
    path = tmp_path / "agent.efa"
    path.write_bytes(data)
    kw.setdefault("now", NOW)
    kw.setdefault("installed_release", 4)
    kw.setdefault("host", HOST)
    return read_agent_package(path, _root(store), **kw)  # type: ignore[arg-type]


def test_honest_package_verifies_and_round_trips(
    store: KeyStore, wheel: Path, tmp_path: Path
) -> None:
    loaded = _read(store, tmp_path, _package(store, wheel))
    rel = loaded.verified.release  # type: ignore[attr-defined]
    assert (rel.release, rel.version, rel.wheel) == (5, "0.2.0", wheel.name)
    assert loaded.wheel == wheel.read_bytes()  # type: ignore[attr-defined]
    assert AgentRelease.from_bytes(rel.to_bytes()) == rel
    targets = Metadata.from_bytes(_members(_package(store, wheel))[0]).signed
    kinds = {t.unrecognized_fields["custom"]["edgefleet"]["kind"] for t in targets.targets.values()}
    assert kinds == {AGENT_KIND, "agent-wheel"}
    assert targets.version == 5


def test_package_signed_by_an_unknown_key_is_refused(
    store: KeyStore, wheel: Path, tmp_path: Path
) -> None:
    _read(store, tmp_path, _package(store, wheel))
    other = KeyStore.init(tmp_path / "other", now=NOW)
    with pytest.raises(SignatureThresholdError):
        _read(store, tmp_path, _package(other, wheel))


def test_package_signed_by_the_online_key_is_refused(
    store: KeyStore, wheel: Path, tmp_path: Path
) -> None:
    rel = _release(wheel)
    md = Metadata(make_agent_targets(rel, NOW + timedelta(days=30)))
    online = next(k for k in store.list_keys() if "timestamp" in k.roles)
    md.sign(store.signer(online.label))
    data = agent_package_bytes(bytes(md.to_bytes()), rel.to_bytes(), wheel.read_bytes())
    with pytest.raises(SignatureThresholdError):
        _read(store, tmp_path, data)


def test_expired_package_is_refused(store: KeyStore, wheel: Path, tmp_path: Path) -> None:
    data = _package(store, wheel)
    _read(store, tmp_path, data)
    with pytest.raises(ExpiredMetadataError):
        _read(store, tmp_path, data, now=NOW + timedelta(days=366))


@pytest.mark.parametrize("installed", [5, 6])
def test_rollback_to_an_older_or_same_release_is_refused(
    store: KeyStore, wheel: Path, tmp_path: Path, installed: int
) -> None:
    data = _package(store, wheel)
    _read(store, tmp_path, data, installed_release=4)
    _read(store, tmp_path, data, installed_release=None)  # the base install: any release
    with pytest.raises(RollbackError):
        _read(store, tmp_path, data, installed_release=installed)


def test_tampered_wheel_is_refused(store: KeyStore, wheel: Path, tmp_path: Path) -> None:
    targets, meta, whl = _members(_package(store, wheel))
    _read(store, tmp_path, agent_package_bytes(targets, meta, whl))
    evil = bytearray(whl)
    evil[-1] ^= 1
    with pytest.raises(DigestMismatchError):
        _read(store, tmp_path, agent_package_bytes(targets, meta, bytes(evil)))


def test_longer_wheel_is_refused_before_it_is_read(
    store: KeyStore, wheel: Path, tmp_path: Path
) -> None:
    targets, meta, whl = _members(_package(store, wheel))
    with pytest.raises(LengthMismatchError):
        _read(store, tmp_path, agent_package_bytes(targets, meta, whl + b"\0" * 4096))


def test_tampered_metadata_is_refused(store: KeyStore, wheel: Path, tmp_path: Path) -> None:
    targets, meta, whl = _members(_package(store, wheel))
    doc = json.loads(meta)
    doc["compatibility"]["arch"] = ["any"]  # widen where it runs, same length or not
    with pytest.raises((DigestMismatchError, LengthMismatchError)):
        _read(store, tmp_path, agent_package_bytes(targets, json.dumps(doc).encode(), whl))


def test_metadata_of_another_release_is_refused(
    store: KeyStore, wheel: Path, tmp_path: Path
) -> None:
    t5, _m5, whl = _members(_package(store, wheel, release=5))
    _t6, m6, _ = _members(_package(store, wheel, release=6))
    with pytest.raises(DigestMismatchError):
        _read(store, tmp_path, agent_package_bytes(t5, m6, whl))


def test_a_model_bundle_is_not_an_agent_package_and_back(
    store: KeyStore, wheel: Path, tmp_path: Path
) -> None:
    bundle = _members(make_bundle(store))
    meta = _release(wheel).to_bytes()
    with pytest.raises(MixAndMatchError):  # a model's signed targets with agent bytes
        verify_agent_release(
            _root(store), bundle[0], meta, now=NOW, installed_release=None, host=HOST
        )
    agent = _members(_package(store, wheel))
    fake = io.BytesIO()
    with tarfile.open(fileobj=fake, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (
            ("targets.json", agent[0]),
            ("manifest.json", agent[1]),
            ("model.onnx", agent[2]),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(MetadataFormatError):  # the agent's signed targets read as a bundle
        read_bundle(
            write(tmp_path, fake.getvalue()), _root(store), now=NOW,
            installed_version=None, device=None,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("host_change", "compat"),
    [
        ({"python": "3.12"}, {}),
        ({"arch": "armv7l"}, {}),
        ({"platform": "darwin"}, {}),
        ({"config_schema": 1}, {"min_config_schema": 2}),
    ],
)
def test_incompatible_release_is_refused(
    store: KeyStore,
    wheel: Path,
    tmp_path: Path,
    host_change: dict[str, object],
    compat: dict[str, object],
) -> None:
    data = _package(store, wheel, **compat)
    _read(store, tmp_path, data, host=dataclasses.replace(HOST, config_schema=9))
    with pytest.raises(IncompatibleTargetError):
        _read(store, tmp_path, data, host=dataclasses.replace(HOST, **host_change))


def test_any_arch_runs_everywhere(store: KeyStore, wheel: Path, tmp_path: Path) -> None:
    data = _package(store, wheel, arch=("any",))
    _read(store, tmp_path, data, host=dataclasses.replace(HOST, arch="riscv64"))


@pytest.mark.parametrize(
    "tail", [b"x", b"\0" * 10240 + b"junk", b"\0" * 20480], ids=["byte", "junk", "extra-record"]
)
def test_bytes_after_the_archive_are_refused(
    store: KeyStore, wheel: Path, tmp_path: Path, tail: bytes
) -> None:
    data = _package(store, wheel)
    with pytest.raises(BundleFormatError):
        _read(store, tmp_path, data + tail)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(release=True),
        lambda d: d.update(release=1.5),
        lambda d: d.update(version="1.0; rm -rf /"),
        lambda d: d.update(wheel="../../evil.whl"),
        lambda d: d.update(wheel_length=-1),
        lambda d: d.update(extra=1),
        lambda d: d.pop("compatibility"),
        lambda d: d["compatibility"].update(arch=[]),
        lambda d: d["compatibility"].update(arch="x86_64"),
        lambda d: d["compatibility"].update(python="4"),
        lambda d: d.update(_type="desired-state"),
    ],
)
def test_hostile_metadata_gets_a_typed_error(wheel: Path, edit: object) -> None:
    doc = _release(wheel).to_dict()
    AgentRelease.from_dict(json.loads(json.dumps(doc)))
    edit(doc)  # type: ignore[operator]
    with pytest.raises(MetadataFormatError):
        AgentRelease.from_bytes(json.dumps(doc).encode())


@pytest.mark.parametrize(
    "data", [b"", b"[]", b"{" * 100 + b"}" * 100, b'{"a": 1e400}', b"\xff\xfe"]
)
def test_hostile_metadata_bytes_get_a_typed_error(data: bytes) -> None:
    with pytest.raises(MetadataFormatError):
        AgentRelease.from_bytes(data)


def test_builder_refuses_a_wheel_that_is_not_edgefleet(tmp_path: Path) -> None:
    assert wheel_version(fake_wheel(tmp_path)) == "0.2.0"
    with pytest.raises(InputDataError):  # file name and METADATA disagree
        wheel_version(fake_wheel(tmp_path, "0.3.0", declared="0.4.0"))
    other = tmp_path / "numpy-1.0-py3-none-any.whl"
    other.write_bytes(b"PK")
    with pytest.raises(InputDataError):
        wheel_version(other)


def test_builder_refuses_to_sign_a_release_of_another_wheel(
    store: KeyStore, wheel: Path, tmp_path: Path
) -> None:
    rel = _release(wheel)
    tampered = dataclasses.replace(rel, wheel_sha256=hashlib.sha256(b"other").hexdigest())
    with pytest.raises(InputDataError):
        package_agent(wheel, tampered, store, now=NOW)
    assert AgentCompatibility("3.11", "linux", ("any",), 1).to_dict()["arch"] == ["any"]
