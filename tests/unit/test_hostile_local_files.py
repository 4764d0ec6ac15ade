"""Files the agent and the server read back (state, bitmaps, refused list, captures, roots,
stored desired states) go through the strict reader: a corrupt or planted file gives a typed
error or is skipped, never a RecursionError, an int-conversion ValueError or an inf."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import ContractError, MetadataFormatError
from edge_agent.serving.capture import CaptureRing
from edge_agent.store.state import ModelState
from edge_agent.sync.deploy import Deployer
from edge_agent.sync.transfer_store import _BITMAP_MAGIC, _decode_bitmap
from edge_agent.wire.transfer import BlockPlan
from fleet_server.cli.root import _read as read_root_file
from fleet_server.delivery.desired import parse_document
from fleet_server.errors import ServerConfigError

HOSTILE = {
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "huge_int": b'{"schema_version": ' + b"9" * 5000 + b"}",
    "inf": b'{"schema_version": 1e400}',
    "nan": b'{"schema_version": NaN}',
    "duplicate": b'{"schema_version": 1, "schema_version": 2}',
    "surrogate": b'{"name": "\\ud800"}',
    "not_utf8": b'{"name": "\xff"}',
}


@pytest.mark.parametrize("data", HOSTILE.values(), ids=HOSTILE.keys())
def test_model_state_file(data: bytes) -> None:
    with pytest.raises(ContractError):
        ModelState.from_bytes(data)


@pytest.mark.parametrize("data", HOSTILE.values(), ids=HOSTILE.keys())
def test_download_bitmap_header(data: bytes) -> None:
    plan = BlockPlan(65536, hashlib.sha256(b"x").hexdigest(), 65536)
    header = data[:65535]
    blob = _BITMAP_MAGIC + len(header).to_bytes(2, "big") + header + b"\x00"
    with pytest.raises(ContractError):
        _decode_bitmap(plan, blob)


@pytest.mark.parametrize("data", HOSTILE.values(), ids=HOSTILE.keys())
def test_refused_bundles_file_is_ignored(tmp_path: Path, data: bytes) -> None:
    deployer: Any = Deployer(None, tmp_path, None, event=None, wake=lambda: None)  # type: ignore[arg-type]
    (tmp_path / "refused.json").write_bytes(data)
    deployer.load()  # logs and starts empty; never raises
    assert deployer._refused == {}


def test_capture_export_skips_hostile_lines(tmp_path: Path) -> None:
    good = b'{"model": "m", "ok": 1}\n'
    (tmp_path / "seg-000001.jsonl").write_bytes(
        b"".join(line + b"\n" for line in HOSTILE.values()) + good
    )
    if not CaptureRing.segments(tmp_path):
        pytest.fail("the segment name above no longer matches CaptureRing.segments")
    assert list(CaptureRing.export(tmp_path)) == [{"model": "m", "ok": 1}]


@pytest.mark.parametrize("data", HOSTILE.values(), ids=HOSTILE.keys())
def test_stored_desired_state(data: bytes) -> None:
    with pytest.raises(MetadataFormatError):
        parse_document(data)


@pytest.mark.parametrize("data", HOSTILE.values(), ids=HOSTILE.keys())
def test_operator_root_file(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "2.root.json"
    path.write_bytes(data)
    with pytest.raises(ServerConfigError) as info:
        read_root_file(path)
    assert str(tmp_path) not in str(info.value)
