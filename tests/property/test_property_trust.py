"""Properties: the trust-side parsers let only typed errors escape, whatever the bytes.

Each parser of untrusted bytes on the bundle and desired-state path gets random bytes, valid
documents with hostile edits (``hostile_json.mutated``) and byte-level corruption of valid
documents. The property: the parser returns, or raises its package's typed error family;
RecursionError, ValueError, OverflowError, python-tuf's SerializationError... never escape.
"""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hostile_json import (
    TOKENS,
    byte_mutated,
    every_token_everywhere,
    mutated,
    only_typed,
    render,
)
from hypothesis import given
from hypothesis import strategies as st

from edge_agent import strict_json
from edge_agent.bundle import read_bundle
from edge_agent.contract import BundleManifest
from edge_agent.errors import BundleVerificationError, ContractError, EdgefleetError
from edge_agent.trust import TrustedRoot, parse_metadata, verify_targets
from edge_agent.trust.assignment import ModelAssignment
from edge_agent.trust.desired import verify_desired_state
from fleet_server.delivery.desired import make_desired_state, sign_desired_state
from model_builder.keystore import KeyStore
from support import members

COMPAT = Path(__file__).parents[1] / "compat" / "v1-2026-11"
BUNDLE = (COMPAT / "digits-1.efb").read_bytes()
PARTS = members(BUNDLE)
ROOT_BYTES = (COMPAT / "root.json").read_bytes()
ROOT = TrustedRoot.from_bytes(ROOT_BYTES)
VERIFY_AT = datetime.fromisoformat(json.loads((COMPAT / "fixture.json").read_text())["verify_at"])
TARGETS = json.loads(PARTS["targets.json"])
MANIFEST = json.loads(PARTS["manifest.json"])
ROOT_DOC = json.loads(ROOT_BYTES)

NOW = datetime(2026, 6, 1, tzinfo=UTC)
DEVICE_ID = "cam-1"


def _desired() -> tuple[TrustedRoot, bytes]:
    keys = KeyStore.init(Path(tempfile.mkdtemp()) / "keys", now=NOW)
    assignment = ModelAssignment(
        version=3,
        channel="stable",
        bundle_sha256="a" * 64,
        bundle_length=1000,
        targets_sha256="b" * 64,
    )
    state = make_desired_state(DEVICE_ID, 5, {"digits": assignment}, NOW, timedelta(hours=1))
    return keys.trusted_root(), sign_desired_state(state, [keys.signer("online-1")])


DESIRED_ROOT, DESIRED = _desired()
DESIRED_DOC = json.loads(DESIRED)


def _strict(data: bytes) -> object:
    return strict_json.loads(data, max_bytes=1 << 20)


def _targets(data: bytes) -> object:
    return verify_targets(ROOT, data, now=VERIFY_AT)


def _manifest(data: bytes) -> object:
    return BundleManifest.from_bytes(data)


def _desired_state(data: bytes) -> object:
    return verify_desired_state(DESIRED_ROOT, data, now=NOW, device_id=DEVICE_ID, last_version=0)


def test_the_seeds_are_valid() -> None:
    """Every property starts from documents the parser accepts (or the edits prove nothing)."""
    assert _targets(PARTS["targets.json"])
    assert _manifest(PARTS["manifest.json"])
    assert parse_metadata(ROOT_BYTES, "root")
    assert _desired_state(DESIRED)
    assert _targets(render(TARGETS).encode())  # the renderer is faithful
    assert _desired_state(render(DESIRED_DOC).encode())


# ------------------------------------------------------------------------------ strict_json
@given(st.binary(max_size=512))
def test_strict_json_random_bytes(data: bytes) -> None:
    only_typed(_strict, data, ContractError)


@given(st.one_of(mutated(TARGETS), mutated(MANIFEST, edits=2), mutated([1, {"a": "b"}])))
def test_strict_json_mutated_documents(data: bytes) -> None:
    only_typed(_strict, data, ContractError)


_PLAIN = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20) + 1, 10**20 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@given(_PLAIN)
def test_strict_json_reads_what_json_writes(value: Any) -> None:
    """Within the limits (20-digit integers, depth 64) nothing valid is refused."""
    assert strict_json.loads(json.dumps(value).encode(), max_bytes=1 << 20) == value


@pytest.mark.parametrize("token", TOKENS)
def test_strict_json_every_hostile_token(token: str) -> None:
    only_typed(_strict, f'{{"a":[{token}]}}'.encode("utf-8", "surrogatepass"), ContractError)


# ------------------------------------------------------------------------- TUF metadata
@given(st.binary(max_size=512))
def test_targets_random_bytes(data: bytes) -> None:
    only_typed(_targets, data, BundleVerificationError)


@given(mutated(TARGETS))
def test_targets_mutated(data: bytes) -> None:
    only_typed(_targets, data, BundleVerificationError)


@given(byte_mutated(PARTS["targets.json"]))
def test_targets_byte_mutated(data: bytes) -> None:
    only_typed(_targets, data, BundleVerificationError)


@given(st.one_of(mutated(ROOT_DOC), byte_mutated(ROOT_BYTES)))
def test_root_mutated(data: bytes) -> None:
    only_typed(TrustedRoot.from_bytes, data, BundleVerificationError)
    only_typed(ROOT.update, data, BundleVerificationError)


def test_targets_every_token_at_every_field() -> None:
    for data in every_token_everywhere(TARGETS):
        only_typed(_targets, data, BundleVerificationError)
        only_typed(lambda d: parse_metadata(d, "targets"), data, BundleVerificationError)


def test_root_every_token_at_every_field() -> None:
    for data in every_token_everywhere(ROOT_DOC, max_paths=40):
        only_typed(TrustedRoot.from_bytes, data, BundleVerificationError)


# ------------------------------------------------------------------------------ manifest
@given(mutated(MANIFEST))
def test_manifest_mutated(data: bytes) -> None:
    only_typed(_manifest, data, ContractError)


@given(st.one_of(st.binary(max_size=256), byte_mutated(PARTS["manifest.json"])))
def test_manifest_bytes(data: bytes) -> None:
    only_typed(_manifest, data, ContractError)


# ------------------------------------------------------------------------- desired state
@given(st.one_of(mutated(DESIRED_DOC), byte_mutated(DESIRED), st.binary(max_size=256)))
def test_desired_state_mutated(data: bytes) -> None:
    only_typed(_desired_state, data, EdgefleetError)


def test_manifest_every_token_at_every_field() -> None:
    for data in every_token_everywhere(MANIFEST, max_paths=40):
        only_typed(_manifest, data, ContractError)


def test_desired_state_every_token_at_every_field() -> None:
    for data in every_token_everywhere(DESIRED_DOC):
        only_typed(_desired_state, data, EdgefleetError)


# ----------------------------------------------------------------------- whole bundles
@given(byte_mutated(BUNDLE))
def test_bundle_file_byte_mutated(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.getbasetemp() / "mutated.efb"
    path.write_bytes(data)

    def read(_: bytes) -> object:
        return read_bundle(path, ROOT, now=VERIFY_AT, installed_version=None, device=None)

    only_typed(read, data, EdgefleetError)
