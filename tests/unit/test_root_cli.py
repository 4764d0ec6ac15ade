"""``edge-agent root update/show`` and ``fleet-server root show/rotate`` through click's runner.

The real-process story is ``tests/integration/test_root_rotation.py``; these pin the commands'
output and exit codes without a broker.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from edge_agent.cli.main import cli as agent_cli
from edge_agent.cli.main import main as agent_main
from fakes import FakeGateway
from fleet_server.admin.api import create_app
from fleet_server.admin.root import root_routes
from fleet_server.cli.main import cli as server_cli
from fleet_server.delivery.library import BundleLibrary
from fleet_server.pki.roots import ServerRoots
from fleet_server.registry.store import Registry
from fleet_server.service import FleetService
from model_builder.keystore import KeyStore
from support import NOW

TOKEN = "t" * 32


def _agent_config(tmp_path: Path, keys: KeyStore) -> Path:
    (tmp_path / "root.json").write_bytes(keys.root_chain()[0])
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[store]\nstate_dir = "{tmp_path / "state"}"\nroot_path = "{tmp_path / "root.json"}"\n'
    )
    return config


def test_edge_agent_root_update_and_show(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = KeyStore.init(tmp_path / "keys", now=NOW)
    keys.rotate("targets", now=NOW, add=1, remove=["targets-1"])
    keys.rotate("targets", now=NOW, add=1)
    config = _agent_config(tmp_path, keys)
    roots = [str(keys.path / "roots" / f"{v}.root.json") for v in (2, 3)]
    runner = CliRunner()

    with pytest.raises(SystemExit) as exited:  # behind the error boundary, as installed
        agent_main(["root", "update", roots[1], "--config", str(config)])
    assert exited.value.code == 4  # skips v2: untrusted
    assert "does not follow" in capsys.readouterr().err

    out = runner.invoke(agent_cli, ["root", "update", *roots, "--config", str(config)])
    assert out.exit_code == 0, out.output
    assert "v1 -> v3" in out.output
    out = runner.invoke(agent_cli, ["root", "update", *roots, "--config", str(config)])
    assert "stays v3" in out.output

    out = runner.invoke(agent_cli, ["root", "show", "--json", "--config", str(config)])
    shown = json.loads(out.output)
    assert shown["version"] == 3
    assert len(shown["roles"]["targets"]["keyids"]) == 2
    out = runner.invoke(agent_cli, ["status", "--config", str(config)])
    assert "trusted root: v3" in out.output


def test_fleet_server_root_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = KeyStore.init(tmp_path / "keys", now=NOW)
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.upgrade()
    roots = ServerRoots(keys.root_chain()[0], tmp_path / "roots", clock=lambda: NOW)
    gateway = FakeGateway()
    service = FleetService(
        registry,
        BundleLibrary(tmp_path / "bundles", roots.current, clock=lambda: NOW),
        gateway,
        [keys.signer("online-1")],
        clock=lambda: NOW,
        ttl=timedelta(hours=1),
        roots=roots,
    )
    app = create_app(service, TOKEN, extra_routes=(lambda g: root_routes(service, g),))
    keys.rotate("targets", now=NOW, add=1, remove=["targets-1"])
    admin = ["--url", "http://admin", "--token", TOKEN]
    with TestClient(app, base_url="http://admin") as client:
        original = httpx.Client.__init__

        def bridged(self: httpx.Client, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **{**kwargs, "transport": _Bridge(client)})

        monkeypatch.setattr(httpx.Client, "__init__", bridged)
        runner = CliRunner()
        rotate = ["root", "rotate", *admin, str(keys.path / "roots" / "2.root.json")]
        out = runner.invoke(server_cli, rotate)
        assert out.exit_code == 0, out.output
        assert "root v1 -> v2" in out.output
        out = runner.invoke(server_cli, rotate)
        assert "stays v2" in out.output
        out = runner.invoke(server_cli, ["root", "show", *admin])
        assert out.exit_code == 0, out.output
        assert "root v2" in out.output
        assert "chain shipped: v2" in out.output
    assert (gateway.published, gateway.waves) == ([], [])  # no device has a desired state here
    registry.close()


class _Bridge(httpx.BaseTransport):
    """Hands the CLI's requests to the in-process admin app."""

    def __init__(self, client: TestClient) -> None:
        self._client = client

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        r = self._client.request(
            request.method, request.url.path, headers=dict(request.headers), content=request.read()
        )
        return httpx.Response(r.status_code, headers=r.headers, content=r.content)
