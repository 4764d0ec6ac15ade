"""One test per attack on the signed desired-state document (what a device should run).

Every test first shows the honest document passing, then the attacked one failing with the
specific typed error, so each fails if its protection is removed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Metadata, Timestamp

from edge_agent.errors import (
    DigestMismatchError,
    ExpiredMetadataError,
    LengthMismatchError,
    MetadataFormatError,
    MixAndMatchError,
    RollbackError,
    SignatureThresholdError,
)
from edge_agent.ids import DEVICE_ID_PATTERN
from edge_agent.trust import TrustedRoot, verify_bundle
from edge_agent.trust.assignment import (
    ModelAssignment,
    check_assignment,
    check_bundle_identity,
    check_targets_digest,
)
from edge_agent.trust.desired import (
    DEVICE_ID_RE,
    MAX_DESIRED_STATE_BYTES,
    DesiredState,
    verify_desired_state,
)
from fleet_server.delivery.desired import make_desired_state, sign_desired_state
from model_builder.keystore import KeyStore
from support import DEVICE, NOW, make_bundle, members

DEVICE_ID = "cam-7"
SHA_A = "a" * 64
SHA_B = "b" * 64


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore.init(tmp_path / "k", now=NOW)


def _root(store: KeyStore) -> TrustedRoot:
    chain = store.root_chain()
    return TrustedRoot.from_chain(chain[0], chain[1:])


def _assignment(**kw: Any) -> ModelAssignment:
    fields: dict[str, Any] = {
        "version": 3,
        "channel": "stable",
        "bundle_sha256": SHA_A,
        "bundle_length": 1000,
        "targets_sha256": SHA_B,
    }
    fields.update(kw)
    return ModelAssignment(**fields)


def _state(
    version: int = 5, device_id: str = DEVICE_ID, ttl: timedelta = timedelta(hours=1)
) -> DesiredState:
    return make_desired_state(device_id, version, {"digits": _assignment()}, NOW, ttl)


def _verify(store: KeyStore, data: bytes, **kw: Any) -> DesiredState:
    kw.setdefault("now", NOW)
    kw.setdefault("device_id", DEVICE_ID)
    kw.setdefault("last_version", 4)
    return verify_desired_state(_root(store), data, **kw)


def _online(store: KeyStore, label: str = "online-1") -> CryptoSigner:
    return store.signer(label)


def _sign_raw(signed: Any, signers: Sequence[Signer]) -> bytes:
    """Envelope around an arbitrary ``signed`` value, honestly signed (an insider's tool)."""
    payload = str(encode_canonical(signed)).encode()
    sigs = [s.sign(payload) for s in signers]
    return json.dumps(
        {"signed": signed, "signatures": [{"keyid": s.keyid, "sig": s.signature} for s in sigs]}
    ).encode()


# ------------------------------------------------------------------------------- honest path
def test_valid_document_is_accepted_and_round_trips(store: KeyStore) -> None:
    state = _state()
    data = sign_desired_state(state, [_online(store)])
    verified = _verify(store, data)
    assert verified == state
    assert hash(verified) == hash(state)
    assert verified.models["digits"].bundle_length == 1000
    assert verified.expires == NOW + timedelta(hours=1)
    assert DesiredState.from_dict(state.to_dict()) == state
    assert json.loads(data)["signed"] == state.to_dict()
    assert _verify(store, data, last_version=0) == state  # first document ever


def test_value_objects_are_immutable() -> None:
    state = _state()
    with pytest.raises(AttributeError):
        state.version = 9  # type: ignore[misc]
    with pytest.raises(TypeError):
        state.models["other"] = _assignment()  # type: ignore[index]


def test_device_id_rule_matches_identity_module() -> None:
    assert DEVICE_ID_RE.pattern == DEVICE_ID_PATTERN.pattern


# ------------------------------------------------------------------------------ wrong signers
@pytest.mark.parametrize("label", ["targets-1", "root-1"])
def test_offline_keys_cannot_sign_desired_state(store: KeyStore, label: str) -> None:
    state = _state()
    assert _verify(store, sign_desired_state(state, [_online(store)])) == state
    with pytest.raises(SignatureThresholdError):
        _verify(store, sign_desired_state(state, [store.signer(label)]))


def test_unknown_key_is_refused(store: KeyStore) -> None:
    state = _state()
    assert _verify(store, sign_desired_state(state, [_online(store)])) == state
    with pytest.raises(SignatureThresholdError):
        _verify(store, sign_desired_state(state, [CryptoSigner.generate_ed25519()]))


def test_unknown_key_claiming_the_online_keyid_is_refused(store: KeyStore) -> None:
    state = _state()
    honest = json.loads(sign_desired_state(state, [_online(store)]))
    forged_sig = CryptoSigner.generate_ed25519().sign(state.signed_bytes()).signature
    honest["signatures"][0]["sig"] = forged_sig
    with pytest.raises(SignatureThresholdError):
        _verify(store, json.dumps(honest).encode())


def test_unsigned_document_is_refused(store: KeyStore) -> None:
    state = _state()
    with pytest.raises(SignatureThresholdError):
        _verify(store, _sign_raw(state.to_dict(), []))


def test_rotated_out_online_key_is_refused(store: KeyStore) -> None:
    state = _state()
    old = _online(store)
    assert _verify(store, sign_desired_state(state, [old])) == state
    store.rotate("timestamp", now=NOW, add=1)
    new_label = next(k.label for k in store.list_keys() if k.label.startswith("timestamp-"))
    store.revoke(old.public_key.keyid, now=NOW)
    with pytest.raises(SignatureThresholdError):
        _verify(store, sign_desired_state(state, [old]))
    assert _verify(store, sign_desired_state(state, [store.signer(new_label)])) == state


# ------------------------------------------------------------------------------- threshold
def test_online_threshold_two_needs_two_signatures(tmp_path: Path) -> None:
    store = KeyStore.init(tmp_path / "k", now=NOW, online_keys=2)
    store.rotate("timestamp", now=NOW, threshold=2)
    assert _root(store).threshold("timestamp") == 2
    state = _state()
    both = [_online(store, "online-1"), _online(store, "online-2")]
    assert _verify(store, sign_desired_state(state, both)) == state
    with pytest.raises(SignatureThresholdError):
        _verify(store, sign_desired_state(state, both[:1]))
    with pytest.raises(SignatureThresholdError):
        _verify(store, sign_desired_state(state, [both[0], store.signer("targets-1")]))


def test_one_key_signing_twice_does_not_reach_threshold_two(tmp_path: Path) -> None:
    store = KeyStore.init(tmp_path / "k", now=NOW, online_keys=2)
    store.rotate("timestamp", now=NOW, threshold=2)
    one = _online(store, "online-1")
    with pytest.raises(MetadataFormatError):
        sign_desired_state(_state(), [one, one])
    with pytest.raises(MetadataFormatError):
        _verify(store, _sign_raw(_state().to_dict(), [one, one]))


# ---------------------------------------------------------------------------------- freeze
def test_expired_document_is_refused(store: KeyStore) -> None:
    state = _state(ttl=timedelta(minutes=10))
    data = sign_desired_state(state, [_online(store)])
    assert _verify(store, data, now=NOW + timedelta(minutes=10) - timedelta(seconds=1)) == state
    with pytest.raises(ExpiredMetadataError):
        _verify(store, data, now=NOW + timedelta(minutes=10))
    with pytest.raises(ExpiredMetadataError):
        _verify(store, data, now=NOW + timedelta(days=30))


def test_expired_root_is_refused(store: KeyStore) -> None:
    later = NOW + timedelta(days=400)
    state = make_desired_state(DEVICE_ID, 5, {}, later, timedelta(hours=1))
    data = sign_desired_state(state, [_online(store)])
    assert _verify(store, data, now=later - timedelta(days=40)) == state
    with pytest.raises(ExpiredMetadataError):
        _verify(store, data, now=later)


# ------------------------------------------------------------------------- replay / rollback
def test_replayed_document_is_refused(store: KeyStore) -> None:
    data = sign_desired_state(_state(version=5), [_online(store)])
    assert _verify(store, data, last_version=4).version == 5
    with pytest.raises(RollbackError):
        _verify(store, data, last_version=5)


def test_older_document_is_refused(store: KeyStore) -> None:
    data = sign_desired_state(_state(version=5), [_online(store)])
    assert _verify(store, data, last_version=4).version == 5
    with pytest.raises(RollbackError):
        _verify(store, data, last_version=9)


# --------------------------------------------------------------------------- wrong device
def test_document_for_another_device_is_refused(store: KeyStore) -> None:
    data = sign_desired_state(_state(device_id="cam-8"), [_online(store)])
    assert _verify(store, data, device_id="cam-8").device_id == "cam-8"
    with pytest.raises(MixAndMatchError):
        _verify(store, data, device_id=DEVICE_ID)


# ------------------------------------------------------------------------------- tampering
@pytest.mark.parametrize(
    "tamper",
    [
        lambda s: s["models"]["digits"].update(bundle_sha256="c" * 64),
        lambda s: s["models"]["digits"].update(bundle_length=10**9),
        lambda s: s["models"]["digits"].update(version=1),
        lambda s: s.update(version=99),
        lambda s: s.update(expires="2030-01-01T00:00:00Z"),
        lambda s: s.update(device_id="cam-8"),
        lambda s: s["models"].pop("digits"),
    ],
    ids=["sha", "length", "model-version", "version", "expires", "device", "drop-model"],
)
def test_tampered_after_signing_is_refused(
    store: KeyStore, tamper: Callable[[dict[str, Any]], object]
) -> None:
    doc = json.loads(sign_desired_state(_state(), [_online(store)]))
    assert _verify(store, json.dumps(doc).encode(), device_id=doc["signed"]["device_id"])
    tamper(doc["signed"])
    with pytest.raises(SignatureThresholdError):
        _verify(store, json.dumps(doc).encode(), device_id=doc["signed"]["device_id"])


# ------------------------------------------------------------------------------- malformed
def _signed(**changes: Any) -> dict[str, Any]:
    d = _state().to_dict()
    d.update(changes)
    return d


def _model(**changes: Any) -> dict[str, Any]:
    d = _state().to_dict()
    d["models"]["digits"].update(changes)
    return d


MALFORMED_SIGNED: dict[str, Any] = {
    "array": [1, 2],
    "wrong-type": _signed(_type="timestamp"),
    "missing-field": {k: v for k, v in _signed().items() if k != "expires"},
    "extra-field": _signed(group="all"),
    "schema-version": _signed(schema_version=2),
    "version-string": _signed(version="5"),
    "version-bool": _signed(version=True),
    "version-zero": _signed(version=0),
    "device-id": _signed(device_id="CAM 7"),
    "expires-format": _signed(expires="2026-06-01 01:00:00"),
    "expires-int": _signed(expires=1780000000),
    "models-list": _signed(models=[]),
    "model-name": _signed(models={"Digits/..": _assignment().to_dict()}),
    "sha-short": _model(bundle_sha256="ab"),
    "sha-upper": _model(targets_sha256="A" * 64),
    "length-zero": _model(bundle_length=0),
    "length-negative": _model(bundle_length=-5),
    "channel": _model(channel=""),
    "assignment-extra": _model(url="http://evil"),
}


@pytest.mark.parametrize("signed", MALFORMED_SIGNED.values(), ids=MALFORMED_SIGNED.keys())
def test_malformed_signed_fields_are_refused_even_with_a_valid_signature(
    store: KeyStore, signed: Any
) -> None:
    assert _verify(store, _sign_raw(_state().to_dict(), [_online(store)]))
    with pytest.raises(MetadataFormatError):
        _verify(store, _sign_raw(signed, [_online(store)]))


def _envelope(store: KeyStore) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(sign_desired_state(_state(), [_online(store)]))
    return loaded


MALFORMED_RAW: dict[str, Callable[[KeyStore], bytes]] = {
    "not-json": lambda st: b"{not json",
    "not-utf8": lambda st: b'{"signed": "\xff"}',
    "empty": lambda st: b"",
    "null": lambda st: b"null",
    "float": lambda st: sign_desired_state(_state(), [_online(st)]).replace(
        b'"version":5', b'"version":5.0'
    ),
    "nan": lambda st: sign_desired_state(_state(), [_online(st)]).replace(
        b'"version":5', b'"version":NaN'
    ),
    "duplicate-key": lambda st: sign_desired_state(_state(), [_online(st)]).replace(
        b'"version":5', b'"version":5,"version":6'
    ),
    "oversized": lambda st: b" " * (MAX_DESIRED_STATE_BYTES + 1),
    "no-signatures-field": lambda st: json.dumps({"signed": _state().to_dict()}).encode(),
    "signatures-not-list": lambda st: json.dumps(
        {"signed": _state().to_dict(), "signatures": {}}
    ).encode(),
    "sig-not-hex": lambda st: json.dumps(
        {**_envelope(st), "signatures": [{"keyid": "ab", "sig": "zz"}]}
    ).encode(),
    "sig-extra-field": lambda st: json.dumps(
        {**_envelope(st), "signatures": [{**_envelope(st)["signatures"][0], "x": 1}]}
    ).encode(),
}


@pytest.mark.parametrize("make", MALFORMED_RAW.values(), ids=MALFORMED_RAW.keys())
def test_malformed_bytes_are_refused(store: KeyStore, make: Callable[[KeyStore], bytes]) -> None:
    assert _verify(store, sign_desired_state(_state(), [_online(store)]))
    with pytest.raises(MetadataFormatError):
        _verify(store, make(store))


def test_tuf_timestamp_metadata_signed_by_online_key_is_not_a_desired_state(
    store: KeyStore,
) -> None:
    """Type confusion: the online key also signs TUF timestamp metadata; it must not pass."""
    md = Metadata(Timestamp(version=5, expires=NOW + timedelta(hours=1)))
    md.sign(_online(store))
    with pytest.raises(MetadataFormatError):
        _verify(store, bytes(md.to_bytes()))


def test_bad_signature_bytes_from_trusted_key_are_refused(store: KeyStore) -> None:
    doc = _envelope(store)
    doc["signatures"][0]["sig"] = "00"
    with pytest.raises(SignatureThresholdError):
        _verify(store, json.dumps(doc).encode())


def test_builder_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        make_desired_state(DEVICE_ID, 1, {}, NOW, timedelta(0))
    with pytest.raises(ValueError):
        make_desired_state(DEVICE_ID, 1, {}, NOW.replace(tzinfo=None), timedelta(hours=1))
    with pytest.raises(MetadataFormatError):
        make_desired_state("Bad Id", 1, {}, NOW, timedelta(hours=1))
    with pytest.raises(ValueError):
        sign_desired_state(_state(), [])
    with pytest.raises(MetadataFormatError):
        _assignment(bundle_length=True)
    odd = make_desired_state(DEVICE_ID, 1, {}, NOW + timedelta(microseconds=7), timedelta(hours=1))
    assert odd.expires.microsecond == 0


# ------------------------------------------------------------------ the downloaded bundle
def _bundle_assignment(bundle: bytes, **kw: Any) -> ModelAssignment:
    fields: dict[str, Any] = {
        "version": 1,
        "channel": "stable",
        "bundle_sha256": hashlib.sha256(bundle).hexdigest(),
        "bundle_length": len(bundle),
        "targets_sha256": hashlib.sha256(members(bundle)["targets.json"]).hexdigest(),
    }
    fields.update(kw)
    return ModelAssignment(**fields)


def test_check_assignment_length_and_digest(store: KeyStore) -> None:
    bundle = make_bundle(store)
    a = _bundle_assignment(bundle)
    check_assignment(a, len(bundle), hashlib.sha256(bundle).hexdigest())
    with pytest.raises(LengthMismatchError):
        check_assignment(a, len(bundle) + 1, hashlib.sha256(bundle + b"x").hexdigest())
    with pytest.raises(LengthMismatchError):
        check_assignment(a, len(bundle) - 1, hashlib.sha256(bundle[:-1]).hexdigest())
    other = bytearray(bundle)
    other[-1] ^= 1
    with pytest.raises(DigestMismatchError):
        check_assignment(a, len(other), hashlib.sha256(bytes(other)).hexdigest())


def test_targets_digest_and_identity_checks(store: KeyStore) -> None:
    bundle = make_bundle(store)
    parts = list(members(bundle).values())
    a = _bundle_assignment(bundle)
    check_targets_digest(a, parts[0])
    with pytest.raises(DigestMismatchError):
        check_targets_digest(a, parts[0] + b" ")
    verified = verify_bundle(
        _root(store), *parts, now=NOW, installed_version=None, device=DEVICE,
        expected_name="digits", expected_channel="stable",
    )  # fmt: skip
    check_bundle_identity("digits", a, verified.manifest)
    with pytest.raises(MixAndMatchError):
        check_bundle_identity("other", a, verified.manifest)
    with pytest.raises(MixAndMatchError):
        check_bundle_identity("digits", _bundle_assignment(bundle, version=2), verified.manifest)
    with pytest.raises(MixAndMatchError):
        check_bundle_identity(
            "digits", _bundle_assignment(bundle, channel="beta"), verified.manifest
        )


def test_compromised_server_cannot_install_unsigned_or_older_model(
    store: KeyStore, tmp_path: Path
) -> None:
    """The online key's assignment passes, but the builder check still refuses the bundle."""
    root = _root(store)
    rogue = KeyStore.init(tmp_path / "rogue", now=NOW)  # builder keys the device never trusted
    for bundle, installed, error in (
        (make_bundle(rogue), None, SignatureThresholdError),
        (make_bundle(store, version=1), 2, RollbackError),
    ):
        a = _bundle_assignment(bundle)
        doc = sign_desired_state(
            make_desired_state(DEVICE_ID, 5, {"digits": a}, NOW, timedelta(hours=1)),
            [_online(store)],
        )
        state = _verify(store, doc)  # the server's document itself is genuine
        check_assignment(state.models["digits"], len(bundle), hashlib.sha256(bundle).hexdigest())
        with pytest.raises(error):
            verify_bundle(
                root, *members(bundle).values(), now=NOW, installed_version=installed,
                device=DEVICE, expected_name="digits", expected_channel="stable",
            )  # fmt: skip


def test_wrong_type_field_is_named_in_the_error(store: KeyStore) -> None:
    with pytest.raises(MetadataFormatError, match="expected desired-state"):
        _verify(store, _sign_raw(_signed(_type="timestamp"), [_online(store)]))
