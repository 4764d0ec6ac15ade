"""Every validator of untrusted identifiers refuses hostile spellings of a valid value.

``re.match`` with a ``$``-terminated pattern accepts ``'digits\\n'`` (``$`` matches before a
trailing newline); the validators ``fullmatch`` instead. The table feeds each validator its
valid value (accepted, so the row can fail) and that value with a trailing ``\\n``/``\\r``/
``\\r\\n``, a NUL, a leading or trailing space, a unicode lookalike and an over-long value, and
expects the validator's own typed error. ``test_no_dollar_pattern_is_matched_partially`` keeps
the class from coming back: no module in ``src`` calls ``.match``/``.search`` with a pattern
that ends in ``$``.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edge_agent.contract import ArtifactRef
from edge_agent.contract.cpu import validate_requirements
from edge_agent.contract.manifest import validate_model_name
from edge_agent.errors import ContractError, IdentityError, MetadataFormatError
from edge_agent.ids import NAME_PATTERN, is_valid_name, validate_device_id, validate_name
from edge_agent.trust.assignment import ModelAssignment
from edge_agent.trust.desired import NAME_RE, DesiredState
from edge_agent.wire.fields import as_label
from edge_agent.wire.topics import MAX_PREFIX_LENGTH, Topics
from edge_agent.wire.transfer import BlockPlan
from fleet_server.config import GatewayConfig
from fleet_server.drift.service import FleetDriftError, parse_duration
from fleet_server.errors import BrokerConfigError, PkiError, ServerConfigError
from fleet_server.pki.broker_config import BrokerConfig
from fleet_server.pki.certs import validate_consumer_name, validate_server_name
from support import make_manifest

SRC = Path(__file__).resolve().parents[2] / "src"
H = "ab" * 32  # a valid lowercase hex SHA-256
T = Topics()
EXPIRES = datetime(2030, 1, 1, tzinfo=UTC)
MANIFEST = make_manifest(b"model-bytes")


def _assignment(**kw: object) -> ModelAssignment:
    fields: dict[str, object] = {
        "version": 1,
        "channel": "stable",
        "bundle_sha256": H,
        "bundle_length": 10,
        "targets_sha256": H,
    }
    return ModelAssignment(**{**fields, **kw})  # type: ignore[arg-type]


# (row id, valid value, the validator, its typed error, a unicode lookalike, an over-long value)
Row = tuple[str, str, Callable[[str], object], type[Exception], str, str]
ROWS: list[Row] = [
    ("device id", "dev-1", validate_device_id, IdentityError, "dev-\u0031\u0338", "a" * 64),
    ("ids name", "digits", validate_name, ContractError, "d\u0456gits", "a" * 64),
    ("model name", "digits", validate_model_name, ContractError, "digit\u0455", "a" * 64),
    (
        "manifest channel",
        "stable",
        lambda v: dataclasses.replace(MANIFEST, channel=v),
        ContractError,
        "st\u0430ble",
        "s" * 64,
    ),
    (
        "manifest name",
        "digits",
        lambda v: dataclasses.replace(MANIFEST, name=v),
        ContractError,
        "\uff44igits",
        "d" * 64,
    ),
    (
        "artifact sha256",
        H,
        lambda v: ArtifactRef(path="model.onnx", format="onnx", sha256=v, length=1),
        ContractError,
        "\u0430" + H[1:],
        H + "a",
    ),
    (
        "min runtime version",
        "1.16",
        lambda v: dataclasses.replace(MANIFEST.compatibility, min_runtime_version=v),
        ContractError,
        "1.\u0661\u0666",
        "1." * 2000 + "1",
    ),
    (
        "cpu feature",
        "avx2",
        lambda v: validate_requirements([v]),
        ContractError,
        "\u0430vx2",
        "a" * 33,
    ),
    (
        "desired channel",
        "stable",
        lambda v: _assignment(channel=v),
        MetadataFormatError,
        "st\u0430ble",
        "s" * 64,
    ),
    (
        "desired bundle sha256",
        H,
        lambda v: _assignment(bundle_sha256=v),
        MetadataFormatError,
        H[:-1] + "\u0430",
        H + "ab",
    ),
    (
        "desired device id",
        "dev-1",
        lambda v: DesiredState(device_id=v, version=1, expires=EXPIRES),
        MetadataFormatError,
        "d\u0435v-1",
        "d" * 64,
    ),
    (
        "desired model name",
        "digits",
        lambda v: DesiredState(
            device_id="d", version=1, expires=EXPIRES, models={v: _assignment()}
        ),
        MetadataFormatError,
        "digit\u0455",
        "d" * 64,
    ),
    (
        "topic prefix",
        "acme/plant-1",
        Topics.check_prefix,
        ContractError,
        "\u0430cme/plant-1",
        "a" * (MAX_PREFIX_LENGTH + 1),
    ),
    ("wave id", "wave-3", T.broadcast, ContractError, "w\u0430ve-3", "w" * 129),
    (
        "correlation id",
        "c0ffee",
        lambda v: T.fallback_resp("dev-1", v),
        ContractError,
        "c0ff\u0435e",
        "c" * 129,
    ),
    (
        "share group",
        "fleet",
        lambda v: T.shared(v, "telemetry"),
        ContractError,
        "fl\u0435et",
        "g" * 129,
    ),
    (
        "topic",
        "edgefleet/devices/dev-1/telemetry",
        T.parse_ref,
        ContractError,
        "edgefleet/devices/dev-1/t\u0435lemetry",
        "edgefleet/devices/dev-1/" + "t" * 600,
    ),
    (
        "transfer sha256",
        H,
        lambda v: BlockPlan(length=1, sha256=v),
        ContractError,
        H[:-1] + "\u0430",
        H + "a",
    ),
    (
        "wire label",
        "model-a",
        lambda v: as_label(v, "label"),
        ContractError,
        "model-\u0430",
        "m" * 129,
    ),
    (
        "server name",
        "fleet.server",
        validate_server_name,
        PkiError,
        "fl\u0435et.server",
        "f" * 57 + ".server",
    ),
    (
        "consumer name",
        "dash.consumer",
        validate_consumer_name,
        PkiError,
        "d\u0430sh.consumer",
        "d" * 55 + ".consumer",
    ),
    (
        "gateway prefix",
        "acme/plant-1",
        lambda v: GatewayConfig(prefix=v).validate(),
        ServerConfigError,
        "acme/pl\u0430nt-1",
        "a" * (MAX_PREFIX_LENGTH + 1),
    ),
    (
        "gateway share group",
        "fleet",
        lambda v: GatewayConfig(share_group=v).validate(),
        ServerConfigError,
        "fl\u0435et",
        "g" * 129,
    ),
    (
        "broker prefix",
        "acme/plant-1",
        lambda v: BrokerConfig(prefix=v).validate(),
        BrokerConfigError,
        "\u0430cme",
        "a" * (MAX_PREFIX_LENGTH + 1),
    ),
    (
        "broker host",
        "127.0.0.1",
        lambda v: BrokerConfig(host=v).validate(),
        BrokerConfigError,
        "127.0.0.\u0661",
        "h" * 254,
    ),
    (
        "broker user",
        "mosquitto",
        lambda v: BrokerConfig(run_as_user=v).validate(),
        BrokerConfigError,
        "m\u043esquitto",
        "u" * 33,
    ),
]


def _hostile(valid: str, lookalike: str, long: str) -> list[str]:
    return [
        valid + "\n",
        valid + "\r",
        valid + "\r\n",
        valid + "\x00",
        "\x00" + valid,
        valid + "\u2028",
        lookalike,
        long,
        "",
        " " + valid,
        valid + " ",
    ]


CASES = [
    pytest.param(check, error, value, id=f"{rid}-{i}")
    for rid, valid, check, error, lookalike, long in ROWS
    for i, value in enumerate(_hostile(valid, lookalike, long))
]


@pytest.mark.parametrize(("rid", "valid", "check"), [(r[0], r[1], r[2]) for r in ROWS])
def test_the_valid_value_is_accepted(rid: str, valid: str, check: Callable[[str], object]) -> None:
    check(valid)  # raises if the row's baseline is wrong


@pytest.mark.parametrize(("check", "error", "value"), CASES)
def test_hostile_spellings_raise_the_typed_error(
    check: Callable[[str], object], error: type[Exception], value: str
) -> None:
    with pytest.raises(error):
        check(value)


def test_the_reported_bug_digits_newline() -> None:
    """The review's case: the manifest accepted what the desired state refused."""
    with pytest.raises(ContractError):
        validate_model_name("digits\n")
    assert not is_valid_name("digits\n")
    assert NAME_RE is NAME_PATTERN  # desired state and manifest: one rule (edge_agent.ids)


# --------------------------------------------------------------------- the class stays gone
def _dollar_patterns(tree: ast.Module) -> set[str]:
    """Names bound at module level to ``re.compile('...$')``."""
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Call):
            call = node.value
            if (
                isinstance(call.func, ast.Attribute)
                and call.func.attr == "compile"
                and call.args
                and isinstance(call.args[0], ast.Constant)
                and str(call.args[0].value).endswith("$")
            ):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                out |= {t.id for t in targets if isinstance(t, ast.Name)}
    return out


def _partial_matches(path: Path, text: str | None = None) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8") if text is None else text)
    anchored = _dollar_patterns(tree)
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in ("match", "search"):
            continue
        receiver = node.func.value
        if isinstance(receiver, ast.Name) and receiver.id in anchored:
            found.append(f"{path}:{node.lineno}")
        if (  # re.match(r"...$", text)
            isinstance(receiver, ast.Name)
            and receiver.id == "re"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and str(node.args[0].value).endswith("$")
        ):
            found.append(f"{path}:{node.lineno}")
    return found


def test_no_dollar_pattern_is_matched_partially() -> None:
    found = [hit for path in sorted(SRC.rglob("*.py")) for hit in _partial_matches(path)]
    assert found == []


def test_the_scan_finds_the_old_bug() -> None:
    """The scan above is not vacuous: it flags the manifest's old spelling."""
    old = 'import re\n_NAME_RE = re.compile(r"^[a-z]+$")\nok = _NAME_RE.match(name)\n'
    assert _partial_matches(Path("manifest.py"), old) == ["manifest.py:3"]
    inline = 'import re\nok = re.search(r"^[0-9a-f]{64}$", digest)\n'
    assert _partial_matches(Path("x.py"), inline) == ["x.py:2"]
    fixed = 'import re\n_NAME_RE = re.compile(r"[a-z]+")\nok = _NAME_RE.fullmatch(name)\n'
    assert _partial_matches(Path("manifest.py"), fixed) == []
    assert re.compile(r"^[a-z]+$").match("digits\n") is not None  # why it matters


@pytest.mark.parametrize(
    "text", ["\u00b2", "5\u00b2", "\u0663\u0660m", "3\u0660m", "9" * 400 + "w"]
)
def test_durations_take_ascii_digits_only(text: str) -> None:
    """'²'.isdigit() is True and float('²') raised a bare ValueError; '٣' read as 3."""
    with pytest.raises(FleetDriftError):
        parse_duration(text)
    assert parse_duration("30m") == 1800.0
