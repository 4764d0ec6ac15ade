"""The runtime options the agent runs its models with, by default and from ``[runtime]``.

Pinned at the adapter boundary: what the serving registry hands ``load_runtime`` when the
agent loads a model, so a change of either the config section or ``RuntimeOptions`` that moves
the device's effective defaults fails here.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bundles import DigitsBundles
from edge_agent.config import AgentConfig, StoreConfig, load_config
from edge_agent.errors import ConfigError
from edge_agent.runtime.base import Runtime, RuntimeOptions
from edge_agent.serving import registry as serving_registry
from edge_agent.serving.agent import Agent
from edge_agent.store import ModelStore
from support import DEVICE

#: What the daemon ran every model with before the config section and the options had one owner.
AGENT_DEFAULTS = RuntimeOptions(
    intra_op_threads=1,
    inter_op_threads=1,
    providers=("CPUExecutionProvider",),
    warmup_runs=2,
    extra={},
)


def _options_used(
    tmp_path: Path, bundles: DigitsBundles, config: AgentConfig, monkeypatch: pytest.MonkeyPatch
) -> list[RuntimeOptions | None]:
    seen: list[RuntimeOptions | None] = []
    real = serving_registry.load_runtime

    def spy(artifact: bytes, fmt: str, options: RuntimeOptions | None = None) -> Runtime:
        seen.append(options)
        return real(artifact, fmt, options)

    monkeypatch.setattr(serving_registry, "load_runtime", spy)
    config = replace(config, store=StoreConfig(state_dir=str(tmp_path / "state")))
    store = ModelStore(tmp_path / "state", bundles.keys.trusted_root(), DEVICE)
    agent = Agent(config, store, background_drift=False)
    try:
        agent.install(bundles.path(1, "good"))
    finally:
        agent.close()
    return seen


def test_the_agent_loads_models_with_its_default_options(
    tmp_path: Path, digits_bundles: DigitsBundles, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _options_used(tmp_path, digits_bundles, load_config(None, env={}), monkeypatch)
    assert seen
    assert all(o == AGENT_DEFAULTS for o in seen)
    assert AgentConfig().runtime == load_config(None, env={}).runtime


def test_the_runtime_section_sets_threads_and_warmups_only(
    tmp_path: Path, digits_bundles: DigitsBundles, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {
        "EDGEFLEET_AGENT__RUNTIME__INTRA_OP_THREADS": "3",
        "EDGEFLEET_AGENT__RUNTIME__INTER_OP_THREADS": "2",
        "EDGEFLEET_AGENT__RUNTIME__WARMUP_RUNS": "0",
    }
    seen = _options_used(tmp_path, digits_bundles, load_config(None, env=env), monkeypatch)
    want: dict[str, Any] = {"intra_op_threads": 3, "inter_op_threads": 2, "warmup_runs": 0}
    assert seen
    assert all(o == replace(AGENT_DEFAULTS, **want) for o in seen)


@pytest.mark.parametrize("key", ["providers", "extra"])
def test_the_runtime_section_refuses_adapter_only_keys(tmp_path: Path, key: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f'[runtime]\n{key} = "x"\n')
    with pytest.raises(ConfigError, match=key):
        load_config(path, env={})
