"""Properties: the certificate messages (renewal request/response, claim enrollment) let only
``ContractError`` escape, whatever the bytes, and honest messages round-trip.

Seeds are honest messages with a real CSR and certificate; each parser gets random bytes,
hostile edits of its valid document and byte-level corruption, and every hostile token at
every field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from hostile_json import byte_mutated, every_token_everywhere, mutated, only_typed
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.common.identity import build_csr, generate_device_key
from edge_agent.errors import ContractError
from edge_agent.wire.ops.certs import CertRequest, CertResponse, ClaimEnrollment
from fleet_server.pki.certs import create_ca, pem_cert, sign_device_csr

_CSR = build_csr(generate_device_key(), "dev-1").decode()
_NOW = datetime(2026, 6, 1, tzinfo=UTC)
_CA = create_ca("t", now=_NOW, validity=__import__("datetime").timedelta(days=1))
_CERT = pem_cert(
    sign_device_csr(
        _CA, _CSR.encode(), "dev-1", now=_NOW, validity=_CA.cert.not_valid_after_utc - _NOW
    )
).decode()

SEEDS: list[tuple[str, Callable[[bytes], object], bytes]] = [
    ("renew", CertRequest.from_bytes, CertRequest("renew", "a" * 16, 0xABC, _CSR).to_bytes()),
    ("confirm", CertRequest.from_bytes, CertRequest("confirm", "b" * 16, 7).to_bytes()),
    (
        "issued",
        CertResponse.from_bytes,
        CertResponse("c" * 16, "issued", cert_pem=_CERT).to_bytes(),
    ),
    (
        "refused",
        CertResponse.from_bytes,
        CertResponse("d" * 16, "refused", reason="rate_limited", retry=True).to_bytes(),
    ),
    (
        "claim",
        ClaimEnrollment.from_bytes,
        ClaimEnrollment("line-1." + "Q" * 43, "dev-1", _CSR).to_bytes(),
    ),
]


@pytest.mark.parametrize(("name", "parse", "seed"), SEEDS, ids=[s[0] for s in SEEDS])
def test_honest_messages_round_trip(
    name: str, parse: Callable[[bytes], object], seed: bytes
) -> None:
    value = parse(seed)
    assert value.to_bytes() == seed  # type: ignore[attr-defined]


@pytest.mark.parametrize(("name", "parse", "seed"), SEEDS, ids=[s[0] for s in SEEDS])
@given(data=st.data())
def test_cert_parsers_raise_only_contract_errors(
    name: str, parse: Callable[[bytes], object], seed: bytes, data: st.DataObject
) -> None:
    payload = data.draw(
        st.one_of(mutated(json.loads(seed)), byte_mutated(seed), st.binary(max_size=256))
    )
    only_typed(parse, payload, ContractError)


@pytest.mark.parametrize(("name", "parse", "seed"), SEEDS, ids=[s[0] for s in SEEDS])
def test_every_hostile_token_in_every_field(
    name: str, parse: Callable[[bytes], object], seed: bytes
) -> None:
    for payload in every_token_everywhere(json.loads(seed)):
        only_typed(parse, payload, ContractError)


@pytest.mark.parametrize(
    "doc",
    [
        {"action": "renew", "csr": None},  # renew without a CSR
        {"action": "confirm", "csr": _CSR},  # confirm with one
        {"action": "revoke"},  # not an action
        {"serial": "0"},  # serial 0
        {"serial": "f" * 41},  # over 160 bits
        {"serial": "ABC"},  # upper-case hex
        {"request_id": "short"},
        {"request_id": "a" * 16 + "/"},
        {"csr": "-----BEGIN X-----\n@@@\n-----END X-----\n"},
        {"csr": _CSR + _CSR},  # two PEM blocks
        {"extra": 1},
    ],
)
def test_hostile_renew_requests_are_refused(doc: dict[str, object]) -> None:
    base = CertRequest("renew", "a" * 16, 0xABC, _CSR).to_dict()
    base.update(doc)
    with pytest.raises(ContractError):
        CertRequest.from_bytes(json.dumps(base).encode())
