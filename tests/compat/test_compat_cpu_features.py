"""Bundles released before ``compatibility.cpu_features`` existed still verify and install.

The field is absent from their signed manifests; a device that knows its CPU flags (even one
that offers none) must treat that as "no requirement", and re-serialising the manifest must give
the very bytes that were signed.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from edge_agent.bundle import read_bundle, read_raw
from edge_agent.contract import BundleManifest, DeviceProfile
from edge_agent.runtime.loader import installed_runtime_version
from edge_agent.store.store import ModelStore
from edge_agent.trust import TrustedRoot

FIXTURES = sorted(p.parent for p in Path(__file__).parent.glob("*/fixture.json"))


def _device(features: frozenset[str]) -> DeviceProfile:
    version = installed_runtime_version("onnxruntime")
    assert version is not None
    return DeviceProfile("x86_64", {"onnxruntime": version}, cpu_features=features)


@pytest.mark.parametrize("fixture", FIXTURES, ids=[p.name for p in FIXTURES])
def test_old_bundle_without_cpu_features_installs_on_any_cpu(fixture: Path, tmp_path: Path) -> None:
    info = json.loads((fixture / "fixture.json").read_text())
    bundle = fixture / info["bundle"]
    raw = read_raw(bundle).manifest_bytes
    manifest = BundleManifest.from_bytes(raw)
    if "cpu_features" not in json.loads(raw)["compatibility"]:
        assert manifest.compatibility.cpu_features == ()
        assert manifest.to_bytes() == raw  # the absent field stays absent: same signed bytes
    assert manifest.compatibility.cpu_features == ()  # fixtures are portable builds
    root = TrustedRoot.from_bytes((fixture / "root.json").read_bytes())
    at = datetime.fromisoformat(info["verify_at"])
    for features in (frozenset(), frozenset({"sse2"}), frozenset({"asimd"})):
        loaded = read_bundle(bundle, root, now=at, installed_version=None, device=_device(features))
        assert loaded.manifest.version == manifest.version
    store = ModelStore(tmp_path / "state", root, _device(frozenset()), clock=lambda: at)
    assert store.install(bundle).version == manifest.version
