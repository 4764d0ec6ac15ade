"""Every committed desired-state document with a shadow assignment still verifies and reads the
same (fixtures are added by ``make_desired_shadow_fixture.py`` and never regenerated)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from edge_agent.trust import TrustedRoot
from edge_agent.trust.desired import verify_desired_state

FIXTURES = sorted(
    p.parent for p in Path(__file__).parent.glob("*/expect.json") if "shadow" in p.parent.name
)


def test_there_is_at_least_one_shadow_fixture() -> None:
    assert FIXTURES


@pytest.mark.parametrize("fixture", FIXTURES, ids=[p.name for p in FIXTURES])
def test_released_shadow_document_verifies_and_reads_the_same(fixture: Path) -> None:
    expect = json.loads((fixture / "expect.json").read_text())
    now = datetime.fromisoformat(expect["verify_at"])
    root = TrustedRoot.from_bytes((fixture / "root.json").read_bytes())
    state = verify_desired_state(
        root,
        (fixture / "message.json").read_bytes(),
        now=now,
        device_id=expect["device_id"],
        last_version=0,
    )
    assert state.version == expect["desired_version"]
    assert {n: a.to_dict() for n, a in state.models.items()} == expect["models"]
    shadows = [a.shadow for a in state.models.values() if a.shadow is not None]
    assert shadows, "a shadow fixture must carry a shadow assignment"
