"""Cloud fallback: routing policy, circuit breaker, per-minute budget, guarded calls."""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping

import numpy as np
import pytest

from clock import FakeClock
from edge_agent.config import FallbackConfig
from edge_agent.contract import OutputContract
from edge_agent.errors import ConfigError, ContractError, FallbackError
from edge_agent.serving.fallback import (
    FAILURES,
    CircuitBreaker,
    CloudFallback,
    CloudFallbackError,
    Decision,
    FallbackPolicy,
    MinuteBudget,
    Tensors,
    UnavailableTransport,
)
from edge_agent.serving.routing import LOCAL, Route, Router

CLASSIFIER = OutputContract(
    task="classification", outputs=("probs",), labels=("a", "b", "c"), score_output="probs"
)
LOGITS = OutputContract(
    task="classification",
    outputs=("logits",),
    labels=("a", "b", "c"),
    score_output="logits",
    score_kind="logits",
)
BINARY = OutputContract(
    task="classification", outputs=("p",), labels=("neg", "pos"), score_output="p"
)
REGRESSOR = OutputContract(task="regression", outputs=("y",))


class FakeTransport:
    """Implements ``FallbackTransport``: answers, raises, or takes simulated time."""

    def __init__(self, clock: FakeClock, *, takes_s: float = 0.01) -> None:
        self.clock = clock
        self.takes_s = takes_s
        self.error: Exception | None = None
        self.calls: list[tuple[str, float, str]] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def request(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        deadline_s: float,
        reason: str,
        device_outputs: Tensors | None = None,
        model_version: int | None = None,
    ) -> Tensors:
        self.calls.append((model, deadline_s, reason))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        self.clock.advance(self.takes_s)
        if self.error is not None:
            raise self.error
        return {"probs": np.asarray([[0.1, 0.9]], dtype=np.float32)}


def policy(mode: str, contract: OutputContract = CLASSIFIER, **kw: float) -> FallbackPolicy:
    return FallbackPolicy(FallbackConfig(mode=mode, **kw), contract)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- policy: before
CONDITIONS = {
    "healthy": {"local_ok": True, "validation_failed": False, "out_of_distribution": False},
    "local_down": {"local_ok": False, "validation_failed": False, "out_of_distribution": False},
    "invalid": {"local_ok": True, "validation_failed": True, "out_of_distribution": False},
    "ood": {"local_ok": True, "validation_failed": False, "out_of_distribution": True},
    "everything": {"local_ok": False, "validation_failed": True, "out_of_distribution": True},
    "invalid_and_ood": {"local_ok": True, "validation_failed": True, "out_of_distribution": True},
}
EXPECTED_BEFORE = {
    "cloud_only": dict.fromkeys(CONDITIONS, "cloud_only"),
    "prefer_cloud": dict.fromkeys(CONDITIONS, "prefer_cloud"),
    "device_only": dict.fromkeys(CONDITIONS),
    "prefer_device": {
        "healthy": None,
        "local_down": "local_unavailable",
        "invalid": "invalid_input",
        "ood": "out_of_distribution",
        "everything": "local_unavailable",
        "invalid_and_ood": "invalid_input",
    },
}


@pytest.mark.parametrize(
    ("mode", "condition", "reason"),
    [(m, c, r) for m, table in EXPECTED_BEFORE.items() for c, r in table.items()],
)
def test_before_every_mode_and_condition(mode: str, condition: str, reason: str | None) -> None:
    # The mode's rule is the router's (it was FallbackPolicy.before): same table.
    decision = Router(mode, cloud=True).before(**CONDITIONS[condition])
    assert decision == Decision(cloud=reason is not None, reason=reason)


def test_policy_rejects_invalid_config() -> None:
    with pytest.raises(ConfigError):
        policy("sometimes")


# ----------------------------------------------------------------------------- policy: after
def _uniform(n: int) -> list[float]:
    return [1.0 / n] * n


# Normalised entropy of [0.5, 0.3, 0.2] is 1.0297 / ln 3 = 0.9372.
CASES = [
    # (name, contract, rows, min_confidence, max_entropy, expected reason, hard rows)
    ("confident", CLASSIFIER, [[0.9, 0.05, 0.05]], 0.6, 0.9, None, 0),
    ("low_confidence", CLASSIFIER, [[0.5, 0.3, 0.2]], 0.6, 1.0, "low_confidence", 1),
    ("at_threshold_is_ok", CLASSIFIER, [[0.6, 0.3, 0.1]], 0.6, 1.0, None, 0),
    ("high_entropy", CLASSIFIER, [[0.5, 0.3, 0.2]], 0.0, 0.9, "high_entropy", 1),
    ("entropy_under_limit", CLASSIFIER, [[0.5, 0.3, 0.2]], 0.0, 0.95, None, 0),
    ("uniform_not_over_1", CLASSIFIER, [_uniform(3)], 0.0, 1.0, None, 0),
    ("confidence_wins", CLASSIFIER, [[0.4, 0.3, 0.3]], 0.5, 0.5, "low_confidence", 1),
    (
        "worst_row_decides",
        CLASSIFIER,
        [[0.98, 0.01, 0.01]] * 3 + [[0.4, 0.4, 0.2]],
        0.5,
        1,
        "low_confidence",
        1,
    ),
    ("all_rows_fine", CLASSIFIER, [[0.98, 0.01, 0.01], [0.01, 0.9, 0.09]], 0.8, 0.7, None, 0),
    (
        "mixed_reasons",
        CLASSIFIER,
        [[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]],
        0.5,
        0.7,  # row 1: entropy 0.73 > 0.7; row 2: confidence 0.4 < 0.5
        "low_confidence",
        2,
    ),
    (
        "nan_row",
        CLASSIFIER,
        [[0.9, 0.05, 0.05], [math.nan, 0.5, 0.5]],
        0.0,
        1.0,
        "invalid_output",
        1,
    ),
    ("zero_mass_row", CLASSIFIER, [[0.0, 0.0, 0.0]], 0.0, 1.0, "invalid_output", 1),
    ("renormalised", CLASSIFIER, [[0.45, 0.025, 0.025]], 0.85, 1.0, None, 0),
    # softmax([4, 0, 0]) = [0.9647, 0.0177, 0.0177]; softmax([1, 0, 0]) = [0.5761, 0.2119, 0.2119]
    ("logits_confident", LOGITS, [[4.0, 0.0, 0.0]], 0.9, 0.3, None, 0),
    ("logits_low_confidence", LOGITS, [[1.0, 0.0, 0.0]], 0.6, 1.0, "low_confidence", 1),
    ("logits_high_entropy", LOGITS, [[1.0, 0.0, 0.0]], 0.0, 0.8, "high_entropy", 1),
    ("logits_huge_no_overflow", LOGITS, [[1000.0, -1000.0, 0.0]], 0.99, 0.01, None, 0),
    ("logits_inf", LOGITS, [[math.inf, 0.0, 0.0]], 0.0, 1.0, "invalid_output", 1),
    ("binary_column_confident", BINARY, [[0.95], [0.03]], 0.9, 1.0, None, 0),
    ("binary_column_unsure", BINARY, [[0.95], [0.55]], 0.9, 1.0, "low_confidence", 1),
    ("one_dim_is_one_row", CLASSIFIER, [0.5, 0.3, 0.2], 0.6, 1.0, "low_confidence", 1),
    ("empty_batch", CLASSIFIER, np.zeros((0, 3)), 0.9, 0.1, None, 0),
]


@pytest.mark.parametrize(
    ("contract", "rows", "min_confidence", "max_entropy", "reason", "hard"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_after_thresholds(
    contract: OutputContract,
    rows: object,
    min_confidence: float,
    max_entropy: float,
    reason: str | None,
    hard: int,
) -> None:
    p = policy("prefer_device", contract, min_confidence=min_confidence, max_entropy=max_entropy)
    scores = np.asarray(rows, dtype=np.float32)
    decision = p.after({contract.score_output or "": scores})
    assert decision == Decision(cloud=reason is not None, reason=reason, hard_rows=hard)


@pytest.mark.parametrize("mode", ["device_only", "prefer_cloud", "cloud_only"])
def test_after_only_checks_in_prefer_device(mode: str) -> None:
    # Whether the mode looks for hard examples at all is the router's decision (the policy
    # re-decided it before): a doubtful answer in another mode does not go to the cloud.
    p = policy(mode, min_confidence=0.99, max_entropy=0.01)
    route = Router(mode, cloud=True).after_local_answer(
        Route(LOCAL),
        cloud_failed=False,
        set_up=True,
        out_of_distribution=lambda: False,
        hard=lambda: p.after({"probs": np.asarray([_uniform(3)], np.float32)}),
    )
    assert route == Route(LOCAL)


def test_after_ignores_regression() -> None:
    p = policy("prefer_device", REGRESSOR, min_confidence=0.99, max_entropy=0.01)
    assert p.after({"y": np.asarray([[0.1]], np.float32)}) == Decision(cloud=False)


@pytest.mark.parametrize(
    "outputs",
    [{"other": np.zeros((1, 3))}, {"probs": np.float32(0.5)}, {"probs": np.zeros((2, 0))}],
    ids=["missing", "scalar", "no_classes"],
)
def test_after_structural_problems_raise(outputs: Tensors) -> None:
    with pytest.raises(ContractError):
        policy("prefer_device", min_confidence=0.5).after(outputs)


def test_after_is_vectorised_over_a_large_batch() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(10, 0.05), size=5000).astype(np.float32)
    expected_low = int((probs.astype(np.float64).max(axis=1) < 0.5).sum())
    decision = policy("prefer_device", min_confidence=0.5).after({"probs": probs})
    assert decision.reason == "low_confidence"
    assert decision.hard_rows == expected_low


# ---------------------------------------------------------------------------- circuit breaker
def test_breaker_closed_open_half_open_closed() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures=3, reset_seconds=30, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state == "closed"
    breaker.record_success()  # a success resets the run of failures
    for _ in range(3):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state == "open"
    assert not breaker.allow()
    clock.advance(29.9)
    assert breaker.state == "open"
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.state == "half_open"
    assert breaker.allow()  # the one trial
    assert not breaker.allow()  # nobody else while it is out
    breaker.record_success()
    assert breaker.state == "closed"
    assert breaker.allow()
    assert breaker.allow()
    stats = breaker.stats()
    assert stats["opened"] == 1
    assert stats["rejected"] == 3
    assert stats["trials"] == 1
    assert stats["failures"] == 5
    assert stats["successes"] == 2


def test_breaker_half_open_failure_reopens_for_a_full_period() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures=1, reset_seconds=10, clock=clock)
    breaker.record_failure()
    assert breaker.state == "open"
    clock.advance(10)
    assert breaker.allow()
    clock.advance(5)
    breaker.record_failure()
    assert breaker.state == "open"
    clock.advance(9.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.state == "half_open"
    assert breaker.stats()["opened"] == 2


def test_breaker_released_trial_can_be_claimed_again() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures=1, reset_seconds=1, clock=clock)
    breaker.record_failure()
    clock.advance(1)
    assert breaker.allow()
    breaker.release()
    assert breaker.state == "half_open"
    assert breaker.allow()
    assert not breaker.allow()


def test_breaker_half_open_admits_one_of_many_concurrent_callers() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures=1, reset_seconds=5, clock=clock)
    breaker.record_failure()
    clock.advance(5)
    n = 32
    barrier = threading.Barrier(n)
    results: list[bool] = []
    lock = threading.Lock()

    def caller() -> None:
        barrier.wait()
        allowed = breaker.allow()
        with lock:
            results.append(allowed)

    threads = [threading.Thread(target=caller) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == n
    assert results.count(True) == 1


@pytest.mark.parametrize(("failures", "reset"), [(0, 1.0), (1, -1.0)])
def test_breaker_rejects_bad_settings(failures: int, reset: float) -> None:
    with pytest.raises(ConfigError):
        CircuitBreaker(failures, reset, FakeClock())


# ----------------------------------------------------------------------------- minute budget
def test_budget_allows_max_per_sliding_minute() -> None:
    clock = FakeClock()
    budget = MinuteBudget(3, clock)
    assert [budget.try_spend() for _ in range(4)] == [True, True, True, False]
    clock.advance(30)
    assert not budget.try_spend()
    assert budget.remaining() == 0
    clock.advance(29.999)
    assert not budget.try_spend()
    clock.advance(0.001)  # the first three calls are now exactly a minute old
    assert budget.remaining() == 3
    assert budget.try_spend()
    clock.advance(10)
    assert budget.try_spend()
    assert budget.try_spend()
    assert not budget.try_spend()
    assert budget.denied == 4


def test_budget_is_sliding_not_per_calendar_minute() -> None:
    clock = FakeClock(0.0)
    budget = MinuteBudget(2, clock)
    clock.advance(59)
    assert budget.try_spend()
    assert budget.try_spend()
    clock.advance(2)  # a fixed-window limiter would start a new minute here
    assert not budget.try_spend()


def test_budget_zero_denies_everything() -> None:
    budget = MinuteBudget(0, FakeClock())
    assert not budget.try_spend()
    with pytest.raises(ConfigError):
        MinuteBudget(-1, FakeClock())


def test_budget_is_thread_safe() -> None:
    budget = MinuteBudget(500, FakeClock())
    granted: list[bool] = []
    lock = threading.Lock()

    def spend() -> None:
        mine = [budget.try_spend() for _ in range(100)]
        with lock:
            granted.extend(mine)

    threads = [threading.Thread(target=spend) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert granted.count(True) == 500


# ----------------------------------------------------------------------------- cloud fallback
def cloud(clock: FakeClock, transport: object, **kw: float) -> CloudFallback:
    cfg = FallbackConfig(mode="prefer_device", **kw)  # type: ignore[arg-type]
    return CloudFallback(transport, cfg, clock)  # type: ignore[arg-type]


X = {"input": np.zeros((1, 4), np.float32)}


def test_cloud_success_passes_deadline_and_reason() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock)
    fb = cloud(clock, transport, deadline_ms=200)
    answer = fb.call("digits", X, "low_confidence")
    assert answer["probs"].shape == (1, 2)
    assert transport.calls == [("digits", pytest.approx(0.2), "low_confidence")]
    fb.call("digits", X, "low_confidence", deadline_s=0.05)
    assert transport.calls[-1][1] == pytest.approx(0.05)
    fb.call("digits", X, "invalid_input", deadline_s=5.0)  # the config caps the caller
    assert transport.calls[-1][1] == pytest.approx(0.2)
    stats = fb.stats()
    assert stats["requests"] == 3
    assert stats["ok"] == 3
    assert stats["failed"] == 0
    assert stats["by_reason"] == {"low_confidence": 2, "invalid_input": 1}
    assert set(stats["failures"]) == set(FAILURES)
    assert stats["breaker"]["state"] == "closed"


def _failure(fb: CloudFallback, **kw: float) -> CloudFallbackError:
    with pytest.raises(CloudFallbackError) as info:
        fb.call("digits", X, "low_confidence", **kw)
    assert isinstance(info.value, FallbackError)
    return info.value


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (FallbackError("broker unreachable"), "transport_error"),
        (CloudFallbackError("mqtt expiry passed", reason="deadline"), "deadline"),
        (ConnectionResetError("peer reset"), "transport_error"),
        (RuntimeError("bug in a transport"), "transport_error"),
    ],
)
def test_cloud_transport_errors_are_typed(error: Exception, reason: str) -> None:
    clock = FakeClock()
    transport = FakeTransport(clock)
    transport.error = error
    fb = cloud(clock, transport)
    assert _failure(fb).reason == reason
    stats = fb.stats()
    assert stats["failures"][reason] == 1
    assert stats["breaker"]["failures"] == 1


def test_cloud_late_answer_is_a_deadline_failure() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock, takes_s=0.3)
    fb = cloud(clock, transport, deadline_ms=250, breaker_failures=2)
    assert _failure(fb).reason == "deadline"
    assert _failure(fb).reason == "deadline"
    assert fb.breaker.state == "open"  # late answers count against the cloud
    transport.takes_s = 0.25  # exactly on the deadline is in time
    clock.advance(31)
    fb.call("digits", X, "low_confidence")
    assert fb.breaker.state == "closed"


def test_cloud_no_time_left_does_not_call() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock)
    fb = cloud(clock, transport)
    assert _failure(fb, deadline_s=0.0).reason == "deadline"
    assert transport.calls == []
    assert fb.breaker.stats()["failures"] == 0


def test_cloud_breaker_opens_after_n_failures_then_recovers() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock)
    transport.error = FallbackError("down")
    fb = cloud(clock, transport, breaker_failures=3, breaker_reset_seconds=30)
    for _ in range(3):
        assert _failure(fb).reason == "transport_error"
    assert len(transport.calls) == 3
    for _ in range(5):
        assert _failure(fb).reason == "breaker_open"
    assert len(transport.calls) == 3  # an open breaker never reaches the transport
    clock.advance(30)
    assert _failure(fb).reason == "transport_error"  # the half-open trial fails
    assert fb.breaker.state == "open"
    clock.advance(30)
    transport.error = None
    fb.call("digits", X, "low_confidence")
    assert fb.breaker.state == "closed"
    stats = fb.stats()
    assert stats["failures"]["breaker_open"] == 5
    assert stats["failures"]["transport_error"] == 4
    assert stats["ok"] == 1
    assert stats["breaker"]["opened"] == 2


def test_cloud_half_open_sends_one_trial_with_concurrent_callers() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock)
    transport.error = FallbackError("down")
    fb = cloud(clock, transport, breaker_failures=1, breaker_reset_seconds=10)
    _failure(fb)
    clock.advance(10)
    transport.error = None
    transport.gate = threading.Event()
    transport.entered.clear()
    outcomes: list[str] = []

    def trial() -> None:
        fb.call("digits", X, "low_confidence")
        outcomes.append("ok")

    first = threading.Thread(target=trial)
    first.start()
    assert transport.entered.wait(10)
    for _ in range(10):  # while the trial is out, everyone else is turned away
        outcomes.append(_failure(fb).reason)
    transport.gate.set()
    first.join(10)
    assert outcomes.count("breaker_open") == 10
    assert outcomes[-1] == "ok"
    assert len(transport.calls) == 2
    assert fb.breaker.state == "closed"


def test_cloud_budget_exhausted() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock, takes_s=0.0)
    fb = cloud(clock, transport, max_per_minute=2)
    fb.call("digits", X, "low_confidence")
    fb.call("digits", X, "low_confidence")
    assert _failure(fb).reason == "budget_exhausted"
    assert len(transport.calls) == 2
    assert fb.breaker.state == "closed"  # a spent budget says nothing about the cloud
    clock.advance(60)
    fb.call("digits", X, "low_confidence")
    assert fb.stats()["failures"]["budget_exhausted"] == 1


def test_cloud_budget_exhausted_gives_back_the_half_open_trial() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock, takes_s=0.0)
    transport.error = FallbackError("down")
    fb = cloud(clock, transport, max_per_minute=1, breaker_failures=1, breaker_reset_seconds=5)
    _failure(fb)  # spends the budget and opens the breaker
    clock.advance(5)
    assert _failure(fb).reason == "budget_exhausted"
    assert fb.breaker.state == "half_open"
    clock.advance(60)
    transport.error = None
    fb.call("digits", X, "low_confidence")  # the trial was not stranded
    assert fb.breaker.state == "closed"


def test_cloud_without_transport() -> None:
    clock = FakeClock()
    fb = cloud(clock, UnavailableTransport())
    assert _failure(fb).reason == "no_transport"
    with pytest.raises(CloudFallbackError, match="no cloud transport configured") as info:
        UnavailableTransport().request("m", X, deadline_s=1.0, reason="r")
    assert info.value.reason == "no_transport"
    assert fb.stats()["failures"]["no_transport"] == 1
    assert fb.breaker.state == "closed"
    assert fb.budget.remaining() == 600


def test_cloud_answer_that_is_not_a_mapping() -> None:
    clock = FakeClock()

    class Broken:
        def request(self, *args: object, **kwargs: object) -> object:
            return [1, 2, 3]

    assert _failure(cloud(clock, Broken())).reason == "transport_error"


def test_breaker_outage_is_one_open_and_one_closed_event() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock)
    transport.error = FallbackError("down")
    fb = cloud(clock, transport, breaker_failures=2, breaker_reset_seconds=30)
    events: list[dict[str, object]] = []
    fb.event_sink = events.append
    for _ in range(4):  # opens at the second failure; then rejected while open
        _failure(fb)
    clock.advance(30)
    _failure(fb)  # the half-open trial fails: re-opened, still the same outage
    assert [e["event"] for e in events] == ["fallback_breaker_open"]
    clock.advance(30)
    transport.error = None
    fb.call("digits", X, "low_confidence")  # the trial answers: closed
    fb.call("digits", X, "low_confidence")
    assert [e["event"] for e in events] == ["fallback_breaker_open", "fallback_breaker_closed"]
    for e in events:
        assert e["model"] is None
        assert isinstance(e["at"], float)
        assert e["at"] > 1e9  # Unix time, not the breaker's monotonic clock
        assert isinstance(e["detail"], str)
        assert e["detail"]
    assert "transport_error" in str(events[0]["detail"])
