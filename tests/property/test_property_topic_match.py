"""MQTT topic matching (``edge_agent.common.transport``) against a simple reference.

The reference turns a filter into a regular expression, the way the MQTT 5 specification words
the rules (section 4.7): ``+`` is one whole level, ``#`` the rest including the parent level,
and a filter starting with a wildcard never matches a ``$`` topic. Real Mosquitto is the third
opinion (``tests/integration/test_memory_broker_vs_mosquitto.py``).
"""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from edge_agent.common.transport import split_shared, topic_matches, valid_filter, valid_topic

# Few distinct level names so that matches are common; '' gives empty levels.
LEVEL = st.sampled_from(["a", "b", "", "edgefleet", "$x", "dev-1"])
TOPIC = st.lists(LEVEL, min_size=1, max_size=5).map("/".join).filter(bool)
FILTER_LEVEL = st.sampled_from(["a", "b", "", "edgefleet", "$x", "+", "dev-1"])


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(FILTER_LEVEL, min_size=1, max_size=5))
    if draw(st.booleans()):
        levels.append("#")
    f = "/".join(levels) or "a"  # an empty filter is invalid
    if draw(st.integers(0, 4)) == 0:
        f = f"$share/{draw(st.sampled_from(['g', 'fleet']))}/{f}"
    return f


def reference(filter_: str, topic: str) -> bool:
    if filter_.startswith("$share/"):
        filter_ = filter_.split("/", 2)[2]
    if topic.startswith("$") and filter_[:1] in ("+", "#"):
        return False
    levels = filter_.split("/")
    parts = []
    for level in levels:
        if level == "#":
            # '#' also matches the parent: 'a/#' matches 'a'
            return re.fullmatch("/".join(parts) + ("(/.*)?" if parts else ".*"), topic) is not None
        parts.append("[^/]*" if level == "+" else re.escape(level))
    return re.fullmatch("/".join(parts), topic) is not None


@given(filters(), TOPIC)
def test_matching_agrees_with_the_reference(filter_: str, topic: str) -> None:
    assert valid_filter(filter_)
    assert valid_topic(topic)
    assert topic_matches(filter_, topic) == reference(filter_, topic)


@given(TOPIC)
def test_a_topic_used_as_a_filter_matches_itself_only(topic: str) -> None:
    assert topic_matches(topic, topic)
    assert not topic_matches(topic, topic + "/a")


@given(TOPIC)
def test_hash_matches_every_topic_but_dollar_ones(topic: str) -> None:
    assert topic_matches("#", topic) == (not topic.startswith("$"))
    assert topic_matches(f"$share/g/{topic}", topic)


@given(filters())
def test_split_shared_round_trips(filter_: str) -> None:
    group, plain = split_shared(filter_)
    assert (f"$share/{group}/{plain}" if group else plain) == filter_


def test_invalid_filters_and_topics_match_nothing() -> None:
    for bad in ("a/b#", "a/#/b", "a+/b", "", "$share/g", "$share//a", "$share/g+/a", "a\x00"):
        assert not valid_filter(bad)
        assert not topic_matches(bad, "a/b")
    for bad_topic in ("a/+", "a/#", "", "a\x00b"):
        assert not valid_topic(bad_topic)
        assert not topic_matches("#", bad_topic)
