"""``[serving] version_policy`` and ``[api] repository_control``: parsing (a hostile table of
values), the versions a policy serves (``routing.served_versions``), the router's refusal of an
unloaded model, and the index entries of one model (``serving.repository.index.index_of``)."""

from __future__ import annotations

from typing import Any

import pytest

from edge_agent.config import ServingConfig, VersionPolicy, load_config
from edge_agent.errors import ConfigError
from edge_agent.serving.repository.index import (
    LOADING,
    NOT_LOADED,
    OUTSIDE_POLICY,
    READY,
    STAGED_REASON,
    UNAVAILABLE,
    UNLOADED_REASON,
    IndexEntry,
    index_of,
)
from edge_agent.serving.routing import REFUSE, UNLOADED, Facts, Router, served_versions
from edge_agent.store import ModelState, VersionRecord
from edge_agent.store.state import Down


def policy_of(value: Any) -> VersionPolicy:
    return ServingConfig.from_table({"version_policy": value}).version_policy


def test_the_default_is_latest_one() -> None:
    assert load_config(None, {}).serving.version_policy == VersionPolicy("latest", 1)
    assert ServingConfig.from_table({}) == ServingConfig()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"latest": 1}, VersionPolicy("latest", 1)),
        ({"latest": 64}, VersionPolicy("latest", 64)),
        ({"specific": [4, 3]}, VersionPolicy("specific", 0, (3, 4))),
        ({"specific": [2**53 - 1]}, VersionPolicy("specific", 0, (2**53 - 1,))),
        ({"all": True}, VersionPolicy("all", 0)),
    ],
)
def test_valid_policies_parse_and_round_trip(value: Any, expected: VersionPolicy) -> None:
    assert policy_of(value) == expected
    assert policy_of(expected.to_toml()) == expected


@pytest.mark.parametrize(
    "value",
    [
        {},
        {"latest": 0},
        {"latest": -1},
        {"latest": 65},
        {"latest": True},  # a bool is an int in Python: refused all the same
        {"latest": 1.0},
        {"latest": "1"},
        {"latest": [1]},
        {"latest": 1, "all": True},
        {"specific": []},
        {"specific": [0]},
        {"specific": [-3]},
        {"specific": [3, 3]},
        {"specific": [1, "2"]},
        {"specific": [True]},
        {"specific": [1.5]},
        {"specific": 3},
        {"specific": [2**53]},
        {"specific": list(range(1, 66))},
        {"all": False},
        {"all": 1},
        {"all": "true"},
        {"newest": 1},
        {"LATEST": 1},
        "latest",
        ["latest", 1],
        1,
        True,
    ],
)
def test_hostile_policies_are_config_errors_naming_the_key(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"serving\.version_policy"):
        policy_of(value)


def test_the_serving_section_is_strict() -> None:
    with pytest.raises(ConfigError, match="unknown keys in \\[serving\\]: version_polcy"):
        ServingConfig.from_table({"version_polcy": {"latest": 1}})
    with pytest.raises(ConfigError, match="serving must be a table"):
        ServingConfig.from_table("latest")


def test_policy_from_a_file_and_from_the_environment(tmp_path: Any) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("[serving]\nversion_policy = { specific = [3, 4] }\n")
    assert load_config(path, {}).serving.version_policy.versions == (3, 4)
    env = {"EDGEFLEET_AGENT__SERVING__VERSION_POLICY": "{all = true}"}
    assert load_config(path, env).serving.version_policy.kind == "all"
    with pytest.raises(ConfigError, match="version_policy"):
        load_config(None, {"EDGEFLEET_AGENT__SERVING__VERSION_POLICY": "latest"})


@pytest.mark.parametrize(
    ("env", "ok"),
    [
        ({}, True),
        ({"EDGEFLEET_AGENT__API__HOST": "::1"}, True),
        ({"EDGEFLEET_AGENT__API__HOST": "localhost"}, True),
        ({"EDGEFLEET_AGENT__API__HOST": "127.0.0.2"}, True),
        ({"EDGEFLEET_AGENT__API__HOST": "0.0.0.0"}, False),
        ({"EDGEFLEET_AGENT__API__HOST": "192.168.1.5"}, False),
        ({"EDGEFLEET_AGENT__API__HOST": "device.local"}, False),
        ({"EDGEFLEET_AGENT__GRPC__ENABLED": "true"}, True),
        ({"EDGEFLEET_AGENT__GRPC__ENABLED": "true", "EDGEFLEET_AGENT__GRPC__HOST": "::"}, False),
        # gRPC off: its host does not matter.
        ({"EDGEFLEET_AGENT__GRPC__HOST": "0.0.0.0"}, True),
    ],
)
def test_repository_control_only_on_loopback_listeners(env: dict[str, str], ok: bool) -> None:
    env = {"EDGEFLEET_AGENT__API__REPOSITORY_CONTROL": "true", **env}
    if ok:
        assert load_config(None, env).api.repository_control
    else:
        with pytest.raises(ConfigError, match="repository_control needs a loopback"):
            load_config(None, env)


def test_repository_control_is_off_by_default_and_a_bool() -> None:
    assert not load_config(None, {}).api.repository_control
    with pytest.raises(ConfigError, match="repository_control must be bool"):
        load_config(None, {"EDGEFLEET_AGENT__API__REPOSITORY_CONTROL": "1"})


GOOD, PROBATION, FAILED, STAGED, ROLLED = "good", "probation", "failed", "staged", "rolled_back"


@pytest.mark.parametrize(
    ("policy", "active", "kept", "served"),
    [
        # latest 1 is today's behaviour: the active version only, whatever is kept.
        (VersionPolicy("latest", 1), 3, [(1, GOOD), (2, GOOD), (3, PROBATION)], {3}),
        (VersionPolicy("latest", 1), 1, [(1, GOOD), (2, ROLLED)], {1}),
        (VersionPolicy("latest", 1), None, [(1, STAGED)], set()),
        (VersionPolicy("latest", 2), 3, [(1, GOOD), (2, GOOD), (3, PROBATION)], {2, 3}),
        # After a rollback the active version is not the newest: it still counts as one.
        (VersionPolicy("latest", 2), 1, [(1, GOOD), (2, ROLLED), (3, FAILED)], {1, 2}),
        (VersionPolicy("latest", 9), 3, [(1, GOOD), (2, FAILED), (3, GOOD)], {1, 3}),
        (VersionPolicy("latest", 3), 4, [(1, GOOD), (2, GOOD), (3, GOOD), (4, GOOD)], {2, 3, 4}),
        # Failed here and staged shadows never serve by number.
        (VersionPolicy("all"), 4, [(1, FAILED), (2, STAGED), (3, ROLLED), (4, GOOD)], {3, 4}),
        (VersionPolicy("all"), None, [(1, GOOD), (2, PROBATION)], {1, 2}),
        (VersionPolicy("specific", 0, (1, 2, 9)), 3, [(1, GOOD), (2, FAILED), (3, GOOD)], {1, 3}),
        (VersionPolicy("specific", 0, (9,)), 3, [(3, GOOD)], {3}),
    ],
)
def test_served_versions(
    policy: VersionPolicy, active: int | None, kept: list[tuple[int, str]], served: set[int]
) -> None:
    assert served_versions(policy, active, kept) == served


@pytest.mark.parametrize("mode", ["device_only", "prefer_device", "prefer_cloud", "cloud_only"])
def test_an_unloaded_model_is_refused_in_every_mode_never_sent_to_the_cloud(mode: str) -> None:
    router = Router(mode, cloud=True)
    route = router.first(Facts(live=True, unloaded=True), draw=lambda: "candidate")
    assert (route.target, route.reason, route.arm) == (REFUSE, UNLOADED, "live")
    assert router.first(Facts(live=True)).target != REFUSE or mode == "device_only"


def rec(version: int, status: str, reason: str = "") -> VersionRecord:
    return VersionRecord(version, "0" * 64, "2026-01-01T00:00:00.000000Z", status, reason)


STATE = ModelState(
    "digits",
    active=4,
    high_water=6,
    versions=(
        rec(1, GOOD),
        rec(2, FAILED, "golden samples failed"),
        rec(3, ROLLED),
        rec(4, PROBATION),
        rec(5, GOOD),
        rec(6, STAGED),
    ),
)


def states(entries: list[IndexEntry]) -> dict[str, tuple[str, str]]:
    return {e.version: (e.state, e.reason) for e in entries}


def test_index_maps_each_kept_version() -> None:
    entries = index_of(
        STATE, serving=4, pinned={1}, served={1, 3, 4, 5}, unloaded=False, loading={3}
    )
    assert [e.name for e in entries] == ["digits"] * 6
    assert states(entries) == {
        "1": (READY, ""),
        "2": (UNAVAILABLE, "failed on this device: golden samples failed"),
        "3": (LOADING, ""),
        "4": (READY, ""),
        "5": (UNAVAILABLE, NOT_LOADED),
        "6": (UNAVAILABLE, STAGED_REASON),
    }
    outside = index_of(STATE, serving=4, pinned=(), served={4}, unloaded=False)
    assert states(outside)["1"] == (UNAVAILABLE, OUTSIDE_POLICY)
    failed = index_of(
        STATE, serving=4, pinned=(), served={1, 4}, unloaded=False, failures={1: "AdmissionError"}
    )
    assert states(failed)["1"] == (UNAVAILABLE, "load failed: AdmissionError")
    assert entries[0].to_dict() == {"name": "digits", "version": "1", "state": READY, "reason": ""}


def test_index_of_an_unloaded_or_down_model() -> None:
    unloaded = index_of(STATE, serving=4, pinned={1}, served={1, 4}, unloaded=True)
    assert {e.state for e in unloaded} == {UNAVAILABLE}
    assert {e.reason for e in unloaded} == {UNLOADED_REASON}
    down = ModelState(
        "digits",
        active=2,
        versions=(rec(1, GOOD), rec(2, PROBATION)),
        down=Down(2, "RuntimeAdapterError: golden samples failed", "now"),
    )
    # v2 cannot load; v1 still serves from memory.
    assert states(index_of(down, serving=1, pinned=(), served={2}, unloaded=False)) == {
        "1": (READY, ""),
        "2": (UNAVAILABLE, "RuntimeAdapterError: golden samples failed"),
    }
