"""The published JSON Schemas describe what the code really sends: desired state, block headers."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import jsonschema
import pytest

from edge_agent.trust.assignment import ModelAssignment
from edge_agent.wire.transfer import MIN_BLOCK_SIZE, BlockData, BlockPlan, BlockRequest
from fleet_server.delivery.desired import make_desired_state, sign_desired_state
from model_builder.keystore import KeyStore


def _schema(name: str) -> dict[str, Any]:
    text = resources.files("edge_agent").joinpath(f"schemas/{name}.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def _header(message: bytes) -> Any:
    n = int.from_bytes(message[:2], "big")
    return json.loads(message[2 : 2 + n])


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    now = datetime(2026, 11, 1, tzinfo=UTC)
    keys = KeyStore.init(tmp_path_factory.mktemp("keys"), now=now)
    models = {"digits": ModelAssignment(3, "stable", "a" * 64, 12345, "b" * 64)}
    state = make_desired_state("dev-a", 7, models, now, timedelta(hours=1))
    return sign_desired_state(state, [keys.signer("online-1")])


def test_signed_desired_state_matches_its_schema(document: bytes) -> None:
    schema = _schema("desired")
    jsonschema.validate(json.loads(document), schema)
    tampered = json.loads(document)
    tampered["signed"]["models"]["digits"]["bundle_length"] = "12345"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(tampered, schema)
    tampered = json.loads(document)
    tampered["signed"]["extra"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(tampered, schema)


def test_block_headers_match_their_schema() -> None:
    schema = _schema("blocks")
    data = bytes(range(256)) * 300
    plan = BlockPlan(len(data), hashlib.sha256(data).hexdigest(), MIN_BLOCK_SIZE)
    request = BlockRequest(plan.transfer_id, ((0, 1), (3, 5)))
    jsonschema.validate(_header(request.to_bytes()), schema)
    start, stop = plan.block_range(1)
    block = BlockData(plan.transfer_id, 1, data[start:stop])
    message = block.to_bytes()
    header = _header(message)
    jsonschema.validate(header, schema)
    assert len(message) == 2 + int.from_bytes(message[:2], "big") + header["length"]
    header["ranges"] = []
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(header, schema)
