"""A model that cannot serve and has nothing to fall back to: said once, kept, and visible.

The model's only installed version fails its golden samples (a real onnxruntime session on the
real digits model whose signed golden answers lie). Another model serves beside it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient
from test_agent import DEVICE, make_agent

from bundles import DigitsBundles
from edge_agent.api.app import create_app
from edge_agent.bundle import read_bundle
from edge_agent.cli.main import cli
from edge_agent.config import AgentConfig, ApiConfig, StoreConfig
from edge_agent.errors import ModelStoreError
from edge_agent.serving.agent import Agent
from edge_agent.serving.service import InferenceRequest
from edge_agent.store import ModelStore
from model_builder.package import package_bundle


def _other_model(bundles: DigitsBundles, tmp_path: Path) -> Path:
    """The good digits bundle re-signed under another model name ("pager")."""
    loaded = read_bundle(
        bundles.path(1),
        bundles.keys.trusted_root(),
        now=datetime.now(UTC),
        installed_version=None,
        device=None,
    )
    manifest = dataclasses.replace(loaded.manifest, name="pager")
    path = tmp_path / "pager-1.efb"
    path.write_bytes(package_bundle(manifest, loaded.artifact, bundles.keys, now=datetime.now(UTC)))
    return path


@pytest.fixture
def agent(tmp_path: Path, digits_bundles: DigitsBundles) -> Agent:
    """digits: only v4, whose golden samples fail; pager: a good model that serves."""
    store = ModelStore(tmp_path / "state", digits_bundles.keys.trusted_root(), DEVICE)
    store.install(digits_bundles.path(4, "badgolden"))
    store.install(_other_model(digits_bundles, tmp_path))
    return make_agent(tmp_path, digits_bundles, install=())


def _down_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "not served" in r.getMessage()]


def test_the_cause_is_logged_once_and_reloads_do_not_pretend(
    tmp_path: Path, digits_bundles: DigitsBundles, caplog: pytest.LogCaptureFixture
) -> None:
    store = ModelStore(tmp_path / "state", digits_bundles.keys.trusted_root(), DEVICE)
    store.install(digits_bundles.path(4, "badgolden"))
    with caplog.at_level(logging.INFO):
        agent = make_agent(tmp_path, digits_bundles, install=())
        for _ in range(5):  # the daemon's control loop every 2 s
            assert agent.reload_changed() == []  # nothing was reloaded: nothing to log
    lines = _down_lines(caplog)
    assert len(lines) == 1, lines
    assert "digits v4 not served" in lines[0]
    assert "golden samples failed" in lines[0]
    assert not [r for r in caplog.records if "cannot roll back" in r.getMessage()]
    assert sum(e["event"] == "load_failed" for e in agent.registry.events) == 1


def test_the_cause_is_kept_in_the_store_and_survives_a_restart(
    agent: Agent, tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    down = agent.store.state("digits").down
    assert down is not None
    assert down.version == 4
    assert "golden samples failed" in down.reason
    agent.close()
    # A new process (restart): the record is read back from state.json as it was written.
    reopened = ModelStore(tmp_path / "state", digits_bundles.keys.trusted_root(), DEVICE)
    assert reopened.state("digits").down == down
    again = make_agent(tmp_path, digits_bundles, install=())
    assert again.store.state("digits").down == down  # same cause: one record, not a new one
    assert sum(e.get("event") == "down" for e in again.store.state("digits").events) == 1


def test_readiness_names_the_model_down_and_why_while_the_other_serves(agent: Agent) -> None:
    assert not agent.ready()
    reasons = agent.not_ready()
    assert list(reasons) == ["digits"]
    assert "v4 down" in reasons["digits"]
    assert "golden" in reasons["digits"]
    assert agent.model_ready("pager")
    with pytest.raises(ModelStoreError, match="golden"):
        agent.model_ready("digits")
    with pytest.raises(ModelStoreError, match="golden"):
        agent.infer(InferenceRequest("digits", {"input": [[0.0] * 64]}))
    assert agent.status()["not_ready"] == reasons

    client = TestClient(create_app(agent, ApiConfig()), raise_server_exceptions=False)
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 503
    body = ready.json()
    assert "digits" in body["error"]
    assert "golden" in body["error"]
    assert set(body["models"]) == {"digits"}
    assert client.get("/v2/models/pager/ready").status_code == 200
    model = client.get("/v2/models/digits/ready")
    assert model.status_code == 503
    assert "golden" in model.json()["error"]
    assert client.get("/v2/models/nope/ready").status_code == 404
    # Inference on the model that is down answers 503 with the same reason; 404 stays for a
    # model that is not installed (docs/agent.md, readiness).
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}
    refused = client.post("/v2/models/digits/infer", json=body)
    assert refused.status_code == 503
    assert "golden" in refused.json()["error"]
    assert client.post("/v2/models/nope/infer", json=body).status_code == 404


def test_a_good_version_clears_the_record(agent: Agent, digits_bundles: DigitsBundles) -> None:
    agent.install(digits_bundles.path(5, "narrow"))  # passes its golden samples
    state = agent.store.state("digits")
    assert state.active == 5
    assert state.down is None
    assert agent.ready()
    assert agent.model_ready("digits")


def test_status_command_says_down_and_why(agent: Agent, tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    root = tmp_path / "root.json"
    root.write_bytes(agent.store.root.to_bytes())
    cfg = AgentConfig(store=StoreConfig(state_dir=str(tmp_path / "state"), root_path=str(root)))
    config.write_text(
        f'[store]\nstate_dir = "{cfg.store.state_dir}"\nroot_path = "{root}"\n'
        '[api]\nport = 1\nhost = "127.0.0.1"\n'
    )
    out = CliRunner().invoke(cli, ["status", "--config", str(config)])
    assert out.exit_code == 0, out.output
    line = next(x for x in out.output.splitlines() if x.startswith("digits"))
    assert "DOWN" in line
    assert "golden samples failed" in line
    out = CliRunner().invoke(cli, ["status", "--config", str(config), "--json"])
    digits = next(m for m in json.loads(out.output)["models"] if m["name"] == "digits")
    assert digits["down"]["version"] == 4


def test_the_fleet_is_told_the_assigned_version_cannot_serve(agent: Agent, tmp_path: Path) -> None:
    from edge_agent.config import SyncConfig
    from edge_agent.sync.deploy import Deployer
    from edge_agent.trust.assignment import ModelAssignment
    from edge_agent.trust.desired import DesiredState

    deployer = Deployer(
        agent, tmp_path / "sync", SyncConfig(), event=lambda *a: None, wake=lambda: None
    )
    assignment = ModelAssignment(4, "stable", "a" * 64, 100, "b" * 64)
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    deployer.apply(DesiredState("dev-1", 1, expires, {"digits": assignment}))
    outcome, reason = deployer.outcomes["digits"]
    assert outcome == "failed"  # reported: a rollout counts it as a failed install
    assert "cannot serve" in reason
    assert "golden samples failed" in reason


def test_a_model_down_is_retried_once_after_a_root_rotation(
    agent: Agent, digits_bundles: DigitsBundles, tmp_path: Path
) -> None:
    import shutil

    from model_builder.keystore import KeyStore

    copy = tmp_path / "keys-copy"  # rotate a copy: the session's key store stays as it is
    shutil.copytree(digits_bundles.keys.path, copy)
    keys = KeyStore.open(copy)
    keys.rotate("targets", now=datetime.now(UTC), add=1)

    def failures() -> int:
        return sum(
            e["event"] == "load_failed" and e["model"] == "digits" for e in agent.registry.events
        )

    before = failures()
    agent.reload_changed()
    assert failures() == before  # nothing changed: not retried
    agent.store.update_roots(keys.root_chain()[1:])
    agent.reload_changed()
    assert failures() == before + 1  # the new root could have made it loadable: tried once
    agent.reload_changed()
    assert failures() == before + 1


def test_a_model_refused_by_the_memory_budget_is_said_once_too(
    tmp_path: Path, digits_bundles: DigitsBundles, caplog: pytest.LogCaptureFixture
) -> None:
    store = ModelStore(tmp_path / "state", digits_bundles.keys.trusted_root(), DEVICE)
    store.install(digits_bundles.path(1))
    with caplog.at_level(logging.INFO):
        # 8 MiB: below the admission estimate of any model (3x the artifact + 8 MiB).
        agent = make_agent(tmp_path, digits_bundles, install=(), budget=8)
        for _ in range(5):
            assert agent.reload_changed() == []
    lines = _down_lines(caplog)
    assert len(lines) == 1, lines
    assert "digits v1 not served: AdmissionError" in lines[0]
    assert "AdmissionError" in agent.not_ready()["digits"]
    down = agent.store.state("digits").down
    assert down is not None
    assert down.version == 1
