"""Device labels on the wire and in the agent: the label rules, the lenient parse of what a
device reports (hostile input: bad entries dropped and counted, never failing the document),
the agent's ``[labels]`` configuration and the labels it reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.config import load_config
from edge_agent.errors import ConfigError, ContractError
from edge_agent.sync.reporting import device_labels
from edge_agent.wire.ops.labels import MAX_LABELS, check_labels, parse_labels
from edge_agent.wire.reported import ReportedState

GOOD = {"site": "berlin", "hw": "jetson-orin", "example.com/line": "3", "os": "linux_6.1"}
HOSTILE = [
    ({"": "x"}, "bad_key"),
    ({"-site": "x"}, "bad_key"),
    ({"site-": "x"}, "bad_key"),
    ({"s" * 64: "x"}, "bad_key"),
    ({"Example.com/a": "x"}, "bad_key"),
    ({"a/b/c": "x"}, "bad_key"),
    ({"si te": "x"}, "bad_key"),
    ({"site\n": "x"}, "bad_key"),
    ({"\u202esite": "x"}, "bad_key"),
    ({"site": ""}, "bad_value"),
    ({"site": "x" * 64}, "bad_value"),
    ({"site": "a b"}, "bad_value"),
    ({"site": "<script>"}, "bad_value"),
    ({"site": "\x1b[31mred"}, "bad_value"),
    ({"site": 3}, "bad_value"),
    ({"site": None}, "bad_value"),
    ({"site": ["a"]}, "bad_value"),
    ({"site": {"a": "b"}}, "bad_value"),
]


@pytest.mark.parametrize(("raw", "reason"), HOSTILE)
def test_a_bad_reported_label_is_dropped_and_counted(raw: dict[str, object], reason: str) -> None:
    parsed = parse_labels({**raw, "ok": "yes"})
    assert parsed.labels == {"ok": "yes"}
    assert parsed.refused == {reason: 1}


@pytest.mark.parametrize(("raw", "reason"), HOSTILE)
def test_operator_labels_are_checked_strictly(raw: dict[str, object], reason: str) -> None:
    with pytest.raises(ContractError):
        check_labels(raw, "labels")


def test_good_labels_pass_both_ways() -> None:
    assert parse_labels(GOOD).labels == GOOD
    assert parse_labels(GOOD).refused_total == 0
    assert check_labels(GOOD, "labels") == GOOD


def test_counts_are_bounded() -> None:
    many = {f"k{i:03d}": "v" for i in range(MAX_LABELS + 5)}
    parsed = parse_labels(many)
    assert len(parsed.labels) == MAX_LABELS
    assert parsed.refused == {"too_many": 5}
    flood = {f"k{i}": "v" for i in range(100_000)}
    assert parse_labels(flood).refused == {"too_many": 100_000}
    assert parse_labels(flood).labels == {}
    with pytest.raises(ContractError):
        check_labels(many, "labels")


@pytest.mark.parametrize("raw", [[["a", "b"]], "site=a", 3, True])
def test_labels_that_are_not_an_object_count_once(raw: object) -> None:
    assert parse_labels(raw) == parse_labels(raw)
    assert parse_labels(raw).refused == {"not_an_object": 1}
    assert parse_labels(None).refused_total == 0


def _reported(labels: object, **extra: object) -> bytes:
    doc = {
        "schema_version": 1,
        "type": "reported",
        "device_id": "cam-1",
        "at": 1.0,
        "models": {},
        "labels": labels,
        **extra,
    }
    return json.dumps(doc).encode()


def test_the_reported_state_keeps_valid_labels_and_counts_the_rest() -> None:
    state = ReportedState.from_bytes(_reported({"site": "b", "bad key": "x", "hw": ""}))
    assert state.labels == {"site": "b"}
    assert state.labels_refused == 2
    d = state.to_dict()
    assert d["labels"] == {"site": "b"}
    assert d["labels_refused"] == 2
    # A device cannot claim its own refusal count: it is computed, never read.
    again = ReportedState.from_bytes(_reported({"site": "b"}, labels_refused=-7))
    assert again.labels_refused == 0
    assert "labels_refused" not in again.to_dict()


def test_a_hostile_labels_field_never_fails_the_document() -> None:
    for labels in ("x", [1, 2], {"k": {"deep": ["x"] * 10}}, {str(i): "v" for i in range(2000)}):
        state = ReportedState.from_bytes(_reported(labels))
        assert state.device_id == "cam-1"
        assert state.labels_refused >= 1


def test_a_state_without_labels_is_unchanged_on_the_wire() -> None:
    state = ReportedState(device_id="cam-1", at=1.0)
    assert "labels" not in state.to_dict()
    assert ReportedState.from_dict(state.to_dict()) == state


def test_the_agent_reads_labels_from_its_config(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[labels]\nsite = "berlin"\nline = "3"\nhardware = "cam-v2"\n')
    cfg = load_config(path, {})
    assert cfg.labels == {"site": "berlin", "line": "3", "hardware": "cam-v2"}
    labels = device_labels(cfg.labels)
    assert labels["site"] == "berlin"
    assert labels["hardware"] == "cam-v2"
    assert labels["os"] == "linux"
    assert load_config(None, {}).labels == {}


@pytest.mark.parametrize(
    "body",
    [
        '[labels]\n"bad key" = "x"\n',
        '[labels]\nsite = ""\n',
        "[labels]\nsite = 3\n",
        "labels = 3\n",
    ],
)
def test_a_bad_configured_label_is_a_config_error(tmp_path: Path, body: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match="label"):
        load_config(path, {})
