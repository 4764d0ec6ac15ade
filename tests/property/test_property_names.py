"""Properties of the one model-name/channel rule (``edge_agent.ids``) and the prefix rule.

Whatever the text: a name is accepted exactly when it is 1-63 characters of ``[a-z0-9._-]``
starting with a letter or digit; an accepted name comes back unchanged from every validator
that uses the rule (``validate_name``, the manifest, the desired state) and survives the
desired state's wire round trip; anything else raises the validator's typed error.
"""

from __future__ import annotations

import string
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from edge_agent.contract.manifest import validate_model_name
from edge_agent.errors import ContractError, MetadataFormatError
from edge_agent.ids import NAME_PATTERN, is_valid_name, validate_name
from edge_agent.trust.assignment import ModelAssignment
from edge_agent.trust.desired import DesiredState
from edge_agent.wire.topics import MAX_PREFIX_LENGTH, Topics

ALLOWED = frozenset(string.ascii_lowercase + string.digits + "._-")
FIRST = frozenset(string.ascii_lowercase + string.digits)
H = "cd" * 32
EXPIRES = datetime(2030, 1, 1, tzinfo=UTC)
# Mostly near-misses: allowed characters mixed with the hostile ones.
NEAR = st.text(
    alphabet=st.sampled_from(
        [*sorted(ALLOWED), "\n", "\r", "\x00", " ", "A", "/", "+", "#", "$", "\u0430", "\uff44"]
    ),
    max_size=70,
)


def _spelled_right(s: str) -> bool:
    return 1 <= len(s) <= 63 and s[0] in FIRST and set(s) <= ALLOWED


def _assignment() -> ModelAssignment:
    return ModelAssignment(
        version=1, channel="stable", bundle_sha256=H, bundle_length=1, targets_sha256=H
    )


@given(st.one_of(st.text(max_size=80), NEAR))
def test_accepted_exactly_when_spelled_right(s: str) -> None:
    assert is_valid_name(s) == _spelled_right(s)
    if _spelled_right(s):
        assert validate_name(s) == s
        assert validate_model_name(s) == s
        state = DesiredState(
            device_id="dev-1", version=1, expires=EXPIRES, models={s: _assignment()}
        )
        assert list(state.models) == [s]
        back = DesiredState.from_dict(state.to_dict())
        assert back == state
        assert list(back.models) == [s]
    else:
        for check in (validate_name, validate_model_name):
            try:
                check(s)
            except ContractError:
                pass
            else:
                raise AssertionError(f"{s!r} accepted")
        try:
            DesiredState(device_id="dev-1", version=1, expires=EXPIRES, models={s: _assignment()})
        except MetadataFormatError:
            pass
        else:
            raise AssertionError(f"{s!r} accepted as a desired-state model name")


@given(st.from_regex(NAME_PATTERN, fullmatch=True))
def test_every_name_the_pattern_generates_round_trips(s: str) -> None:
    assert set(s) <= ALLOWED
    assert s[0] in FIRST
    assert 1 <= len(s) <= 63
    assert validate_name(s, "channel") == s
    assignment = ModelAssignment(
        version=1, channel=s, bundle_sha256=H, bundle_length=1, targets_sha256=H
    )
    assert ModelAssignment.from_dict(assignment.to_dict()).channel == s


@given(
    st.lists(
        st.text(alphabet=st.sampled_from(sorted(ALLOWED | set("ABZ"))), min_size=1, max_size=20),
        min_size=1,
        max_size=6,
    )
)
def test_prefixes_of_safe_levels_are_accepted_and_parse(levels: list[str]) -> None:
    prefix = "/".join(levels)
    assert len(prefix) <= MAX_PREFIX_LENGTH
    t = Topics(prefix)
    assert t.parse(t.device_telemetry("dev-1")) == ("telemetry", "dev-1")
    assert t.parse_ref(t.fallback_resp("d" * 63, "c" * 128)).arg == "c" * 128
