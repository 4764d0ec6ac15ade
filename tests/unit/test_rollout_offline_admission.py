"""The offline admission (pure) and its policy limits, and the compatibility of stored rollouts.

``admit_offline`` passes an equal candidate, refuses a regression unless overridden (and records
the override), ``offline_failed`` needs an override too; the policy's ``offline`` limits are
validated and a policy or rollout stored before they existed reads back with the defaults and
still saves (the compare-and-set compares both sides through the codec).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import update

from edge_agent.quality.compare import ModelComparison, compare_models, judge
from fleet_server.errors import (
    OfflineCheckError,
    OfflineRegressionError,
    RolloutPolicyError,
)
from fleet_server.registry import rollouts as store
from fleet_server.registry.store import Registry
from fleet_server.registry.tables.rollouts import RolloutRow
from fleet_server.rollouts.admission import Override
from fleet_server.rollouts.offline import (
    admit_offline,
    offline_failed,
    offline_limits,
    offline_skipped,
)
from fleet_server.rollouts.policy import OfflineLimits, RolloutPolicy, Selector
from fleet_server.rollouts.state import OfflineCheck, Rollout

T0 = datetime(2026, 12, 7, tzinfo=UTC)
TRUTH = np.repeat(np.arange(4), 50)


def _comparison(flip: int) -> ModelComparison:
    """The champion is always right; the challenger answers class 1 for ``flip`` of class 0."""
    challenger = TRUTH.copy()
    challenger[:flip] = 1
    return compare_models(TRUTH, TRUTH, challenger, 4)


def _admit(flip: int, override: str = "") -> tuple[OfflineCheck, Override | None]:
    c = _comparison(flip)
    return admit_offline(
        "digits",
        1,
        2,
        eval_set="ab" * 32,
        comparison=c,
        verdict=judge(c, offline_limits(RolloutPolicy())),
        override=override,
    )


def test_an_equal_candidate_passes() -> None:
    check, used = _admit(0, override="not needed")
    assert used is None  # nothing to override: nothing recorded
    assert (check.verdict, check.n, check.disagreement) == ("passed", 200, 0.0)
    assert check.override == ""
    assert ModelComparison.from_dict(dict(check.comparison or {})) == _comparison(0)


def test_a_regression_is_refused_naming_the_class() -> None:
    with pytest.raises(OfflineRegressionError) as err:
        _admit(30)
    assert "class 0 recall" in str(err.value)
    assert "as class 1" in str(err.value)
    assert err.value.reasons


def test_a_regression_with_an_override_records_it() -> None:
    check, used = _admit(30, override="  class 0 is rare on this line ")
    assert used == Override("offline", "class 0 is rare on this line")
    assert check.verdict == "overridden"
    assert check.override == "class 0 is rare on this line"
    assert check.reasons
    assert check.disagreement == pytest.approx(30 / 200)
    with pytest.raises(RolloutPolicyError):
        _admit(30, override="bad\x1breason")


def test_a_comparison_that_cannot_run_needs_an_override() -> None:
    with pytest.raises(OfflineCheckError, match="cannot run: the set is 8x8"):
        offline_failed("digits", 2, eval_set="cd" * 32, problem="the set is 8x8")
    check, used = offline_failed("digits", 2, eval_set="cd" * 32, problem="p", override="ok")
    assert used == Override("offline", "ok")
    assert (check.verdict, check.reasons) == ("overridden", ("comparison failed: p",))


def test_skipped_verdicts() -> None:
    for v in ("no_eval_set", "no_champion", "disabled"):
        assert offline_skipped(v) == OfflineCheck(verdict=v)
    with pytest.raises(ValueError, match="not a skipped"):
        offline_skipped("passed")


def test_offline_limits_in_the_policy() -> None:
    p = RolloutPolicy.from_dict({"offline": {"max_accuracy_drop": 0.03, "min_samples": 10}})
    limits = offline_limits(p)
    assert (limits.max_accuracy_drop, limits.max_recall_drop, limits.min_samples) == (
        0.03,
        0.05,
        10,
    )
    assert RolloutPolicy.from_dict(p.to_dict()) == p
    assert RolloutPolicy.from_dict({}).offline == OfflineLimits()  # stored before: defaults
    for bad in (
        {"offline": {"max_accuracy_drop": 2}},
        {"offline": {"min_samples": 0}},
        {"offline": {"min_samples": True}},
        {"offline": {"enabled": "yes"}},
        {"offline": {"surprise": 1}},
        {"offline": []},
    ):
        with pytest.raises(RolloutPolicyError):
            RolloutPolicy.from_dict(bad)


def test_offline_check_round_trips_and_refuses_unknown_verdicts() -> None:
    check, _ = _admit(30, override="why")
    assert OfflineCheck.from_dict(check.to_dict()) == check
    with pytest.raises(ValueError, match="unknown offline verdict"):
        OfflineCheck.from_dict({"verdict": "great"})


def test_a_rollout_stored_before_the_offline_fields_reads_and_saves(tmp_path: Path) -> None:
    reg = Registry.open(f"sqlite:///{tmp_path / 'r.db'}")
    reg.upgrade()
    r = Rollout(
        id="ro-old",
        model="digits",
        from_version=1,
        to_version=2,
        selector=Selector(group="line"),
        policy=RolloutPolicy(),
        created_at=T0,
        updated_at=T0,
    )
    store.create_rollout(reg, r, T0)
    # The document as an older server stored it: no "offline" in the policy or the rollout.
    doc = store.rollout_to_dict(r)
    del doc["policy"]["offline"]
    assert "offline" not in doc
    with reg.write_session("test") as s:
        s.execute(update(RolloutRow).where(RolloutRow.id == r.id).values(state_doc=doc))
    old = store.get_rollout(reg, r.id)
    assert old.offline is None
    assert old.policy.offline == OfflineLimits()
    store.save_rollout(reg, old, T0, [("paused", {})], read=old)  # no RolloutConflictError
    reg.close()


def test_status_shows_the_check_with_hostile_text_escaped() -> None:
    from fleet_server.cli.rollouts import render_offline

    check, _ = _admit(30, override="ok")  # the API refuses such a reason; a forged record
    doc = {"offline": {**check.to_dict(), "override": "ok \u202e\x1b[2J"}}
    lines = render_offline(doc)
    assert lines[0].startswith("offline REGRESSED, overridden on evaluation set abababababab")
    assert "accuracy 100.0% -> 85.0%" in lines[0]
    assert "disagreement 15.0%" in lines[0]
    assert any("class 0 recall" in line for line in lines)
    assert lines[-1] == "  override: ok \\u202e\\x1b[2J"
    assert all(c.isprintable() for line in lines for c in line)
    assert render_offline({"id": "ro-old"}) == []  # created before the check: nothing shown
    assert render_offline({"offline": {"verdict": "no_eval_set"}}) == ["offline no evaluation set"]
