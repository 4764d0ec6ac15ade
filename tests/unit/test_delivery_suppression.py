"""The re-broadcast suppression rule: ``RecentBroadcasts`` and ``plan_resend(in_flight=...)``."""

from __future__ import annotations

import pytest

from edge_agent.errors import ContractError
from edge_agent.wire.transfer import BlockPlan, BlockRequest
from fleet_server.delivery.blocks import RecentBroadcasts, plan_resend, plan_round

PLAN = BlockPlan(10 * 65536, "ab" * 32, 65536)  # 10 blocks
T = PLAN.transfer_id


def ask(*ranges: tuple[int, int]) -> BlockRequest:
    return BlockRequest(T, tuple(ranges))


def test_recorded_broadcast_is_in_flight_until_hold_expires() -> None:
    recent = RecentBroadcasts(4.0)
    recent.record(T, 3, now=10.0)
    assert recent.in_flight(T, 10.0) == {3}
    assert recent.in_flight(T, 13.9) == {3}
    assert recent.in_flight(T, 14.0) == frozenset()  # hold over: may be broadcast again
    recent.record(T, 3, now=20.0)  # re-broadcast restarts the hold
    assert recent.in_flight(T, 23.0) == {3}
    assert recent.in_flight("other", 23.0) == frozenset()


def test_blocks_ahead_of_a_running_wave_are_in_flight_until_it_ends() -> None:
    recent = RecentBroadcasts(1.0)
    recent.wave_at(T, 0, 10)
    assert recent.in_flight(T, 0.0) == set(range(10))
    recent.record(T, 0, 0.0)
    recent.wave_at(T, 1, 10)
    assert recent.in_flight(T, 0.5) == set(range(10))
    assert recent.in_flight(T, 1.5) == set(range(1, 10))  # block 0's hold is over
    recent.wave_ended(T)  # finished or aborted: nothing more is coming
    assert recent.in_flight(T, 1.5) == frozenset()


def test_forget_sent_keeps_the_pending_wave() -> None:
    recent = RecentBroadcasts(10.0)
    recent.record(T, 0, 0.0)
    recent.record(T, 1, 0.0)
    recent.wave_at(T, 5, 10)
    recent.forget_sent()  # the broker went away: what it was fanning out may be lost
    assert recent.in_flight(T, 1.0) == set(range(5, 10))


def test_negative_hold_is_refused() -> None:
    with pytest.raises(ContractError):
        RecentBroadcasts(-1.0)


def test_in_flight_blocks_are_not_broadcast_nor_unicast_to_many() -> None:
    requests = [("d1", ask((0, 4))), ("d2", ask((0, 4))), ("d3", ask((2, 3)))]
    plain = plan_resend(requests, PLAN)
    assert plain.broadcast == (0, 1, 2, 3)
    held = plan_resend(requests, PLAN, in_flight=frozenset({1, 2, 9}))
    assert held.broadcast == (0, 3)
    assert held.suppressed == (1, 2)  # 9 was not asked for
    assert held.unicast == {}  # the requesters get the copy in flight


def test_a_lone_requester_is_still_served_by_unicast() -> None:
    held = plan_resend([("d1", ask((4, 6)))], PLAN, in_flight=frozenset({4, 5}))
    assert held.broadcast == ()
    assert held.unicast == {"d1": (4, 5)}
    assert held.suppressed == ()


def test_plan_round_passes_in_flight_per_transfer_and_counts_suppressed() -> None:
    requests = [("d1", ask((0, 2))), ("d2", ask((0, 2)))]
    plan = plan_round(requests, {T: PLAN}, broadcast_min_devices=2, in_flight={T: {0}})
    assert plan.transfers[T].broadcast == (1,)
    assert plan.suppressed == 1
    everything = plan_round(requests, {T: PLAN}, broadcast_min_devices=2, in_flight={T: {0, 1}})
    assert T not in everything.transfers
    assert everything.suppressed == 2
