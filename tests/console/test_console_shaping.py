"""The console's pure parts: form and query parsers (tables and properties: anything a browser
can send gives a value or a typed error), the telemetry series, the gate history, bounded rows."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_server.console.pages_fleet import device_filter
from fleet_server.console.pages_release import create_body
from fleet_server.console.shaping import (
    clip,
    device_series,
    flat_rows,
    gate_history,
    policy_fields,
    policy_from_form,
)
from fleet_server.errors import AdminInputError, RolloutPolicyError
from fleet_server.registry.values import StoredTelemetry
from fleet_server.rollouts.policy import RolloutPolicy

NOW = datetime(2026, 3, 1, tzinfo=UTC)


def test_the_default_form_gives_the_default_policy() -> None:
    form = {f.name: f.default for f in policy_fields()}
    assert RolloutPolicy.from_dict(policy_from_form(form)) == RolloutPolicy()


def test_empty_nullable_fields_turn_options_off_and_others_keep_defaults() -> None:
    form = {f.name: f.default for f in policy_fields()}
    form |= {"thresholds.max_p99_latency_ratio": "", "shadow_fraction": "", "dwell_seconds": ""}
    form.pop("approval")  # an unticked checkbox is not sent
    p = RolloutPolicy.from_dict(policy_from_form(form))
    assert p.thresholds.max_p99_latency_ratio is None
    assert p.shadow_fraction is None
    assert p.dwell_seconds == RolloutPolicy().dwell_seconds
    assert p.approval is False


@pytest.mark.parametrize(
    ("name", "value"),
    [("canary_fraction", "lots"), ("min_devices", "2.5"), ("z", "nan"), ("steps", "a,b"),
     ("thresholds.max_rollback_rate", "inf")],
)  # fmt: skip
def test_a_malformed_number_names_its_field(name: str, value: str) -> None:
    with pytest.raises(RolloutPolicyError, match=name.replace(".", r"\.")):
        policy_from_form({name: value})


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from([f.name for f in policy_fields()] + ["x"]), st.text()))
def test_any_policy_form_gives_a_policy_or_a_policy_error(form: dict[str, str]) -> None:
    try:
        RolloutPolicy.from_dict(policy_from_form(form))
    except RolloutPolicyError:
        pass
    except (TypeError, ValueError, OverflowError, ArithmeticError):
        pass  # the console maps these to RolloutPolicyError as the API route does


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["model", "version", "from_version", "target",
                                        "selector", "override_aborted"]), st.text()))  # fmt: skip
def test_any_create_form_gives_a_body_or_a_policy_error(form: dict[str, str]) -> None:
    try:
        body = create_body(form)
    except RolloutPolicyError:
        return
    assert isinstance(body["version"], int)
    assert ("group" in body) != ("tags" in body)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["group", "tag", "state", "version", "page"]), st.text()))
def test_any_device_query_gives_a_filter_or_an_input_error(params: dict[str, str]) -> None:
    try:
        shown, f, state = device_filter(params)
    except AdminInputError:
        return
    assert f.limit == 50
    assert f.offset == (shown.page - 1) * 50
    assert state in (None, "online", "offline")


def test_device_query_table() -> None:
    _, f, state = device_filter({"group": "g", "tag": "site=a=b", "version": "digits@7",
                                 "state": "revoked", "page": "3"})  # fmt: skip
    assert (f.group, f.tag, f.model, f.version, f.revoked, f.offset) == (
        "g", ("site", "a=b"), "digits", 7, True, 100)  # fmt: skip
    assert state is None
    assert device_filter({"state": "online"})[2] == "online"
    assert device_filter({"version": "digits"})[1].version is None
    for bad in ({"tag": "=x"}, {"version": "d@²"}, {"state": "x"}, {"group": "a\x00"},
                {"page": "-1"}, {"version": "d@" + "9" * 19}):  # fmt: skip
        with pytest.raises(AdminInputError):
            device_filter(bad)


def _report(seq: int, end: float, total: int, cloud: int, rejected: int, started: float,
            p99: float | None = None) -> StoredTelemetry:  # fmt: skip
    model: dict[str, object] = {
        "outcomes": {"ok": total - rejected, "error": 0, "rejected": rejected},
        "sources": {"device": total - cloud, "cloud": cloud},
    }
    if p99 is not None:
        model["latency_ms"] = {"p50": 1.0, "p99": p99}
    payload = {"window_end": end, "started_at": started, "models": {"digits": model}}
    return StoredTelemetry(seq, "dev-1", seq, "report", NOW, payload)


def test_series_are_per_window_differences_and_restart_with_the_agent() -> None:
    rows = [
        _report(1, 100.0, 100, 10, 2, 1.0, p99=5.0),
        _report(2, 160.0, 250, 40, 2, 1.0, p99=7.0),
        _report(3, 220.0, 30, 3, 1, 200.0),  # the agent restarted: counters from zero
    ]
    s = device_series(rows)
    [req] = s.requests
    assert req.points == ((100.0, 100.0), (160.0, 150.0), (220.0, 30.0))
    assert s.rejects[0].points == ((100.0, 2.0), (160.0, 0.0), (220.0, 1.0))
    assert s.fallback[0].points == ((100.0, 0.1), (160.0, 0.2), (220.0, 0.1))
    assert s.latency[0].points == ((100.0, 5.0), (160.0, 7.0))


def test_malformed_reports_are_skipped_not_raised() -> None:
    bad = [
        StoredTelemetry(1, "d", 1, "report", NOW, {"models": "x"}),
        StoredTelemetry(2, "d", 2, "report", NOW, {"window_end": "soon", "models": {}}),
        StoredTelemetry(3, "d", 3, "report", NOW,
                        {"window_end": 1.0, "models": {"m": {"outcomes": {"ok": "many"}}}}),
    ]  # fmt: skip
    s = device_series(bad)
    assert s.requests[0].points == ((1.0, 0.0),)
    assert s.fallback == ()


def test_gate_history_follows_the_decision_log() -> None:
    events = [
        {"at": "2026-03-01T12:00:00+00:00", "kind": "created", "detail": {}},
        {"at": "2026-03-01T12:01:00+00:00", "kind": "decision",
         "detail": {"gates": [{"name": "rollbacks", "measured": 0.0, "threshold": 0.1}]}},
        {"at": "2026-03-01T12:02:00+00:00", "kind": "decision",
         "detail": {"gates": [{"name": "rollbacks", "measured": 0.5, "threshold": 0.1},
                              {"name": "p99", "measured": None, "threshold": 1.5}]}},
        {"at": "not a time", "kind": "decision", "detail": {"gates": "junk"}},
    ]  # fmt: skip
    h = gate_history(events)
    measured, limit = h["rollbacks"]
    assert [v for _, v in measured.points] == [0.0, 0.5]
    assert [v for _, v in limit.points] == [0.1, 0.1]
    assert limit.dashed
    assert h["p99"][0].points == ()


def test_rows_and_text_are_bounded() -> None:
    deep: dict[str, object] = {"x": "y" * 10_000}
    for _ in range(20):
        deep = {"k": deep, **{f"f{i}": i for i in range(50)}}
    rows = flat_rows(deep)
    assert len(rows) <= 200
    assert all(len(k) <= 120 and len(v) <= 200 for k, v in rows)
    assert clip("abc", 2) == "a…"
