"""Label selectors: the strict parser's properties and its hostile table.

Properties: a selector built from valid parts prints to text that parses back to the same
value; whitespace around tokens does not change the parse; matching agrees with the
requirement semantics; any text either parses or raises ``SelectorSyntaxError`` with a
position inside it (never another exception), and anything that parses prints back to a
selector that parses to the same value.
"""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.errors import EdgefleetError
from fleet_server.errors import ERRORS, SelectorSyntaxError
from fleet_server.rollouts.label_selector import (
    MAX_REQUIREMENTS,
    MAX_VALUES,
    LabelSelector,
    Requirement,
)

_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
names = st.builds(
    lambda a, mid, b: a + mid + b if mid or b else a,
    st.sampled_from(_ALNUM),
    st.text(alphabet=_ALNUM + "._-", max_size=10),
    st.sampled_from(["", *_ALNUM[:10]]),
).filter(lambda s: s[-1] in _ALNUM)
prefixed = st.builds(
    lambda p, n: f"{p}/{n}", st.sampled_from(["example.com", "a", "x-1.io"]), names
)
keys = st.one_of(names, prefixed)


@st.composite
def requirements(
    draw: st.DrawFn,
    key_pool: st.SearchStrategy[str] = keys,
    value_pool: st.SearchStrategy[str] = names,
) -> Requirement:
    key = draw(key_pool)
    op = draw(st.sampled_from(["=", "!=", "in", "notin", "exists", "absent"]))
    if op in ("=", "!="):
        return Requirement(key, op, (draw(value_pool),))
    if op in ("in", "notin"):
        values = draw(st.sets(value_pool, min_size=1, max_size=5))
        return Requirement(key, op, tuple(sorted(values)))
    return Requirement(key, op)


selectors = st.builds(
    lambda rs: LabelSelector(tuple(rs)), st.lists(requirements(), min_size=1, max_size=6)
)
labels = st.dictionaries(keys, names, max_size=6)
# Small pools, so that selectors and labels share keys and values (matching is exercised).
small_keys, small_values = st.sampled_from(["a", "b", "c"]), st.sampled_from(["x", "y", "z"])
small_selectors = st.builds(
    lambda rs: LabelSelector(tuple(rs)),
    st.lists(requirements(small_keys, small_values), min_size=1, max_size=4),
)
small_labels = st.dictionaries(small_keys, small_values, max_size=3)


@given(selectors)
def test_printed_selectors_parse_back_to_the_same_value(sel: LabelSelector) -> None:
    assert LabelSelector.parse(str(sel)) == sel


@given(selectors, st.sampled_from([" ", "  ", "\t"]))
def test_whitespace_around_tokens_does_not_change_the_parse(sel: LabelSelector, ws: str) -> None:
    text = str(sel)
    spaced = ws + text.replace(",", f"{ws},{ws}").replace("(", f"{ws}({ws}") + ws
    spaced = spaced.replace("!=", f"{ws}!={ws}").replace(")", f"{ws})")
    assert LabelSelector.parse(spaced) == sel


@given(st.one_of(small_selectors, selectors), st.one_of(small_labels, labels))
def test_matching_is_the_conjunction_of_the_requirement_semantics(
    sel: LabelSelector, lab: dict[str, str]
) -> None:
    expected = True
    for r in sel.requirements:
        v = lab.get(r.key)
        if r.op == "=":
            ok = v is not None and v == r.values[0]
        elif r.op == "!=":
            ok = v is None or v != r.values[0]
        elif r.op == "in":
            ok = v in r.values
        elif r.op == "notin":
            ok = v not in r.values
        elif r.op == "exists":
            ok = v is not None
        else:
            ok = v is None
        expected = expected and ok
    assert sel.matches(lab) is expected


@given(st.text(alphabet=_ALNUM[:6] + " =!,()-./_\t\n\x00é", max_size=60))
def test_any_text_parses_or_raises_a_positioned_syntax_error(text: str) -> None:
    try:
        sel = LabelSelector.parse(text)
    except SelectorSyntaxError as exc:
        error: SelectorSyntaxError | None = exc
    else:
        error = None
        assert LabelSelector.parse(str(sel)) == sel
    if error is not None:
        assert 0 <= error.position <= len(text)
        assert error.code == "selector_invalid"


@given(st.text(max_size=80))
def test_arbitrary_unicode_never_raises_anything_else(text: str) -> None:
    with contextlib.suppress(SelectorSyntaxError):
        LabelSelector.parse(text)


HOSTILE = [
    ("", "a requirement"),
    ("   ", "a requirement"),
    (",", "a label key"),
    ("a=b,", "a label key"),
    ("a=b,,c", "a label key"),
    ("=b", "a label key"),
    ("a=", "a label value"),
    ("a!=", "a label value"),
    ("a==", "a label value"),
    ("a===b", "a label value"),
    ("a=b=c", "',' or the end"),
    ("a b", "'='"),
    ("a in", "'('"),
    ("a in ()", "a label value"),
    ("a in (b", "',' or ')'"),
    ("a in (b,)", "a label value"),
    ("a in b", "'('"),
    ("a inn (b)", "'='"),
    ("a notin(b) c", "',' or the end"),
    ("!", "a label key"),
    ("!a=b", "',' or the end"),
    ("-a=b", "letter or digit"),
    ("a-=b", "letter or digit"),
    ("a=-b", "letter or digit"),
    ("a=b.", "letter or digit"),
    ("Example.COM/a=b", "prefix"),
    ("a/b/c=d", "prefix"),
    ("a" * 64 + "=b", "1-63"),
    ("a=" + "b" * 64, "1-63"),
    ("a=b\x00", "',' or the end"),
    ("a=b;rm -rf /", "',' or the end"),
    ("a=\u00e9", "a label value"),
    ("a=b\nc=d", "',' or the end"),
    ("a in (" + ",".join(f"v{i}" for i in range(MAX_VALUES + 1)) + ")", "at most"),
    (",".join(f"k{i}" for i in range(MAX_REQUIREMENTS + 1)), "at most"),
    ("a" * 3000, "at most 2048 characters"),
]


@pytest.mark.parametrize(("text", "says"), HOSTILE)
def test_hostile_selectors_are_refused_with_a_position(text: str, says: str) -> None:
    with pytest.raises(SelectorSyntaxError) as err:
        LabelSelector.parse(text)
    assert says in str(err.value)
    assert 0 <= err.value.position <= len(text)
    assert "\x00" not in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", [None, 3, ["a=b"], {"a": "b"}, b"a=b"])
def test_a_selector_is_a_string(value: object) -> None:
    with pytest.raises(SelectorSyntaxError):
        LabelSelector.parse(value)


def test_selector_errors_are_bad_input_in_the_error_table() -> None:
    assert ERRORS.admin_status(SelectorSyntaxError("x", position=0)) == 400
    assert isinstance(SelectorSyntaxError("x", position=0), EdgefleetError)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("site=berlin", "site=berlin"),
        ("site==berlin", "site=berlin"),
        (" site = berlin ", "site=berlin"),
        ("hw in (pi5, jetson, pi5)", "hw in (jetson,pi5)"),
        ("hw notin(pi4)", "hw notin (pi4)"),
        ("camera,!legacy", "camera,!legacy"),
        ("example.com/line=3,os!=windows", "example.com/line=3,os!=windows"),
        ("in in (in)", "in in (in)"),
    ],
)
def test_accepted_forms_and_their_canonical_text(text: str, canonical: str) -> None:
    assert str(LabelSelector.parse(text)) == canonical


def test_kubernetes_semantics_for_absent_keys() -> None:
    sel = LabelSelector.parse("site!=a,hw notin (x),!legacy")
    assert sel.matches({})
    assert not sel.matches({"site": "a"})
    assert not sel.matches({"hw": "x"})
    assert not sel.matches({"legacy": "yes"})
    assert LabelSelector.parse("site in (a,b)").matches({"site": "b"})
    assert not LabelSelector.parse("site in (a,b)").matches({})
