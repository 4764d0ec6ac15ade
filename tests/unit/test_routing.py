"""The request router as a pure decision table: situation -> route, for every fallback mode.

Each table row is one situation the agent can be in; the expected route is what the agent did
before the router existed (the agent tests check the same behaviour end to end).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from edge_agent.serving.fallback import DEVICE, Decision
from edge_agent.serving.routing import (
    ANSWER_LOCALLY,
    CLOUD,
    FAIL,
    LIVE_LOCAL,
    LOCAL,
    RAISE_LOCAL_ERROR,
    REFUSE,
    Facts,
    Route,
    Router,
)
from edge_agent.serving.shadow import Arm

MODES = ("device_only", "prefer_device", "prefer_cloud", "cloud_only")
UP = Facts(live=True)
DOWN = Facts(live=False)
NEVER_LOADED = Facts(live=False, set_up=False)
PINNED = Facts(live=True, pinned=True, candidate=True)
CANDIDATE = Facts(live=True, candidate=True)
NO_CANDIDATE = Facts(live=True, candidate=False)


def _draws(arm: Arm) -> tuple[Callable[[], Arm], list[Arm]]:
    seen: list[Arm] = []

    def draw() -> Arm:
        seen.append(arm)
        return arm

    return draw, seen


# ------------------------------------------------------------------------------- first
# (mode, cloud wired, facts, drawn arm or None, expected route)
FIRST = [
    # no cloud wired: the mode does not matter
    *[(m, False, UP, None, Route(LOCAL)) for m in MODES],
    *[(m, False, DOWN, None, Route(REFUSE, reason="not_serving")) for m in MODES],
    *[(m, False, NEVER_LOADED, None, Route(REFUSE, reason="not_serving")) for m in MODES],
    # a cloud wired, the model loaded
    ("device_only", True, UP, None, Route(LOCAL)),
    ("prefer_device", True, UP, None, Route(LOCAL)),
    ("prefer_cloud", True, UP, None, Route(CLOUD, "live", "prefer_cloud", ANSWER_LOCALLY)),
    ("cloud_only", True, UP, None, Route(CLOUD, "live", "cloud_only", FAIL)),
    # a cloud wired, the model down after it served
    ("device_only", True, DOWN, None, Route(REFUSE, reason="not_serving")),
    ("prefer_device", True, DOWN, None, Route(CLOUD, "live", "local_unavailable", FAIL)),
    ("prefer_cloud", True, DOWN, None, Route(CLOUD, "live", "prefer_cloud", FAIL)),
    ("cloud_only", True, DOWN, None, Route(CLOUD, "live", "cloud_only", FAIL)),
    # a cloud wired, a model never loaded in this process: local_unavailable whatever the mode
    ("device_only", True, NEVER_LOADED, None, Route(REFUSE, reason="not_serving")),
    *[
        (m, True, NEVER_LOADED, None, Route(CLOUD, "live", "local_unavailable", FAIL))
        for m in ("prefer_device", "prefer_cloud", "cloud_only")
    ],
    # A/B: the candidate serves only when drawn and loaded
    ("device_only", False, CANDIDATE, "candidate", Route(LOCAL, "candidate")),
    ("device_only", False, CANDIDATE, "live", Route(LOCAL, "live")),
    ("device_only", False, NO_CANDIDATE, "candidate", Route(LOCAL, "live")),
    ("prefer_device", True, CANDIDATE, "candidate", Route(LOCAL, "candidate")),
    (
        "prefer_cloud",
        True,
        CANDIDATE,
        "candidate",
        Route(CLOUD, "candidate", "prefer_cloud", ANSWER_LOCALLY),
    ),
    ("cloud_only", True, CANDIDATE, "candidate", Route(CLOUD, "candidate", "cloud_only", FAIL)),
]


@pytest.mark.parametrize(("mode", "cloud", "facts", "drawn", "expected"), FIRST)
def test_first_route(
    mode: str, cloud: bool, facts: Facts, drawn: Arm | None, expected: Route
) -> None:
    draw = None if drawn is None else _draws(drawn)[0]
    assert Router(mode, cloud=cloud).first(facts, draw) == expected


@pytest.mark.parametrize(
    ("facts", "draws"),
    [
        (UP, True),
        (CANDIDATE, True),
        (PINNED, False),  # a request naming a version is not split
        (DOWN, False),  # nothing serves: no arm is drawn (and counted)
        (NEVER_LOADED, False),
    ],
)
def test_the_arm_is_drawn_only_when_a_split_applies(facts: Facts, draws: bool) -> None:
    draw, seen = _draws("candidate")
    route = Router("prefer_device", cloud=True).first(facts, draw)
    assert seen == (["candidate"] if draws else [])
    assert route.arm == ("candidate" if draws and facts.candidate else "live")


# --------------------------------------------------------------------- after a local error
# (mode, cloud wired, invalid input?, expected route)
ERROR = [
    *[(m, False, inv, Route(REFUSE, reason="local_error")) for m in MODES for inv in (1, 0)],
    *[
        (m, True, inv, Route(REFUSE, reason="local_error"))
        for m in ("device_only", "prefer_cloud", "cloud_only")
        for inv in (1, 0)
    ],
    ("prefer_device", True, True, Route(CLOUD, "live", "invalid_input", RAISE_LOCAL_ERROR)),
    ("prefer_device", True, False, Route(CLOUD, "live", "local_unavailable", FAIL)),
]


@pytest.mark.parametrize(("mode", "cloud", "invalid", "expected"), ERROR)
def test_after_local_error(mode: str, cloud: bool, invalid: bool, expected: Route) -> None:
    route = Router(mode, cloud=cloud).after_local_error(Route(LOCAL), invalid_input=bool(invalid))
    assert route == expected


def test_after_local_error_keeps_the_arm() -> None:
    route = Router("prefer_device", cloud=True).after_local_error(
        Route(LOCAL, "candidate"), invalid_input=True
    )
    assert route.arm == "candidate"


# -------------------------------------------------------------------- after a local answer
HARD = Decision(cloud=True, reason="low_confidence", hard_rows=1)
OOD_FAILS = Route(CLOUD, "live", "out_of_distribution", ANSWER_LOCALLY, out_of_distribution=True)
HARD_ROUTE = Route(CLOUD, "live", "low_confidence", ANSWER_LOCALLY, with_device_answer=True)
# (mode, cloud wired, set up, cloud failed first, out of distribution, hard, expected route)
ANSWER = [
    *[(m, False, True, False, True, HARD, Route(LOCAL)) for m in MODES],
    ("prefer_device", True, True, False, False, DEVICE, Route(LOCAL)),
    ("prefer_device", True, True, False, True, HARD, OOD_FAILS),  # OOD first
    ("prefer_device", True, True, False, False, HARD, HARD_ROUTE),
    ("prefer_device", True, False, False, True, HARD, Route(LOCAL)),  # no policy: no checks
    # only prefer_device checks OOD and asks for hard examples; the verdict is
    # FallbackPolicy.after's, whether the mode looks for them is the router's
    ("prefer_cloud", True, True, False, False, HARD, Route(LOCAL)),
    ("device_only", True, True, False, False, HARD, Route(LOCAL)),
    ("cloud_only", True, True, False, False, HARD, Route(LOCAL)),
    ("prefer_cloud", True, True, False, True, DEVICE, Route(LOCAL)),
    ("prefer_cloud", True, True, True, True, HARD, Route(LOCAL)),  # the cloud failed before
    ("device_only", True, True, False, True, DEVICE, Route(LOCAL)),
    (
        "prefer_device",
        True,
        True,
        False,
        False,
        Decision(cloud=True),
        Route(CLOUD, "live", "hard_example", ANSWER_LOCALLY, with_device_answer=True),
    ),
]


@pytest.mark.parametrize(("mode", "cloud", "set_up", "failed", "ood", "hard", "expected"), ANSWER)
def test_after_local_answer(
    mode: str,
    cloud: bool,
    set_up: bool,
    failed: bool,
    ood: bool,
    hard: Decision,
    expected: Route,
) -> None:
    route = Router(mode, cloud=cloud).after_local_answer(
        Route(LOCAL),
        cloud_failed=failed,
        set_up=set_up,
        out_of_distribution=lambda: ood,
        hard=lambda: hard,
    )
    assert route == expected


def test_checks_run_only_when_they_apply() -> None:
    """The OOD test and the confidence scoring cost time: never run when they cannot matter."""
    calls: list[str] = []

    def ood() -> bool:
        calls.append("ood")
        return True

    def hard() -> Decision:
        calls.append("hard")
        return HARD

    Router("device_only", cloud=False).after_local_answer(
        Route(LOCAL), cloud_failed=False, set_up=True, out_of_distribution=ood, hard=hard
    )
    assert calls == []
    Router("prefer_device", cloud=True).after_local_answer(
        Route(LOCAL), cloud_failed=False, set_up=True, out_of_distribution=ood, hard=hard
    )
    assert calls == ["ood"]  # out of distribution decides; no scoring after it


# ------------------------------------------------------------------------------- shadow
@pytest.mark.parametrize(
    ("route", "active", "offered"),  # the route the device answer was reached on
    [
        (Route(LOCAL), True, True),
        (Route(LOCAL, "candidate"), False, False),  # the A/B candidate answered
        (Route(LOCAL), False, False),  # a version the request named answered
        # prefer_cloud answered on the device after the cloud failed
        (Route(CLOUD, reason="prefer_cloud", if_cloud_fails=ANSWER_LOCALLY), True, True),
    ],
)
def test_only_answers_of_the_active_version_reach_the_shadow(
    route: Route, active: bool, offered: bool
) -> None:
    assert Router.offers_shadow(route, answered_by_active=active) is offered


# ------------------------------------------------------------------------ the fast path
@pytest.mark.parametrize("cloud", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_local_only_routers_route_exactly_as_the_fast_path_assumes(mode: str, cloud: bool) -> None:
    """``Agent.infer`` skips the router when ``local_only``: a live, unpinned request without an
    A/B split is ``LIVE_LOCAL``, a local error is re-raised and a local answer kept. That holds
    for exactly the routers that say ``local_only``; every other one can reach the cloud."""
    router = Router(mode, cloud=cloud)

    def never() -> bool:
        raise AssertionError("a local-only router ran a fallback check")

    def never_hard() -> Decision:
        raise AssertionError("a local-only router scored an answer")

    assert router.local_only == (not cloud or mode == "device_only")
    if router.local_only:
        for set_up in (True, False):
            assert router.first(Facts(live=True, set_up=set_up)) == LIVE_LOCAL
            after = router.after_local_answer(
                LIVE_LOCAL,
                cloud_failed=False,
                set_up=set_up,
                out_of_distribution=never,
                hard=never_hard,
            )
            assert after == LIVE_LOCAL
        for invalid in (True, False):
            assert router.after_local_error(LIVE_LOCAL, invalid_input=invalid).target == REFUSE
    else:  # the router itself sends requests to the cloud: never skipped
        first = router.first(UP)
        error = router.after_local_error(LIVE_LOCAL, invalid_input=True)
        assert CLOUD in (first.target, error.target)
