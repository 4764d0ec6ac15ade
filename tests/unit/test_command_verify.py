"""One test per attack on a signed remote command, and the parser against hostile bytes.

Every table first shows the honest command passing, then each attacked one failing with its
specific typed error, so each row fails if its protection is removed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.errors import (
    CommandArgumentError,
    ContractError,
    EdgefleetError,
    ExpiredMetadataError,
    MetadataFormatError,
    MixAndMatchError,
    RollbackError,
    SignatureThresholdError,
    UnknownCommandError,
)
from edge_agent.trust import TrustedRoot
from edge_agent.trust.command import (
    MAX_COMMAND_BYTES,
    HealthCheckArgs,
    LogsArgs,
    NoArgs,
    SignedCommand,
    SupportBundleArgs,
    encode_command,
    parse_arguments,
    verify_command,
)
from edge_agent.wire.ops.diagnostics import MAX_ANSWER_BYTES, CommandAnswer, UploadOffer
from fleet_server.diagnostics.commands import make_command, sign_command
from model_builder.keystore import KeyStore
from support import NOW

DEVICE = "cam-7"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyStore:
    return KeyStore.init(tmp_path_factory.mktemp("cmdkeys") / "k", now=NOW)


@pytest.fixture(scope="module")
def root(keys: KeyStore) -> TrustedRoot:
    chain = keys.root_chain()
    return TrustedRoot.from_chain(chain[0], chain[1:])


def _signed(keys: KeyStore, label: str = "online-1", **kw: Any) -> bytes:
    fields: dict[str, Any] = {"device_id": DEVICE, "sequence": 5, "name": "ping", "args": {}}
    fields.update(kw)
    command = make_command(
        fields["device_id"], fields["sequence"], fields["name"], fields["args"], NOW
    )
    return sign_command(command, [keys.signer(label)])


def _verify(root: TrustedRoot, data: bytes, *, last: int = 4, at: timedelta = timedelta(0)) -> Any:
    return verify_command(root, data, now=NOW + at, device_id=DEVICE, last_sequence=last)


def test_the_honest_command_passes(keys: KeyStore, root: TrustedRoot) -> None:
    command = _verify(root, _signed(keys))
    assert command.sequence == 5
    assert command.arguments() == NoArgs()


def _tampered(keys: KeyStore) -> bytes:
    doc = json.loads(_signed(keys))
    doc["signed"]["name"] = "restart"
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


ATTACKS: list[tuple[str, Callable[[KeyStore], bytes], dict[str, Any], type[Exception]]] = [
    ("signed by a builder key", lambda k: _signed(k, "targets-1"), {}, SignatureThresholdError),
    ("signed by a root key", lambda k: _signed(k, "root-1"), {}, SignatureThresholdError),
    ("tampered after signing", _tampered, {}, SignatureThresholdError),
    ("replayed (same sequence)", _signed, {"last": 5}, RollbackError),
    ("older sequence", _signed, {"last": 9}, RollbackError),
    ("another device", lambda k: _signed(k, device_id="cam-8"), {}, MixAndMatchError),
    ("expired", _signed, {"at": timedelta(hours=2)}, ExpiredMetadataError),
    ("issued in the future", _signed, {"at": -timedelta(hours=1)}, ExpiredMetadataError),
]


@pytest.mark.parametrize(("what", "make", "kw", "error"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attacks_are_refused_with_their_error(
    keys: KeyStore,
    root: TrustedRoot,
    what: str,
    make: Callable[[KeyStore], bytes],
    kw: dict[str, Any],
    error: type[Exception],
) -> None:
    with pytest.raises(error):
        _verify(root, make(keys), **kw)


def test_an_unknown_name_verifies_but_is_refused_before_it_runs(
    keys: KeyStore, root: TrustedRoot
) -> None:
    start = NOW.replace(microsecond=0)
    shell = SignedCommand("ab" * 16, DEVICE, 6, "shell", {"cmd": "id"}, start, start + timedelta(1))
    data = encode_command(shell, [keys.signer("online-1").sign(shell.signed_bytes())])
    command = _verify(root, data)  # authentic and fresh: its sequence is consumed
    with pytest.raises(UnknownCommandError):
        command.arguments()


ARGS: list[tuple[str, Any, Any]] = [
    ("logs", {"level": "info", "since": 0, "max_lines": 10, "max_bytes": 4096}, LogsArgs),
    ("logs", {"level": "trace", "since": 0, "max_lines": 10, "max_bytes": 4096}, None),
    ("logs", {"level": "info", "since": -1, "max_lines": 10, "max_bytes": 4096}, None),
    ("logs", {"level": "info", "since": 0, "max_lines": 10**6, "max_bytes": 4096}, None),
    ("logs", {"level": "info", "since": 0, "max_lines": True, "max_bytes": 4096}, None),
    ("logs", {"level": "info", "since": 0, "max_lines": 10, "max_bytes": 10**9}, None),
    ("logs", {"level": "info", "since": 0, "max_lines": 10}, None),
    ("support-bundle", {"max_bytes": 1 << 20}, SupportBundleArgs),
    ("support-bundle", {"max_bytes": 1 << 30}, None),
    ("support-bundle", {"max_bytes": "1"}, None),
    ("health-check", {"model": "digits"}, HealthCheckArgs),
    ("health-check", {"model": "../etc"}, None),
    ("health-check", {"model": "digits", "path": "/bin/sh"}, None),
    ("restart", {}, NoArgs),
    ("restart", {"delay": 1}, None),
    ("ping", [], None),
]


@pytest.mark.parametrize(("name", "args", "expected"), ARGS)
def test_arguments_are_typed_and_bounded(name: str, args: Any, expected: Any) -> None:
    if expected is None:
        with pytest.raises(CommandArgumentError):
            parse_arguments(name, args)
    else:
        assert isinstance(parse_arguments(name, args), expected)


@pytest.mark.parametrize("name", ["sh", "bash -c id", "", "PING", "ping\n"])
def test_names_off_the_list_are_unknown(name: str) -> None:
    with pytest.raises(UnknownCommandError):
        parse_arguments(name, {})


def _mutate(keys: KeyStore, change: Callable[[dict[str, Any]], None]) -> bytes:
    doc = json.loads(_signed(keys))
    change(doc)
    return json.dumps(doc).encode()


GARBLED: list[tuple[str, Callable[[KeyStore], bytes]]] = [
    ("not json", lambda k: b"{not json"),
    ("oversized", lambda k: b" " * (MAX_COMMAND_BYTES + 1)),
    ("a list", lambda k: b"[]"),
    ("extra envelope field", lambda k: _mutate(k, lambda d: d.update(x=1))),
    ("extra signed field", lambda k: _mutate(k, lambda d: d["signed"].update(x=1))),
    ("wrong type", lambda k: _mutate(k, lambda d: d["signed"].update(_type="desired-state"))),
    ("float sequence", lambda k: _mutate(k, lambda d: d["signed"].update(sequence=5.0))),
    ("bool sequence", lambda k: _mutate(k, lambda d: d["signed"].update(sequence=True))),
    ("bad command id", lambda k: _mutate(k, lambda d: d["signed"].update(command_id="x"))),
    ("bad expiry", lambda k: _mutate(k, lambda d: d["signed"].update(expires="soon"))),
    (
        "ttl too long",
        lambda k: _mutate(k, lambda d: d["signed"].update(expires="2099-01-01T00:00:00Z")),
    ),
    (
        "duplicate signature",
        lambda k: _mutate(k, lambda d: d["signatures"].append(d["signatures"][0])),
    ),
    ("signature not hex", lambda k: _mutate(k, lambda d: d["signatures"][0].update(sig="zz"))),
]


@pytest.mark.parametrize(("what", "make"), GARBLED, ids=[g[0] for g in GARBLED])
def test_garbled_commands_are_format_errors(
    keys: KeyStore, root: TrustedRoot, what: str, make: Callable[[KeyStore], bytes]
) -> None:
    with pytest.raises(MetadataFormatError):
        _verify(root, make(keys))


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_only_raise_format_errors(root: TrustedRoot, data: bytes) -> None:
    with pytest.raises(MetadataFormatError):
        _verify(root, data)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from(
        ["command_id", "device_id", "sequence", "name", "args", "issued", "expires", "_type"]
    ),
    value=_JSON,
)
def test_any_field_replaced_never_passes_unless_it_is_the_same(
    keys: KeyStore, root: TrustedRoot, field: str, value: Any
) -> None:
    doc = json.loads(_signed(keys))
    same = doc["signed"][field] == value and type(doc["signed"][field]) is type(value)
    doc["signed"][field] = value
    data = json.dumps(doc).encode()
    if same:
        return
    with pytest.raises(EdgefleetError) as info:
        _verify(root, data)
    assert isinstance(info.value, MetadataFormatError | SignatureThresholdError)


@settings(max_examples=300)
@given(st.binary(max_size=1024) | _JSON.map(lambda v: json.dumps(v).encode()))
def test_answers_from_devices_parse_or_raise_contract_errors(data: bytes) -> None:
    try:
        answer = CommandAnswer.from_bytes(data)
    except ContractError:
        return  # the one error family a device's garbage may raise (anything else fails)
    assert CommandAnswer.from_bytes(answer.to_bytes()) == answer


def test_answers_round_trip_and_are_bounded() -> None:
    ok = CommandAnswer(DEVICE, "ab" * 16, "logs", True, {"records": []})
    assert CommandAnswer.from_bytes(ok.to_bytes()) == ok
    no = CommandAnswer.refusal(DEVICE, None, None, "rollback", "x" * 10_000)
    assert no.error is not None
    assert len(no.error) == 500
    with pytest.raises(EdgefleetError):
        CommandAnswer(DEVICE, None, None, True, {"big": "x" * MAX_ANSWER_BYTES}).to_bytes()
    with pytest.raises(EdgefleetError):
        CommandAnswer.from_bytes(b" " * (MAX_ANSWER_BYTES + 1))
    offer = UploadOffer(1000, "a" * 64, 64 * 1024)
    assert UploadOffer.from_dict(offer.to_dict()) == offer
    with pytest.raises(EdgefleetError):
        UploadOffer.from_dict({**offer.to_dict(), "transfer_id": "0" * 32})
    with pytest.raises(EdgefleetError):
        UploadOffer(1 << 30, "a" * 64, 64 * 1024)


def test_the_server_refuses_to_sign_what_a_device_would_refuse(tmp_path: Path) -> None:
    with pytest.raises(UnknownCommandError):
        make_command(DEVICE, 1, "shell", {}, NOW)
    with pytest.raises(CommandArgumentError):
        make_command(DEVICE, 1, "logs", {"max_lines": 0}, NOW)
    with pytest.raises(ValueError, match="ttl"):
        make_command(DEVICE, 1, "ping", {}, NOW, ttl=timedelta(days=30))


def _schema(name: str) -> dict[str, Any]:
    text = resources.files("edge_agent").joinpath(f"schemas/{name}.schema.json").read_text()
    schema = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(schema)
    return dict(schema)


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("ping", {}),
        ("logs", {"level": "error"}),
        ("support-bundle", {}),
        ("restart", {}),
        ("health-check", {"model": "digits"}),
    ],
)
def test_signed_commands_match_their_schema(
    keys: KeyStore, name: str, args: dict[str, Any]
) -> None:
    schema = _schema("command")
    data = json.loads(_signed(keys, name=name, args=args))
    jsonschema.validate(data, schema)
    data["signed"]["args"]["extra"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema)


def test_answers_match_their_schema() -> None:
    schema = _schema("command-answer")
    offer = UploadOffer(1000, "a" * 64, 64 * 1024).to_dict()
    for answer in (
        CommandAnswer(DEVICE, "ab" * 16, "support-bundle", True, offer),
        CommandAnswer.refusal(DEVICE, None, None, "metadata_malformed", "not JSON"),
    ):
        jsonschema.validate(json.loads(answer.to_bytes()), schema)
    bad = json.loads(CommandAnswer.refusal(DEVICE, None, None, "rollback", "old").to_bytes())
    bad["ok"] = True
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
