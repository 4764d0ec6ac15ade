"""The model repository on a real agent (onnxruntime, signed digits bundles): the index, unload
and load mapped onto the store, who wins when another version becomes active, and the version
policy's kept versions reachable by number (and nothing outside it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_agent import make_agent, request

from bundles import DigitsBundles
from edge_agent.config import ModelPolicy, ServingConfig, VersionPolicy
from edge_agent.errors import ModelNotFoundError, ModelStoreError
from edge_agent.serving.agent import Agent
from edge_agent.serving.repository.control import LOAD_REASON
from edge_agent.serving.repository.index import OUTSIDE_POLICY, READY, UNAVAILABLE


def index(agent: Agent, ready_only: bool = False) -> dict[str, tuple[str, str]]:
    return {
        f"{e.name}@{e.version}": (e.state, e.reason)
        for e in agent.repository_index(ready_only=ready_only)
    }


def served(agent: Agent, bundles: DigitsBundles, version: str | None = None) -> str:
    """The version that answers a request of ``digits`` (naming ``version``)."""
    return agent.infer(request(bundles, version=version)).model_version


def policy(value: dict[str, Any]) -> ServingConfig:
    return ServingConfig(VersionPolicy.from_toml(value))


def test_latest_one_is_todays_behaviour(tmp_path: Path, digits_bundles: DigitsBundles) -> None:
    agent = make_agent(tmp_path, digits_bundles, install=("1", "2"))
    try:
        assert served(agent, digits_bundles) == "2"
        assert served(agent, digits_bundles, "2") == "2"
        with pytest.raises(ModelNotFoundError, match="version 1 is not loaded"):
            served(agent, digits_bundles, "1")
        with pytest.raises(ModelNotFoundError):
            agent.model_metadata("digits", "1")
        assert index(agent) == {
            "digits@1": (UNAVAILABLE, OUTSIDE_POLICY),
            "digits@2": (READY, ""),
        }
        assert agent.registry.loaded_keys() == ["digits"]
    finally:
        agent.close()


def test_all_versions_serve_by_number(tmp_path: Path, digits_bundles: DigitsBundles) -> None:
    agent = make_agent(
        tmp_path, digits_bundles, install=("1", "2", "4-badgolden"), serving=policy({"all": True})
    )
    try:
        # v4 failed its health check: the store went back to v2, v4 never serves.
        assert served(agent, digits_bundles) == "2"
        assert served(agent, digits_bundles, "1") == "1"
        assert agent.model_metadata("digits", "1")["versions"] == ["1"]
        assert agent.model_ready("digits", "1")
        with pytest.raises(ModelNotFoundError):
            served(agent, digits_bundles, "4")
        ready = index(agent, ready_only=True)
        assert ready == {"digits@1": (READY, ""), "digits@2": (READY, "")}
        assert index(agent)["digits@4"][0] == UNAVAILABLE
        assert "failed on this device" in index(agent)["digits@4"][1]
        assert sorted(agent.registry.loaded_keys()) == ["digits", "digits@1"]
        # The extra version is counted against the memory budget like any load.
        assert agent.registry.memory_used() > agent.registry.get("digits").memory_bytes  # type: ignore[union-attr]
    finally:
        agent.close()


def test_specific_and_latest_n(tmp_path: Path, digits_bundles: DigitsBundles) -> None:
    agent = make_agent(
        tmp_path, digits_bundles, install=("1", "2", "3"), serving=policy({"specific": [1]})
    )
    try:
        assert served(agent, digits_bundles, "1") == "1"
        with pytest.raises(ModelNotFoundError):
            served(agent, digits_bundles, "2")
        assert served(agent, digits_bundles, "3") == "3"  # the active version always serves
    finally:
        agent.close()
    agent = make_agent(
        tmp_path / "b", digits_bundles, install=("1", "2", "3"), serving=policy({"latest": 2})
    )
    try:
        assert served(agent, digits_bundles, "2") == "2"
        with pytest.raises(ModelNotFoundError):
            served(agent, digits_bundles, "1")
    finally:
        agent.close()


def test_an_extra_version_follows_the_store(tmp_path: Path, digits_bundles: DigitsBundles) -> None:
    """Installing v3 under latest 2: v2 keeps serving by number, v1 is unloaded (refresh)."""
    agent = make_agent(tmp_path, digits_bundles, install=("1", "2"), serving=policy({"latest": 2}))
    try:
        assert served(agent, digits_bundles, "1") == "1"
        agent.install(digits_bundles.path(3))
        agent.tick()
        assert served(agent, digits_bundles) == "3"
        assert served(agent, digits_bundles, "2") == "2"
        with pytest.raises(ModelNotFoundError):
            served(agent, digits_bundles, "1")
        assert sorted(agent.registry.loaded_keys()) == ["digits", "digits@2"]
    finally:
        agent.close()


def test_unload_then_load(tmp_path: Path, digits_bundles: DigitsBundles) -> None:
    agent = make_agent(tmp_path, digits_bundles, install=("1", "2"), serving=policy({"all": True}))
    try:
        agent.unload_model("digits")
        for version in (None, "2", "1"):
            with pytest.raises(ModelStoreError, match="unloaded"):
                served(agent, digits_bundles, version)
        with pytest.raises(ModelStoreError, match="unloaded"):
            agent.model_ready("digits")
        with pytest.raises(ModelStoreError, match="unloaded"):
            agent.model_metadata("digits")
        assert agent.not_ready() == {}  # an unloaded model does not make the server unready
        assert {state for state, _ in index(agent).values()} == {UNAVAILABLE}
        assert agent.registry.loaded_keys() == ["digits"]  # the extra version was freed
        agent.tick()  # the control loop does not bring it back
        with pytest.raises(ModelStoreError, match="unloaded"):
            served(agent, digits_bundles)
        agent.load_model("digits")
        assert served(agent, digits_bundles) == "2"
        assert served(agent, digits_bundles, "1") == "1"
        assert agent.store.state("digits").active == 2  # a plain load changes nothing stored
    finally:
        agent.close()


def test_a_new_active_version_wins_over_an_unload(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    """The newest intent wins: an install (the CLI, a fleet desired state) serves again."""
    agent = make_agent(tmp_path, digits_bundles, install=("1",))
    try:
        agent.unload_model("digits")
        agent.install(digits_bundles.path(2))
        agent.tick()
        assert served(agent, digits_bundles) == "2"
        assert not agent.repository.unloaded("digits")
    finally:
        agent.close()


def test_load_a_kept_version(tmp_path: Path, digits_bundles: DigitsBundles) -> None:
    agent = make_agent(tmp_path, digits_bundles, install=("1", "2", "4-badgolden"))
    try:
        agent.load_model("digits", 1)
        assert served(agent, digits_bundles) == "1"
        state = agent.store.state("digits")
        assert state.active == 1  # persisted, as a revert from the fleet is
        assert state.record(2).status == "rolled_back"
        assert state.events[-1]["detail"].endswith(LOAD_REASON)
        with pytest.raises(ModelStoreError, match="failed here before"):
            agent.load_model("digits", 4)
        with pytest.raises(ModelNotFoundError, match="v9 is not installed"):
            agent.load_model("digits", 9)
        assert served(agent, digits_bundles) == "1"
    finally:
        agent.close()


def test_unknown_models_and_staged_versions(tmp_path: Path, digits_bundles: DigitsBundles) -> None:
    agent = make_agent(tmp_path, digits_bundles, install=("1",))
    try:
        for call in (agent.load_model, agent.unload_model):
            with pytest.raises(ModelNotFoundError, match="not installed"):
                call("nope")
        agent.lifecycle.stage(digits_bundles.path(2))
        with pytest.raises(ModelStoreError, match="shadow"):
            agent.load_model("digits", 2)
        assert index(agent)["digits@2"][0] == UNAVAILABLE
        assert served(agent, digits_bundles) == "1"
    finally:
        agent.close()


def test_a_configured_candidate_stays_reachable_by_number(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    """Today's behaviour, kept under latest 1: the A/B candidate ``digits@1`` answers by number."""
    models = {"digits": ModelPolicy(ab_candidate="digits@1", ab_fraction=0.5)}
    agent = make_agent(tmp_path, digits_bundles, install=("1", "2"), models=models)
    try:
        assert served(agent, digits_bundles, "1") == "1"
        assert index(agent)["digits@1"] == (READY, "")
        agent.tick()
        assert "digits@1" in agent.registry.loaded_keys()  # not the repository's to unload
    finally:
        agent.close()
