"""Rollup cells are exact: any split of a report stream into buckets merges to the same totals,
and those totals are what a rollout observation computes from the raw rows."""

from __future__ import annotations

import base64
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from edge_agent.drift import TierASketch, build_baseline
from edge_agent.errors import ContractError
from fleet_server.history.cells import (
    WIDE,
    DriftPart,
    RawRow,
    RollupCell,
    fold_rows,
    merge_cells,
)
from fleet_server.history.queries import plan_range
from fleet_server.rollouts.observation import observe

T0 = datetime(2026, 6, 1, tzinfo=UTC)
_RNG = np.random.default_rng(3)
_BASE = build_baseline({"x": _RNG.normal(size=(300, 6))}, {"p": _RNG.random((300, 2))}, n_bins=5)
EDGES = _BASE.view("x", "input").edges


def _view(rng: np.random.Generator) -> str:
    sketch = TierASketch(EDGES)
    sketch.update(np.round(rng.normal(size=(int(rng.integers(5, 40)), 6)) * 3))
    return base64.b64encode(sketch.view().to_bytes()).decode()


def _stream(seed: int) -> list[RawRow]:
    """Two devices; counters restart, versions switch, drift sometimes, events, junk."""
    rng = np.random.default_rng(seed)
    rows: list[RawRow] = []
    state = {d: {"started": 1.0, "ok": 0, "rej": 0, "v": 1} for d in ("a", "b")}
    for i in range(60):
        for d, st in state.items():
            at = T0 + timedelta(seconds=30 * i + (d == "b"))
            if rng.random() < 0.05:
                st.update(started=st["started"] + 1, ok=0, rej=0)
            if rng.random() < 0.05:
                st["v"] = 3 - st["v"]
            st["ok"] += int(rng.integers(0, 9))
            st["rej"] += int(rng.integers(0, 2))
            stats: dict[str, Any] = {
                "version": st["v"],
                "outcomes": {"ok": st["ok"], "error": 0, "rejected": st["rej"]},
                "sources": {"device": st["ok"]},
                "latency_buckets": [st["ok"]] + [0] * 11,
                "rejects_by_reason": {"nan": st["rej"]},
            }
            if rng.random() < 0.5:
                stats["drift"] = [{"tensor": "x", "role": "input", "view": _view(rng)}]
            if rng.random() < 0.05:
                stats["drift"] = [{"tensor": "x", "role": "input", "view": "!!"}]
            payload = {"started_at": st["started"], "models": {"m": stats}}
            rows.append(RawRow(d, 2 * i + 1, "report", at, payload))
            if rng.random() < 0.03:
                ev = {"kind": "install_failed", "model": "m", "version": st["v"]}
                rows.append(RawRow(d, 2 * i + 2, "event", at, ev))
    return rows


def _fold_split(rows: list[RawRow], cuts: list[int]) -> dict[Any, RollupCell]:
    parts: list[tuple[Any, RollupCell]] = []
    bounds = [0, *sorted(cuts), len(rows)]
    for lo, hi in itertools.pairwise(bounds):
        previous = {}
        for r in rows[:lo]:
            if r.kind == "report":
                previous[r.device_id] = r.payload
        # Through the stored form, as the job writes and reads it.
        for key, cell in fold_rows(rows[lo:hi], previous, {"a": "g", "b": "g"}).items():
            doc = RollupCell.from_docs(
                cell.group,
                cell.metrics.max_psi,
                cell.metrics_doc(),
                cell.drift_doc(),
                cell.drift_blob(),
            )
            parts.append((key, doc))
    return merge_cells(parts)


@pytest.mark.parametrize("seed", range(12))
def test_any_bucket_split_merges_to_the_same_totals(seed: int) -> None:
    rows = _stream(seed)
    rng = np.random.default_rng(seed + 100)
    whole = _fold_split(rows, [])
    split = _fold_split(rows, [int(x) for x in rng.integers(1, len(rows), size=7)])
    assert set(whole) == set(split)
    for key, cell in whole.items():
        other = split[key]
        assert other.metrics == cell.metrics
        assert other.rejects == cell.rejects
        assert other.events == cell.events
        assert other.skipped == cell.skipped
        assert set(other.drift) == set(cell.drift)
        for part_key, part in cell.drift.items():
            got = other.drift[part_key]
            assert got.windows == part.windows
            assert np.array_equal(got.counts, part.counts)
            assert np.array_equal(got.count, part.count)
            assert np.allclose(got.sum, part.sum)
    # ... and equal to what a rollout observation computes from the raw rows.
    for device in ("a", "b"):
        for version in (1, 2):
            own = [r for r in rows if r.device_id == device]
            raw = observe(device, "m", version, T0, None, own)
            cell = whole.get((device, "m", version))
            assert (cell.metrics if cell else raw.metrics.__class__()) == raw.metrics


def test_a_part_with_other_edges_is_skipped_not_merged() -> None:
    rng = np.random.default_rng(1)
    other = build_baseline({"x": rng.normal(size=(300, 6)) * 9}, {}, n_bins=5).view("x", "input")
    cell = RollupCell("g")
    sketch = TierASketch(EDGES)
    sketch.update(rng.normal(size=(10, 6)))
    cell.add_drift("x", "input", DriftPart.of(sketch.view()))
    cell.add_drift("x", "input", DriftPart.of(other))
    assert cell.skipped == {"edges_mismatch": 1}
    assert cell.drift["x", "input"].windows == 1


@pytest.mark.parametrize(
    ("doc", "data"),
    [({}, b""), ({"shape": [2, 3], "edges": "e", "windows": 1}, b"x" * 8),
     ({"shape": [0, 3], "edges": "e", "windows": 1}, b""),
     ({"shape": [1, 1], "edges": "e", "windows": 1}, b"x" * 41),
     ({"shape": [1, 1], "edges": "e", "windows": 1, "ints": "<i2"}, b"x" * 22),
     ({"shape": [1, 1], "edges": "e", "windows": 1, "ints": ["<u1"]}, b"x" * 19),
     ({"shape": [1, 1], "edges": "e", "windows": 1, "ints": "<u1"}, b"x" * 40)],
)  # fmt: skip
def test_a_damaged_stored_part_is_a_typed_error(doc: dict[str, Any], data: bytes) -> None:
    with pytest.raises(ContractError):
        DriftPart.from_doc(doc, data)
    with pytest.raises(ContractError):
        RollupCell.from_docs("g", None, None, {"parts": [doc]}, data)


def _t(hhmm: str, day: int = 1) -> datetime:
    h, m = hhmm.split(":")
    return datetime(2026, 6, day, int(h), int(m), tzinfo=UTC)


@pytest.mark.parametrize(
    ("since", "until", "fine_done", "hour_done", "hours", "fine", "raw"),
    [
        # nothing folded yet: all raw, from the exact since
        (_t("10:03"), _t("11:03"), None, None, None, (), (_t("10:03"), _t("11:03"))),
        # last hour: 5-minute rollups, raw only after the folded part
        (_t("10:03"), _t("11:03"), _t("11:00"), _t("10:00"), None,
         ((_t("10:00"), _t("11:00")),), (_t("11:00"), _t("11:03"))),
        # ... and its whole hour from the hourly rollup once that is folded
        (_t("10:03"), _t("11:03"), _t("11:00"), _t("11:00"), (_t("10:00"), _t("11:00")), (),
         (_t("11:00"), _t("11:03"))),
        # folded only before the range: raw rows from the exact since
        (_t("10:03"), _t("11:03"), _t("10:00"), _t("10:00"), None, (),
         (_t("10:03"), _t("11:03"))),
        # until inside a folded bucket: the partial bucket before it comes from raw rows
        (_t("10:00"), _t("10:32"), _t("11:00"), _t("11:00"), None,
         ((_t("10:00"), _t("10:30")),), (_t("10:30"), _t("10:32"))),
        # a day: whole hours from hourly rollups, starting on the hour (range over 6 h)
        (_t("11:07", 1), _t("11:07", 2), _t("11:05", 2), _t("11:00", 2),
         (_t("11:00", 1), _t("11:00", 2)), ((_t("11:00", 2), _t("11:05", 2)),),
         (_t("11:05", 2), _t("11:07", 2))),
    ],
)  # fmt: skip
def test_plan_range(
    since: datetime,
    until: datetime,
    fine_done: datetime | None,
    hour_done: datetime | None,
    hours: Any,
    fine: Any,
    raw: Any,
) -> None:
    plan = plan_range(since, until, fine_done, hour_done)
    assert (plan.hours, plan.fine, plan.raw) == (hours, fine, raw)


@pytest.mark.parametrize(
    ("largest", "code"),
    [(0, "<u1"), (255, "<u1"), (256, "<u2"), (65_535, "<u2"), (65_536, "<u4"),
     (2**32 - 1, "<u4"), (2**32, WIDE), (2**62, WIDE), (-1, WIDE)],
)  # fmt: skip
def test_stored_integers_take_the_narrowest_exact_width(largest: int, code: str) -> None:
    rng = np.random.default_rng(5)
    sketch = TierASketch(EDGES)
    sketch.update(rng.normal(size=(30, 6)))
    part = DriftPart.of(sketch.view(), windows=3)
    part.counts = np.zeros_like(part.counts)
    part.counts[2, 1] = largest
    doc, data = part.to_doc("x", "input"), part.to_bytes()
    assert part.int_code() == code
    assert doc.get("ints", WIDE) == code
    assert len(data) == DriftPart.nbytes(6, EDGES.width, code)
    back = DriftPart.from_doc(doc, data)
    for name in ("counts", "nan", "count", "sum", "sumsq"):
        assert np.array_equal(getattr(back, name), getattr(part, name))
        assert getattr(back, name).dtype == getattr(part, name).dtype
    assert (back.digest, back.windows) == (part.digest, part.windows)


def test_a_part_stored_as_int64_before_still_decodes() -> None:
    rng = np.random.default_rng(6)
    sketch = TierASketch(EDGES)
    sketch.update(rng.normal(size=(30, 6)))
    part = DriftPart.of(sketch.view())
    old = {k: v for k, v in part.to_doc("x", "input").items() if k != "ints"}
    ints = np.concatenate([part.counts.ravel(), part.nan, part.count]).astype("<i8")
    data = ints.tobytes() + np.concatenate([part.sum, part.sumsq]).astype("<f8").tobytes()
    back = DriftPart.from_doc(old, data)
    assert np.array_equal(back.counts, part.counts)
    assert np.array_equal(back.sumsq, part.sumsq)
    assert len(part.to_bytes()) < len(data) / 2  # what the narrow form saves here
