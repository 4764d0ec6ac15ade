"""Label selectors: a strict parser of a Kubernetes selector subset, and matching (pure).

Owns ``LabelSelector`` (``parse``, ``matches``, a canonical ``str`` that parses back to the same
value) and ``Requirement``. Syntax, a comma-separated list of requirements that must all hold::

    site=berlin          key equals value ("==" is the same)
    site!=berlin         key absent or another value
    hw in (jetson,pi5)   key is one of the values
    hw notin (pi4)       key absent or none of the values
    camera               key present
    !legacy              key absent

Keys and values follow ``edge_agent.wire.ops.labels`` (values are never empty). Whitespace is
allowed around tokens; ``in``/``notin`` need a space or ``(`` after them. An empty selector is
refused (a rollout that targets everything says so with a group). Bounded: at most
``MAX_SELECTOR_CHARS`` characters, ``MAX_REQUIREMENTS`` requirements and ``MAX_VALUES`` values
per set. Every refusal is a ``SelectorSyntaxError`` with the offending position.

Does not own where labels come from (``fleet_server.registry.labels`` stores them and turns a
selector into an indexed query) nor which devices a rollout targets (``policy.Selector``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from edge_agent.wire.ops.labels import KEY, MAX_KEY_CHARS, MAX_VALUE_CHARS, VALUE
from fleet_server.errors import SelectorSyntaxError

__all__ = [
    "MAX_REQUIREMENTS",
    "MAX_SELECTOR_CHARS",
    "MAX_VALUES",
    "OPS",
    "LabelSelector",
    "Requirement",
]

MAX_SELECTOR_CHARS: Final = 2048
MAX_REQUIREMENTS: Final = 32
MAX_VALUES: Final = 64
#: ``=`` and ``!=`` hold one value; ``in``/``notin`` a set; ``exists``/``absent`` none.
OPS: Final = ("=", "!=", "in", "notin", "exists", "absent")
_KEY_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-/")
_VALUE_CHARS: Final = _KEY_CHARS - {"/"}
_SPACE: Final = frozenset(" \t")


@dataclass(frozen=True)
class Requirement:
    """One requirement: ``key``, one of ``OPS`` and its values (sorted, distinct)."""

    key: str
    op: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """True when ``labels`` satisfy it (absent keys satisfy ``!=``, ``notin``, ``!k``)."""
        value = labels.get(self.key)
        if self.op in ("=", "in"):
            return value is not None and value in self.values
        if self.op in ("!=", "notin"):
            return value is None or value not in self.values
        if self.op == "exists":
            return value is not None
        return value is None

    def __str__(self) -> str:
        if self.op in ("=", "!="):
            return f"{self.key}{self.op}{self.values[0]}"
        if self.op in ("in", "notin"):
            return f"{self.key} {self.op} ({','.join(self.values)})"
        return self.key if self.op == "exists" else f"!{self.key}"


@dataclass(frozen=True)
class LabelSelector:
    """A conjunction of requirements (see the module docstring); ``parse`` builds one."""

    requirements: tuple[Requirement, ...]

    @classmethod
    def parse(cls, text: object) -> LabelSelector:
        """Parse ``text``.

        Raises:
            SelectorSyntaxError: not a string, empty, too long, or not the syntax (the message
                says what was expected where, the offending text escaped).
        """
        if not isinstance(text, str):
            raise SelectorSyntaxError("a selector is a string", position=0)
        if len(text) > MAX_SELECTOR_CHARS:
            raise SelectorSyntaxError(
                f"a selector has at most {MAX_SELECTOR_CHARS} characters", position=0
            )
        return cls(_Parser(text).selector())

    def matches(self, labels: Mapping[str, str]) -> bool:
        """True when ``labels`` satisfy every requirement."""
        return all(r.matches(labels) for r in self.requirements)

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)


class _Parser:
    """Recursive descent over ``text`` with a cursor; every error names the cursor."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0

    def fail(self, expected: str, at: int | None = None) -> SelectorSyntaxError:
        pos = self.i if at is None else at
        rest = self.text[pos : pos + 20]
        found = repr(rest) if rest else "the end"
        return SelectorSyntaxError(f"expected {expected}, found {found}", position=pos)

    def space(self) -> None:
        while self.i < len(self.text) and self.text[self.i] in _SPACE:
            self.i += 1

    def peek(self) -> str:
        return self.text[self.i] if self.i < len(self.text) else ""

    def run(self, chars: frozenset[str]) -> tuple[str, int]:
        start = self.i
        while self.i < len(self.text) and self.text[self.i] in chars:
            self.i += 1
        return self.text[start : self.i], start

    def selector(self) -> tuple[Requirement, ...]:
        out: list[Requirement] = []
        self.space()
        if self.i == len(self.text):
            raise self.fail("a requirement (an empty selector selects nothing)")
        while True:
            if len(out) == MAX_REQUIREMENTS:
                raise SelectorSyntaxError(
                    f"a selector has at most {MAX_REQUIREMENTS} requirements", position=self.i
                )
            out.append(self.requirement())
            self.space()
            if self.i == len(self.text):
                return tuple(out)
            if self.peek() != ",":
                raise self.fail("',' or the end")
            self.i += 1
            self.space()

    def key(self) -> str:
        key, start = self.run(_KEY_CHARS)
        if not key:
            raise self.fail("a label key")
        if len(key) > MAX_KEY_CHARS or not KEY.fullmatch(key):
            raise SelectorSyntaxError(
                f"label key {key[:80]!r} is not 1-63 of [A-Za-z0-9._-] with a letter or digit "
                "at both ends, optionally behind 'prefix/'",
                position=start,
            )
        return key

    def value(self) -> str:
        value, start = self.run(_VALUE_CHARS)
        if not value:
            raise self.fail("a label value")
        if len(value) > MAX_VALUE_CHARS or not VALUE.fullmatch(value):
            raise SelectorSyntaxError(
                f"label value {value[:80]!r} is not 1-63 of [A-Za-z0-9._-] with a letter or "
                "digit at both ends",
                position=start,
            )
        return value

    def requirement(self) -> Requirement:
        if self.peek() == "!":
            self.i += 1
            self.space()
            return Requirement(self.key(), "absent")
        key = self.key()
        self.space()
        c = self.peek()
        if c in ("", ","):
            return Requirement(key, "exists")
        if c == "=":
            self.i += 2 if self.text.startswith("==", self.i) else 1
            self.space()
            return Requirement(key, "=", (self.value(),))
        if self.text.startswith("!=", self.i):
            self.i += 2
            self.space()
            return Requirement(key, "!=", (self.value(),))
        word, start = self.run(frozenset("abcdefghijklmnopqrstuvwxyz"))
        if word in ("in", "notin") and self.peek() == "":
            raise self.fail("'('")
        if word not in ("in", "notin") or self.peek() not in (" ", "\t", "("):
            raise self.fail("'=', '==', '!=', 'in', 'notin', ',' or the end", at=start)
        return Requirement(key, word, self.values())

    def values(self) -> tuple[str, ...]:
        self.space()
        if self.peek() != "(":
            raise self.fail("'('")
        self.i += 1
        out: set[str] = set()
        while True:
            self.space()
            out.add(self.value())
            if len(out) > MAX_VALUES:
                raise SelectorSyntaxError(f"a set has at most {MAX_VALUES} values", position=self.i)
            self.space()
            c = self.peek()
            self.i += 1
            if c == ")":
                return tuple(sorted(out))
            if c != ",":
                self.i -= 1
                raise self.fail("',' or ')'")
