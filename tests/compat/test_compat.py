"""Every committed bundle from a released format still verifies, parses and runs.

Fixtures are added by ``make_fixture.py`` and never regenerated (see its docstring).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from edge_agent.bundle import read_bundle
from edge_agent.runtime.golden import check_golden
from edge_agent.runtime.loader import load_runtime
from edge_agent.trust import TrustedRoot

FIXTURES = sorted(p.parent for p in Path(__file__).parent.glob("*/fixture.json"))


def test_there_is_at_least_one_fixture() -> None:
    assert FIXTURES


@pytest.mark.parametrize("fixture", FIXTURES, ids=[p.name for p in FIXTURES])
def test_released_bundle_still_verifies_and_runs(fixture: Path) -> None:
    info = json.loads((fixture / "fixture.json").read_text())
    root = TrustedRoot.from_bytes((fixture / "root.json").read_bytes())
    loaded = read_bundle(
        fixture / info["bundle"],
        root,
        now=datetime.fromisoformat(info["verify_at"]),
        installed_version=None,
        device=None,
    )
    assert loaded.manifest.schema_version == info["manifest_schema_version"]
    runtime = load_runtime(loaded.artifact, loaded.manifest.artifact.format)
    try:
        result = check_golden(loaded.manifest, runtime)
    finally:
        runtime.close()
    assert result.ok, result.failures
