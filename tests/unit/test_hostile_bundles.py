"""Crafted, unsigned bundles through every command that reads one: typed error, one line.

The table holds the hostile inputs of issue 9 (deep nesting, integers past CPython's digit
limit, ``1e400``, a float ``length``) and their siblings (NaN, duplicate keys, a lone
surrogate, invalid UTF-8, wrong types, bytes after the archive). Each goes through
``read_bundle``, ``edge-agent verify``, ``edge-agent install`` and ``fleet-server models
publish`` (a real admin API on loopback): only a typed error may come out, the CLI prints one
``error[code]: ...`` line with the documented exit code, and no message names a server path.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edge_agent.bundle import read_bundle
from edge_agent.bundle.archive import bundle_bytes
from edge_agent.cli import main as agent_cli
from edge_agent.errors import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    EXIT_UNTRUSTED,
    BundleFormatError,
    BundleVerificationError,
    MetadataFormatError,
)
from edge_agent.trust import TrustedRoot
from fakes import FakeGateway
from fleet_server.admin.api import AdminServer, create_app
from fleet_server.cli import main as server_cli
from fleet_server.delivery.library import BundleLibrary
from fleet_server.registry.store import Registry
from fleet_server.service import FleetService
from model_builder import cli as builder_cli
from model_builder.keystore import KeyStore
from support import NOW, make_bundle, members, repack

TOKEN = "h" * 32
DEEP = 100_000


def _targets(parts: dict[str, bytes]) -> dict:  # type: ignore[type-arg]
    return json.loads(parts["targets.json"])


def _with_targets(raw: bytes) -> Callable[[dict[str, bytes]], bytes]:
    def build(parts: dict[str, bytes]) -> bytes:
        return repack({**parts, "targets.json": raw})

    return build


def _edit_targets(edit: Callable[[dict], object]) -> Callable[[dict[str, bytes]], bytes]:  # type: ignore[type-arg]
    def build(parts: dict[str, bytes]) -> bytes:
        doc = _targets(parts)
        edit(doc)
        return repack({**parts, "targets.json": json.dumps(doc).encode()})

    return build


def _splice(token: bytes) -> Callable[[dict[str, bytes]], bytes]:
    """Insert ``"x": <token>`` into the signed part, as raw text (tokens json.dumps won't write)."""

    def build(parts: dict[str, bytes]) -> bytes:
        raw = parts["targets.json"].replace(b'"signed":{', b'"signed":{"x":' + token + b",", 1)
        assert raw != parts["targets.json"]
        return repack({**parts, "targets.json": raw})

    return build


def _first_target(doc: dict, key: str, value: object) -> None:  # type: ignore[type-arg]
    target = next(iter(doc["signed"]["targets"].values()))
    target[key] = value


def _nested(depth: int) -> object:
    value: object = []
    for _ in range(depth):
        value = [value]
    return value


def _set(path: tuple[str, ...], value: object) -> Callable[[dict], None]:  # type: ignore[type-arg]
    def edit(doc: dict) -> None:  # type: ignore[type-arg]
        for key in path[:-1]:
            doc = doc[key]
        doc[path[-1]] = value

    return edit


def _appended(tail: bytes) -> Callable[[dict[str, bytes]], bytes]:
    def build(parts: dict[str, bytes]) -> bytes:
        return repack(parts) + tail

    return build


# name -> (build from the honest members, the family read_bundle must raise)
HOSTILE: dict[str, tuple[Callable[[dict[str, bytes]], bytes], type[Exception]]] = {
    "deep nesting (RecursionError)": (
        _with_targets(b"[" * DEEP + b"]" * DEEP),
        MetadataFormatError,
    ),
    "deep nesting in the signed part": (
        _edit_targets(_set(("signed", "custom"), _nested(900))),
        MetadataFormatError,
    ),
    "5000-digit integer version": (_splice(b"9" * 5000), MetadataFormatError),
    "5000-digit target length": (
        _edit_targets(lambda d: _first_target(d, "length", 0)),  # replaced below as text
        MetadataFormatError,
    ),
    "1e400 number": (_splice(b"1e400"), MetadataFormatError),
    "float length in targets": (
        _edit_targets(lambda d: _first_target(d, "length", 12.5)),
        MetadataFormatError,
    ),
    "float version": (_edit_targets(_set(("signed", "version"), 1.5)), MetadataFormatError),
    "NaN token": (_splice(b"NaN"), MetadataFormatError),
    "-Infinity token": (_splice(b"-Infinity"), MetadataFormatError),
    "duplicate key": (_splice(b'1,"x":2'), MetadataFormatError),
    "lone surrogate": (_splice(b'"\\udc00"'), MetadataFormatError),
    "invalid UTF-8": (_with_targets(b'{"signed":"\xff\xfe"}'), MetadataFormatError),
    "targets as a list": (_edit_targets(_set(("signed", "targets"), [1, 2])), MetadataFormatError),
    "signatures as an object": (
        _edit_targets(_set(("signatures",), {"a": 1})),
        MetadataFormatError,
    ),
    "expires as an integer": (_edit_targets(_set(("signed", "expires"), 7)), MetadataFormatError),
    "year 99999 expiry": (
        _edit_targets(_set(("signed", "expires"), "99999-01-01T00:00:00Z")),
        MetadataFormatError,
    ),
    "negative length": (
        _edit_targets(lambda d: _first_target(d, "length", -1)),
        MetadataFormatError,
    ),
    "hashes as a string": (
        _edit_targets(lambda d: _first_target(d, "hashes", "sha256")),
        MetadataFormatError,
    ),
    "not JSON at all": (_with_targets(b"\x00" * 64), MetadataFormatError),
    "garbage appended after the archive": (_appended(b"garbage"), BundleFormatError),
    "a zero block past the record padding": (_appended(b"\0" * 512), BundleFormatError),
}


def _long_length(parts: dict[str, bytes]) -> bytes:
    doc = _targets(parts)
    _first_target(doc, "length", 123456789)
    raw = json.dumps(doc).encode().replace(b"123456789", b"7" * 5000)
    return repack({**parts, "targets.json": raw})


HOSTILE["5000-digit target length"] = (_long_length, MetadataFormatError)


def _with_manifest(raw: bytes) -> Callable[[dict[str, bytes]], bytes]:
    def build(parts: dict[str, bytes]) -> bytes:
        return repack({**parts, "manifest.json": raw})

    return build


def _splice_manifest(token: bytes) -> Callable[[dict[str, bytes]], bytes]:
    def build(parts: dict[str, bytes]) -> bytes:
        raw = parts["manifest.json"].replace(b'"version":', b'"version":' + token + b',"x":', 1)
        assert raw != parts["manifest.json"]
        return repack({**parts, "manifest.json": raw})

    return build


# The manifest is signed by digest, so read_bundle refuses these as tampered; but `install`
# first reads the *unverified* manifest to pick the model's state, and that parse is where a
# RecursionError or the int-digit ValueError used to escape.
HOSTILE_MANIFESTS: dict[str, Callable[[dict[str, bytes]], bytes]] = {
    "manifest: deep nesting": _with_manifest(b"[" * DEEP + b"]" * DEEP),
    "manifest: 5000-digit version": _splice_manifest(b"9" * 5000),
    "manifest: 1e400": _splice_manifest(b"1e400"),
    "manifest: NaN": _splice_manifest(b"NaN"),
    "manifest: lone surrogate": _splice_manifest(b'"\\ud800"'),
    "manifest: invalid UTF-8": _with_manifest(b'{"name":"\xff"}'),
    "manifest: a list": _with_manifest(b"[1, 2]"),
}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyStore:
    return KeyStore.init(tmp_path_factory.mktemp("keys") / "keys", now=datetime.now(UTC))


@pytest.fixture(scope="module")
def honest(keys: KeyStore) -> bytes:
    return make_bundle(keys, now=datetime.now(UTC))


@pytest.fixture(scope="module")
def hostile_files(honest: bytes, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("hostile")
    parts = members(honest)
    files = {}
    for i, (name, (build, _)) in enumerate(HOSTILE.items()):
        path = out / f"hostile-{i}.efb"
        path.write_bytes(build(parts))
        files[name] = path
    for i, (name, build) in enumerate(HOSTILE_MANIFESTS.items()):
        path = out / f"hostile-manifest-{i}.efb"
        path.write_bytes(build(parts))
        files[name] = path
    return files


@pytest.mark.parametrize("name", list(HOSTILE_MANIFESTS))
def test_hostile_manifests_through_install_and_verify(
    name: str,
    hostile_files: dict[str, Path],
    keys: KeyStore,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "root.json").write_bytes(keys.root_bytes())
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[store]\nstate_dir = "{tmp_path / "state"}"\nroot_path = "{tmp_path / "root.json"}"\n'
    )
    path = str(hostile_files[name])
    code, err = _run(agent_cli.main, ["install", path, "--config", str(config)], capsys)
    assert code == EXIT_BAD_INPUT, err
    assert "manifest is not readable" in err, err
    assert len(err.strip().splitlines()) == 1, err
    code, err = _run(
        agent_cli.main, ["verify", path, "--root", str(tmp_path / "root.json")], capsys
    )
    assert code == EXIT_UNTRUSTED, err  # the manifest's digest is signed: tampering
    _assert_one_typed_line(err)


def _root(keys: KeyStore) -> TrustedRoot:
    chain = keys.root_chain()
    return TrustedRoot.from_chain(chain[0], chain[1:])


def _run(
    main: Callable[[list[str]], None], argv: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    return int(info.value.code or 0), err


def _exit_code(name: str) -> int:
    untrusted = issubclass(HOSTILE[name][1], BundleVerificationError)
    return EXIT_UNTRUSTED if untrusted else EXIT_BAD_INPUT


def _assert_one_typed_line(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error["), err
    assert "Traceback" not in err
    assert "/tmp" not in err, err
    assert "pytest-" not in err, err


@pytest.mark.parametrize("name", list(HOSTILE))
def test_read_bundle_raises_only_the_typed_error(
    name: str, hostile_files: dict[str, Path], keys: KeyStore
) -> None:
    family = HOSTILE[name][1]
    with pytest.raises(family):
        read_bundle(
            hostile_files[name],
            _root(keys),
            now=datetime.now(UTC),
            installed_version=None,
            device=None,
        )


def test_the_honest_bundle_verifies(
    honest: bytes, keys: KeyStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "root.json").write_bytes(keys.root_bytes())
    (tmp_path / "b.efb").write_bytes(honest)
    code, err = _run(
        agent_cli.main,
        ["verify", str(tmp_path / "b.efb"), "--root", str(tmp_path / "root.json")],
        capsys,
    )
    assert code == EXIT_OK, err


@pytest.mark.parametrize("name", list(HOSTILE))
def test_edge_agent_verify_prints_one_typed_line(
    name: str,
    hostile_files: dict[str, Path],
    keys: KeyStore,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "root.json").write_bytes(keys.root_bytes())
    argv = ["verify", str(hostile_files[name]), "--root", str(tmp_path / "root.json")]
    code, err = _run(agent_cli.main, argv, capsys)
    family = HOSTILE[name][1]
    assert code == (
        EXIT_UNTRUSTED if issubclass(family, BundleVerificationError) else EXIT_BAD_INPUT
    )
    _assert_one_typed_line(err)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_model_builder_inspect_prints_one_typed_line(
    name: str, hostile_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # inspect reads without verifying: the parse itself must be the strict one.
    code, err = _run(builder_cli.main, ["inspect", str(hostile_files[name])], capsys)
    assert code != EXIT_OK
    _assert_one_typed_line(err)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_edge_agent_install_prints_one_typed_line(
    name: str,
    hostile_files: dict[str, Path],
    keys: KeyStore,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "root.json").write_bytes(keys.root_bytes())
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[store]\nstate_dir = "{tmp_path / "state"}"\nroot_path = "{tmp_path / "root.json"}"\n'
    )
    argv = ["install", str(hostile_files[name]), "--config", str(config)]
    code, err = _run(agent_cli.main, argv, capsys)
    family = HOSTILE[name][1]
    assert code == (
        EXIT_UNTRUSTED if issubclass(family, BundleVerificationError) else EXIT_BAD_INPUT
    )
    _assert_one_typed_line(err)
    assert not (tmp_path / "state" / "models").exists() or not any(
        (tmp_path / "state" / "models").iterdir()
    )


@pytest.fixture(scope="module")
def admin_url(keys: KeyStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("server")
    registry = Registry.open(f"sqlite:///{tmp / 'registry.db'}")
    registry.upgrade()
    service = FleetService(
        registry,
        BundleLibrary(tmp / "bundles", keys.trusted_root()),
        FakeGateway(),
        [keys.signer("online-1")],
        clock=lambda: datetime.now(UTC),
        ttl=timedelta(hours=1),
    )
    server = AdminServer(create_app(service, TOKEN), "127.0.0.1", 0)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
        registry.close()


@pytest.mark.parametrize("name", list(HOSTILE))
def test_fleet_server_models_publish_answers_4xx_and_one_line(
    name: str,
    hostile_files: dict[str, Path],
    admin_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["models", "publish", "--url", admin_url, "--token", TOKEN, str(hostile_files[name])]
    code, err = _run(server_cli.main, argv, capsys)
    assert code == EXIT_BAD_INPUT, err  # AdminRequestError: the server refused with a 4xx
    _assert_one_typed_line(err)
    assert ": 400: " in err, err  # 400, never 500
    family = HOSTILE[name][1]
    if family is MetadataFormatError:
        assert "400: bundle is not trusted by the builder root: " in err, err
    else:
        assert "400: not a readable bundle: bundle has " in err, err


# ------------------------------------------------------------------ the end of the archive
def _tail_after_artifact(data: bytes) -> int:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        last = tar.getmembers()[-1]
        return int(last.offset_data + last.size + (-last.size % 512))


def _read(keys: KeyStore, tmp_path: Path, data: bytes) -> object:
    path = tmp_path / "b.efb"
    path.write_bytes(data)
    return read_bundle(
        path, _root(keys), now=datetime.now(UTC), installed_version=None, device=None
    )


def test_what_the_builder_writes_is_accepted(keys: KeyStore, honest: bytes, tmp_path: Path) -> None:
    # the builder's own writer: two end blocks, then zeros up to a 10240-byte record
    assert len(honest) % 10240 == 0
    assert _read(keys, tmp_path, honest)
    parts = members(honest)
    rebuilt = bundle_bytes(
        parts["targets.json"], parts["manifest.json"], parts["model.onnx"], "onnx"
    )
    assert _read(keys, tmp_path, rebuilt)


def test_a_cut_end_is_refused(keys: KeyStore, honest: bytes, tmp_path: Path) -> None:
    """A shorter zero tail is still the whole artifact, but another byte string: refused, so
    one bundle has one digest (the library stores and devices fetch by digest)."""
    tail = len(honest) - _tail_after_artifact(honest)
    assert tail >= 1024
    for cut in (1, 512, 1024, tail):
        with pytest.raises(BundleFormatError, match="end-of-archive blocks are cut"):
            _read(keys, tmp_path, honest[:-cut])


@pytest.mark.parametrize(
    "tail",
    [b"x", b"\0" * 512, b"\0" * 10240, b"\0" * 511 + b"\x01", b"PK\x03\x04" + b"\0" * 100],
)
def test_bytes_after_the_archive_are_refused(
    keys: KeyStore, honest: bytes, tmp_path: Path, tail: bytes
) -> None:
    with pytest.raises(BundleFormatError, match="after"):
        _read(keys, tmp_path, honest + tail)


def test_a_non_zero_byte_inside_the_padding_is_refused(
    keys: KeyStore, honest: bytes, tmp_path: Path
) -> None:
    end = _tail_after_artifact(honest)
    for offset in (end, end + 600, len(honest) - 1):
        data = bytearray(honest)
        data[offset] = 0x41
        with pytest.raises(BundleFormatError, match="after"):
            _read(keys, tmp_path, bytes(data))


def test_a_second_archive_appended_is_refused(
    keys: KeyStore, honest: bytes, tmp_path: Path
) -> None:
    with pytest.raises(BundleFormatError, match="after"):
        _read(keys, tmp_path, honest + honest)


def test_errors_name_no_path(keys: KeyStore, honest: bytes, tmp_path: Path) -> None:
    with pytest.raises(BundleFormatError) as info:
        _read(keys, tmp_path, honest[:700])
    assert str(tmp_path) not in str(info.value)
    with pytest.raises(BundleFormatError) as info:
        read_bundle(
            tmp_path / "missing.efb", _root(keys), now=NOW, installed_version=None, device=None
        )
    assert str(tmp_path) not in str(info.value)


@pytest.mark.parametrize(
    ("suffix", "data"),
    [
        (".npz", b"PK\x03\x04" + b"\0" * 40),  # a zip header and nothing behind it
        (".npy", b"\x93NUMPY\x01\x00v\x00{'descr'"),  # cut inside the header
        (".npy", b"\x80\x04pickle"),
    ],
)
def test_edge_agent_infer_refuses_damaged_arrays_in_one_line(
    suffix: str, data: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / f"x{suffix}"
    path.write_bytes(data)
    code, err = _run(agent_cli.main, ["infer", "digits", str(path)], capsys)
    assert code == EXIT_BAD_INPUT, err
    assert err.startswith("error[input_invalid]: cannot read "), err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("name", ["deep nesting (RecursionError)", "float length in targets"])
def test_the_real_edge_agent_command(
    name: str, hostile_files: dict[str, Path], keys: KeyStore, tmp_path: Path
) -> None:
    """Once through the installed console script, as an operator would run it."""
    (tmp_path / "root.json").write_bytes(keys.root_bytes())
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "edge-agent"),
            "verify",
            str(hostile_files[name]),
            "--root",
            str(tmp_path / "root.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == EXIT_UNTRUSTED, proc.stderr
    assert proc.stderr.startswith("error[metadata_malformed]: targets metadata "), proc.stderr
    _assert_one_typed_line(proc.stderr)
