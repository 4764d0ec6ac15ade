"""The ``shadow_flips`` telemetry part: strict parsing, tolerant building, old reports."""

from __future__ import annotations

from typing import Any

import pytest

from edge_agent.errors import ContractError
from edge_agent.quality.confusion import Confusion
from edge_agent.wire.telemetry_model import ModelStats
from edge_agent.wire.telemetry_shadow_flips import ShadowFlips, ShadowFlipStats, VersionFlips

GOOD = {"versions": [{"version": 7, "compared": 5, "agree": 3, "counts": [[2, 1], [1, 1]]}]}


def _with(**changes: Any) -> dict[str, Any]:
    entry = {**GOOD["versions"][0], **changes}
    return {"versions": [entry]}


def test_round_trip_and_absent_key() -> None:
    stats = ShadowFlipStats.from_dict(GOOD)
    assert stats.versions[7].flips.flips(top=1) == [(0, 1, 1)]
    assert stats.to_dict() == GOOD
    assert ShadowFlips.from_dict({}).shadow_flips is None
    assert ShadowFlips().to_dict() == {}  # older reports stay byte-identical


HOSTILE = {
    "not-object": [],
    "unknown-key": {**GOOD, "x": 1},
    "versions-not-list": {"versions": {}},
    "too-many-versions": {"versions": [GOOD["versions"][0]] * 3},
    "version-zero": _with(version=0),
    "agree-above-compared": _with(agree=6),
    "sum-mismatch": _with(compared=6),
    "trace-mismatch": _with(agree=2),
    "not-square": _with(counts=[[1, 2], [1]]),
    "negative": _with(counts=[[-1, 3], [1, 2]]),
    "too-many-classes": _with(counts=[[0] * 33 for _ in range(33)], compared=0, agree=0),
    "duplicate-version": {"versions": [GOOD["versions"][0], GOOD["versions"][0]]},
}


@pytest.mark.parametrize("raw", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_parts_are_refused(raw: Any) -> None:
    with pytest.raises(ContractError):
        ShadowFlipStats.from_dict(raw)


def test_from_status_is_tolerant() -> None:
    flips = Confusion.zero(3).add(0, 0).add(1, 2)
    status = {"version": 4, "flips": [list(r) for r in flips.counts], "agree_rows": 1}
    got = ShadowFlips.from_status({"shadow": status}).shadow_flips
    assert got == ShadowFlipStats({4: VersionFlips(2, 1, flips)})
    for bad in ({"version": None, "flips": [[1]]}, {"version": 4, "flips": None}, "x", None):
        assert ShadowFlips.from_status({"shadow": bad}).shadow_flips is None
    m = ModelStats.from_status({"version": 1, "shadow": status}, [])
    assert ModelStats.from_dict(m.to_dict()).shadow_flips == got
