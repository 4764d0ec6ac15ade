"""The parts of a telemetry report, one by one: each reads its own keys strictly, writes them back
unchanged, and builds tolerantly from ``Agent.status()`` (where a new field's cases go).

The whole report's parsing, golden bytes and builder are in ``test_telemetry.py``; the schema
agreement of every part in ``test_telemetry_schema.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

from edge_agent.errors import ContractError
from edge_agent.quality.confusion import Confusion
from edge_agent.wire.fields import Part
from edge_agent.wire.telemetry_drift import MAX_WINDOWS, DriftWindows
from edge_agent.wire.telemetry_ground_truth import (
    MAX_CLASSES,
    MAX_VERSIONS,
    GroundTruthCounts,
    GroundTruthStats,
)
from edge_agent.wire.telemetry_latency import (
    LATENCY_BUCKETS_MS,
    LATENCY_FINE_BUCKETS_MS,
    LatencyHistogram,
    LatencyQuantiles,
    coarse_from_fine,
)
from edge_agent.wire.telemetry_model import (
    MODEL_PARTS,
    ModelStats,
    RequestCounters,
    ServingState,
    ShadowComparison,
    ShadowStats,
)
from edge_agent.wire.telemetry_report import (
    MAX_MODELS,
    REPORT_PARTS,
    AgentState,
    ModelTable,
    ReportWindow,
    Resources,
)
from edge_agent.wire.telemetry_shadow_flips import ShadowFlips, ShadowFlipStats, VersionFlips

FINE = tuple(range(len(LATENCY_FINE_BUCKETS_MS) + 1))
#: One populated instance of every part.
PARTS: list[Any] = [
    ServingState(3, on_probation=True),
    RequestCounters({"ok": 5}, {"device": 5}, {"nan": 1}, {"range": 2}, {"a": 2, "b": 3}),
    LatencyHistogram(coarse_from_fine(FINE), FINE),
    LatencyHistogram((1,) * (len(LATENCY_BUCKETS_MS) + 1)),
    LatencyQuantiles({"p50": 1.5, "p99": 9.0}),
    DriftWindows(),
    ShadowComparison(ShadowStats({"offered": 4}, agreement=0.5)),
    GroundTruthCounts(GroundTruthStats({"counted": 3}, {2: Confusion(((2, 1), (0, 0)))})),
    ShadowFlips(ShadowFlipStats({3: VersionFlips(3, 2, Confusion(((2, 1), (0, 0))))})),
    ReportWindow(10.0, 70.0, 5.0),
    ModelTable({"digits": ModelStats(version=2)}),
    AgentState("0.1.0", {"device": 1}, Resources(1, 2.0, 3), {"report": 1}, 4),
]


def test_every_part_has_an_instance_here() -> None:
    listed: set[type[Part]] = {*MODEL_PARTS, *REPORT_PARTS}
    assert {type(p) for p in PARTS} == listed


@pytest.mark.parametrize("part", PARTS, ids=lambda p: type(p).__name__)
def test_a_part_reads_back_what_it_writes(part: Any) -> None:
    d = part.to_dict()
    assert set(d) <= set(part.KEYS)
    assert type(part).from_dict(d) == part
    # It reads only its own keys: the parent's other keys do not disturb it.
    assert type(part).from_dict({**d, "unrelated": [1, {"x": None}]}) == part


# (part, its keys with one field wrong) -> the strict reader refuses it
REFUSED: list[tuple[type[Any], dict[str, Any]]] = [
    (ServingState, {"version": -1}),
    (ServingState, {"version": 1, "on_probation": 1}),
    (RequestCounters, {"outcomes": {"ok": 1}, "rejects_by_reason": {}}),  # no dropped_rows
    (
        RequestCounters,
        {"outcomes": {"o k": 1}, "rejects_by_reason": {}, "dropped_rows_by_reason": {}},
    ),
    (
        RequestCounters,
        {"outcomes": {}, "rejects_by_reason": {}, "dropped_rows_by_reason": {}, "ab": []},
    ),
    (LatencyHistogram, {"latency_buckets": [0] * len(LATENCY_BUCKETS_MS)}),
    (LatencyHistogram, {"latency_buckets": [0] * 12, "latency_fine": list(FINE)}),  # disagree
    (LatencyHistogram, {"latency_buckets": [0] * 12, "latency_fine": [0] * 12}),
    (LatencyQuantiles, {"latency_ms": {"p50": -1.0}}),
    (LatencyQuantiles, {"latency_ms": []}),
    (DriftWindows, {"drift": {}}),
    (DriftWindows, {"drift": [None] * (MAX_WINDOWS + 1)}),
    (ShadowComparison, {"shadow": {"agreement": 0.5}}),  # no counts
    (GroundTruthCounts, {"ground_truth": []}),
    (GroundTruthCounts, {"ground_truth": {"versions": [{"version": 1, "counts": [[1, 2]]}]}}),
    (GroundTruthCounts, {"ground_truth": {"versions": [{"version": -1, "counts": [[1]]}]}}),
    (GroundTruthCounts, {"ground_truth": {"versions": [{"version": 1, "counts": [[-1]]}]}}),
    (GroundTruthCounts, {"ground_truth": {"versions": [{"version": 1, "counts": [[True]]}]}}),
    (GroundTruthCounts, {"ground_truth": {"versions": [{"version": 1}]}}),
    (GroundTruthCounts, {"ground_truth": {"versions": [{"version": 1, "counts": [[1]]}] * 2}}),
    (
        GroundTruthCounts,
        {"ground_truth": {"versions": [{"version": v, "counts": [[1]]} for v in range(4)]}},
    ),
    (
        GroundTruthCounts,
        {"ground_truth": {"versions": [{"version": 1, "counts": [[0] * 33 for _ in range(33)]}]}},
    ),
    (GroundTruthCounts, {"ground_truth": {"feedback": {"counted": -1}, "versions": []}}),
    (ShadowFlips, {"shadow_flips": []}),
    (ShadowFlips, {"shadow_flips": {"versions": [{"version": 1, "counts": [[1]]}]}}),
    (
        ShadowFlips,
        {
            "shadow_flips": {
                "versions": [{"version": 1, "compared": 2, "agree": 1, "counts": [[1]]}]
            }
        },
    ),
    (ReportWindow, {"window_start": 2.0, "window_end": 1.0}),
    (ReportWindow, {"window_start": 0.0, "window_end": 1.0, "started_at": -1.0}),
    (ModelTable, {"models": {f"m{i}": {} for i in range(MAX_MODELS + 1)}}),
    (ModelTable, {"models": {"bad name": ModelStats(version=1).to_dict()}}),
    (AgentState, {"resources": {"rss_bytes": 0, "cpu_seconds": 0}}),  # no telemetry_dropped
    (AgentState, {"resources": {}, "telemetry_dropped": {}}),
    (
        AgentState,
        {"resources": Resources().to_dict(), "telemetry_dropped": {}, "agent_version": "v" * 65},
    ),
]


@pytest.mark.parametrize(("cls", "d"), REFUSED, ids=lambda x: getattr(x, "__name__", ""))
def test_a_part_refuses_a_bad_value(cls: type[Any], d: dict[str, Any]) -> None:
    with pytest.raises(ContractError):
        cls.from_dict(d)


GARBAGE: list[Any] = [{}, {"version": "3", "requests": -1, "latency": [], "shadow": 7}]


@pytest.mark.parametrize("m", GARBAGE)
def test_from_status_is_tolerant(m: dict[str, Any]) -> None:
    assert ServingState.from_status(m) == ServingState(0, False)
    assert RequestCounters.from_status(m) == RequestCounters({"ok": 0, "error": 0, "rejected": 0})
    assert LatencyHistogram.from_status(m) == LatencyHistogram()
    assert LatencyQuantiles.from_status(m) == LatencyQuantiles()
    assert ShadowComparison.from_status(m) == ShadowComparison(None)
    assert GroundTruthCounts.from_status(m) == GroundTruthCounts(None)
    assert ModelStats.from_status(m, []) == ModelStats(
        version=0, outcomes={"ok": 0, "error": 0, "rejected": 0}
    )


def test_ground_truth_from_status_keeps_what_fits_the_wire() -> None:
    big = Confusion.zero(MAX_CLASSES + 1).to_dict()
    raw = {
        "feedback": {"counted": 4, "bad key": 1, "expired": -2},
        "confusion": {
            **{str(v): Confusion.zero(2).add(0, 1).to_dict() for v in range(1, MAX_VERSIONS + 2)},
            "9": big,  # too many classes for the wire
            "x": Confusion.zero(2).to_dict(),  # not a version
            "7": {"counts": [[1, 2]]},  # not square
        },
    }
    got = GroundTruthCounts.from_status({"ground_truth": raw}).ground_truth
    assert got is not None
    assert got.feedback == {"counted": 4}
    assert sorted(got.confusion) == list(range(2, MAX_VERSIONS + 2))  # the newest ones


def test_from_status_builds_each_part() -> None:
    m = {
        "version": 4,
        "on_probation": True,
        "requests": 10,
        "errors": 1,
        "rejects_by_reason": {"nan": 2, "bad key": 1},
        "ab": {"a": 6},
        "latency_fine": list(FINE),
        "latency_buckets": [9] * 12,  # ignored: the coarse histogram is derived from the fine one
        "latency": {"p50_ms": 1.25, "p99_ms": float("nan")},
        "shadow": {"offered": 3, "agreement": 0.75, "live_p50_ms": "x"},
    }
    assert ServingState.from_status(m) == ServingState(4, True)
    counters = RequestCounters.from_status(m)
    assert counters.outcomes == {"ok": 7, "error": 1, "rejected": 2}
    assert counters.rejects_by_reason == {"nan": 2}
    assert counters.ab == {"a": 6}
    assert LatencyHistogram.from_status(m) == LatencyHistogram(coarse_from_fine(FINE), FINE)
    assert LatencyQuantiles.from_status(m) == LatencyQuantiles({"p50": 1.25})
    assert ShadowComparison.from_status(m) == ShadowComparison(
        ShadowStats({"offered": 3}, agreement=0.75)
    )
