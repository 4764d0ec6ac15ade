"""One rule for a topic prefix: the topic tree, the agent's and the server's config, the broker.

``fleet-server serve`` used to take only one lowercase level (``[a-z0-9][a-z0-9_-]{0,63}``)
while ``Topics`` and ``BrokerConfig`` took '/'-separated levels with capitals: a prefix the
broker and the agents accepted was refused by the server (and the agent's ``[sync]`` config
checked no prefix: a bad one failed later, in ``Topics``). Now all of them ask
``Topics.check_prefix``. Everything either old rule accepted (within the length bound) is
still accepted by each, and each refuses the same things.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from edge_agent.config import SyncConfig
from edge_agent.errors import ConfigError, ContractError
from edge_agent.wire.topics import MAX_PREFIX_LENGTH, MAX_TOPIC_LENGTH, Topics
from fleet_server.config import GatewayConfig
from fleet_server.errors import BrokerConfigError, ServerConfigError
from fleet_server.pki.broker_config import BrokerConfig

CHECKS: dict[str, tuple[Callable[[str], object], type[Exception]]] = {
    "topics": (Topics, ContractError),
    "gateway config": (lambda p: GatewayConfig(prefix=p).validate(), ServerConfigError),
    "broker config": (lambda p: BrokerConfig(prefix=p).validate(), BrokerConfigError),
    "agent sync config": (lambda p: SyncConfig(prefix=p).validate(), ConfigError),
}

# What the old server rule accepted, and what the old Topics/broker rule accepted.
OLD_SERVER = ["edgefleet", "fleet_1", "a", "a-b_c", "0" * 64]
OLD_TOPICS = ["acme/plant-1", "Acme/Plant.1", "a/b/c/d", "x_y/z-1", "A" * 200, "a/" * 100 + "a"]
REFUSED = [
    "",
    "/a",
    "a/",
    "a//b",
    "a/+",
    "a/#",
    "+",
    "$SYS",
    "a/%u",
    "a b",
    "a\n",
    "a/b\n",
    "a\r",
    "a\x00",
    " a",
    "\u0430",  # Cyrillic a
    "a" * (MAX_PREFIX_LENGTH + 1),
]


@pytest.mark.parametrize("where", sorted(CHECKS))
@pytest.mark.parametrize("prefix", OLD_SERVER + OLD_TOPICS)
def test_every_prefix_either_old_rule_took_is_taken_everywhere(where: str, prefix: str) -> None:
    check, _error = CHECKS[where]
    check(prefix)


@pytest.mark.parametrize("where", sorted(CHECKS))
@pytest.mark.parametrize("prefix", REFUSED)
def test_every_check_refuses_the_same_prefixes(where: str, prefix: str) -> None:
    check, error = CHECKS[where]
    with pytest.raises(error):
        check(prefix)


def test_the_longest_prefix_still_fits_every_topic() -> None:
    t = Topics("p" * MAX_PREFIX_LENGTH)
    longest = t.fallback_resp("d" * 63, "c" * 128)
    assert len(longest) <= MAX_TOPIC_LENGTH
    assert t.parse_ref(longest).kind == "fallback_resp"
