"""Every committed desired-state message with a root chain is still walked and accepted.

Fixtures are added by ``make_rotation_fixture.py`` and never regenerated (see its docstring).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from edge_agent.trust import TrustedRoot, apply_root_chain, split_roots
from edge_agent.trust.desired import verify_desired_state

FIXTURES = sorted(p.parent for p in Path(__file__).parent.glob("*/rotation.json"))


def test_there_is_at_least_one_rotation_fixture() -> None:
    assert FIXTURES


@pytest.mark.parametrize("fixture", FIXTURES, ids=[p.name for p in FIXTURES])
def test_released_chain_is_walked_and_its_desired_state_accepted(fixture: Path) -> None:
    info = json.loads((fixture / "rotation.json").read_text())
    now = datetime.fromisoformat(info["verify_at"])
    envelope, chain = split_roots((fixture / "message.json").read_bytes())
    root = apply_root_chain(
        TrustedRoot.from_bytes((fixture / "root.json").read_bytes()), chain, now=now
    )
    assert root.version == info["root_version"]
    state = verify_desired_state(
        root, envelope, now=now, device_id=info["device_id"], last_version=0
    )
    assert state.version == info["desired_version"]
