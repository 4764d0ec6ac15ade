"""The fleet server's side of root rotation: store the chain, verify with it, ship it.

A real SQLite registry, a real key store and bundle library, a fake gateway (the MQTT side is
covered by ``tests/integration/test_root_rotation.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from edge_agent.errors import RootRotationError
from edge_agent.trust import TrustedRoot, apply_root_chain, split_roots
from edge_agent.trust.desired import verify_desired_state
from fakes import FakeGateway
from fleet_server.admin.api import create_app
from fleet_server.admin.root import root_routes
from fleet_server.delivery.library import BundleLibrary
from fleet_server.errors import BundleRejectedError, ServerConfigError
from fleet_server.pki.roots import ServerRoots
from fleet_server.registry.store import Registry
from fleet_server.service import FleetService
from model_builder.keystore import KeyStore
from support import NOW, make_bundle, write

TOKEN = "t" * 32


class Parts:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.keys = KeyStore.init(tmp_path / "keys", now=NOW)
        self.registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
        self.registry.upgrade()
        self.gateway = FakeGateway()
        self.roots = ServerRoots(self.keys.root_chain()[0], tmp_path / "roots", clock=lambda: NOW)
        self.service = FleetService(
            self.registry,
            BundleLibrary(tmp_path / "bundles", self.roots.current, clock=lambda: NOW),
            self.gateway,
            [self.keys.signer("online-1")],
            clock=lambda: NOW,
            ttl=timedelta(hours=1),
            roots=self.roots,
        )

    def keyid(self, label: str) -> str:
        return next(k.keyid for k in self.keys.list_keys() if k.label == label)


@pytest.fixture
def p(tmp_path: Path) -> Iterator[Parts]:
    parts = Parts(tmp_path)
    yield parts
    parts.registry.close()


def test_rotation_revokes_the_builder_key_and_ships_the_chain_to_every_device(p: Parts) -> None:
    v1 = TrustedRoot.from_bytes(p.keys.root_chain()[0])
    p.service.publish_model(write(p.tmp, make_bundle(p.keys, version=1), "v1.efb"))
    forged = write(p.tmp, make_bundle(p.keys, version=2, key_labels=["targets-1"]), "f.efb")
    for device in ("cam-1", "cam-2"):
        p.service.enroll_device(device)
        p.service.assign(device, "digits", 1)
    p.gateway.published.clear()

    p.keys.rotate("targets", now=NOW, add=1, remove=[p.keyid("targets-1")])
    root, results = p.service.rotate_root(p.keys.root_chain())
    assert root.version == 2
    assert [(r.device_id, r.desired_version, r.published) for r in results] == [
        ("cam-1", 2, True),
        ("cam-2", 2, True),
    ]
    for device, message in p.gateway.published:  # what each device receives
        envelope, chain = split_roots(message)
        new = apply_root_chain(v1, chain, now=NOW)
        assert new.version == 2
        state = verify_desired_state(new, envelope, now=NOW, device_id=device, last_version=1)
        assert set(state.models) == {"digits"}  # same models: only the root changed
    with pytest.raises(BundleRejectedError):
        p.service.publish_model(forged)  # the stolen key no longer publishes anything
    p.service.publish_model(write(p.tmp, make_bundle(p.keys, version=2), "v2.efb"))
    # Every later document carries the chain too (a device offline during the rotation).
    [result] = p.service.assign("cam-1", "digits", 2)
    assert result.published
    assert len(split_roots(p.gateway.published[-1][1])[1]) == 1


def test_the_chain_survives_a_server_restart(p: Parts) -> None:
    p.keys.rotate("targets", now=NOW, add=1)
    p.keys.rotate("targets", now=NOW, add=1)
    p.service.rotate_root(p.keys.root_chain())
    again = ServerRoots(p.keys.root_chain()[0], p.tmp / "roots", clock=lambda: NOW)
    assert again.current.version == 3
    assert again.chain() == p.keys.root_chain()[1:]


def test_a_tampered_chain_directory_stops_the_server(p: Parts) -> None:
    p.keys.rotate("targets", now=NOW, add=1)
    p.service.rotate_root(p.keys.root_chain())
    other = KeyStore.init(p.tmp / "other", now=NOW)
    other.rotate("targets", now=NOW, add=1)
    (p.tmp / "roots" / "2.root.json").write_bytes(other.root_chain()[1])
    with pytest.raises(ServerConfigError, match="not valid"):
        ServerRoots(p.keys.root_chain()[0], p.tmp / "roots", clock=lambda: NOW)


@pytest.mark.parametrize("attack", ["skips a version", "drops the server's online key"])
def test_refused_rotations_store_nothing(p: Parts, attack: str) -> None:
    if attack == "skips a version":
        p.keys.rotate("targets", now=NOW, add=1)
        p.keys.rotate("targets", now=NOW, add=1)
        chain = [p.keys.root_chain()[2]]
    else:
        p.keys.rotate("timestamp", now=NOW, add=1, remove=[p.keyid("online-1")])
        chain = p.keys.root_chain()
    with pytest.raises(RootRotationError):
        p.service.rotate_root(chain)
    assert p.roots.current.version == 1
    assert p.roots.chain() == []
    assert not list((p.tmp / "roots").glob("*.json"))


def test_admin_routes(p: Parts) -> None:
    app = create_app(p.service, TOKEN, extra_routes=(lambda g: root_routes(p.service, g),))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    p.keys.rotate("targets", now=NOW, add=1)
    with TestClient(app) as client:
        assert client.get("/v1/root").status_code == 401
        assert client.get("/v1/root", headers=auth).json()["version"] == 1
        body = {"roots": [json.loads(d) for d in p.keys.root_chain()]}
        r = client.post("/v1/root", headers=auth, json=body)
        assert r.status_code == 200, r.text
        assert (r.json()["previous"], r.json()["version"]) == (1, 2)
        shown = client.get("/v1/root", headers=auth).json()
        assert shown["chain"] == [2]
        for bad in ({}, {"roots": "x"}, {"roots": [1]}, {"roots": [{"signed": {}}]}):
            r = client.post("/v1/root", headers=auth, json=bad)
            assert r.status_code == 400, (bad, r.text)
            assert "code" in r.json()


def test_a_root_path_rewritten_by_the_key_store_still_ships_the_whole_chain(p: Parts) -> None:
    """``signing.root_path = keys/root.json``: every rotation rewrites it, then a restart."""
    p.keys.rotate("targets", now=NOW, add=1)
    p.service.rotate_root(p.keys.root_chain())  # v2 stored
    p.keys.rotate("targets", now=NOW, add=1)
    p.service.rotate_root(p.keys.root_chain())  # v3 stored
    restarted = ServerRoots(p.keys.root_bytes(), p.tmp / "roots", clock=lambda: NOW)  # v3 file
    assert restarted.current.version == 3
    v1 = TrustedRoot.from_bytes(p.keys.root_chain()[0])
    assert apply_root_chain(v1, restarted.chain(), now=NOW).version == 3  # a device on v1
