"""The layout's own rules, checked on the source tree (AST only; nothing is imported).

Owns: two rules the import-linter contracts cannot express. No module reaches into another's
private names: neither ``from X import _name`` (a private *module* such as
``registry._catalog`` may be imported; its names are public) nor ``obj._attr`` where ``obj`` is
not ``self``/``cls`` and ``_attr`` belongs to a class or module defined elsewhere. And no folder
under ``src/`` holds more than 15 modules at one level. Does not own: import direction and
cycles (``pyproject.toml``, ``lint-imports``) nor the package map (``test_docs_architecture``).

The attribute check is best-effort: it knows which private names each module's classes and
module scope define and flags a use in a module that defines no such name itself. A name defined
in both modules is treated as local (no false positives, some misses).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGES = ("edge_agent", "fleet_server", "model_builder")
MAX_MODULES_PER_FOLDER = 15

# Crossings allowed on purpose, as (module, private name), each with the reason. Empty: every
# crossing found so far was removed. An entry that no longer matches fails the test: delete it.
ALLOWED: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True, order=True)
class Offence:
    """One crossing of a module boundary into a private name."""

    module: str
    line: int
    name: str
    owner: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line} uses {self.name} of {self.owner}"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _modules() -> dict[str, ast.Module]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((SRC / pkg).rglob("*.py")):
            parts = path.relative_to(SRC).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return out


def _private_definitions(tree: ast.Module) -> tuple[set[str], set[str]]:
    """(private attributes defined by classes, private module-level names) of one module."""
    attrs: set[str] = set()
    top: set[str] = set()
    for node in tree.body:
        for name in _bound_names(node):
            if _is_private(name):
                top.add(name)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                attrs.update(n for n in _bound_names(item) if _is_private(n))
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
            and _is_private(node.attr)
        ):
            attrs.add(node.attr)
    return attrs, top


def _bound_names(node: ast.stmt) -> list[str]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def private_name_offences() -> list[Offence]:
    """Every use of another module's private name in ``src/``, sorted (no allow-list applied)."""
    trees = _modules()
    packages = {m for m in trees if (SRC / Path(*m.split(".")) / "__init__.py").exists()}
    return offences(trees, packages)


def offences(trees: dict[str, ast.Module], packages: set[str]) -> list[Offence]:
    """The crossings among ``trees`` (module name -> AST; ``packages``: those that are packages)."""
    attr_owners: dict[str, set[str]] = defaultdict(set)
    top_names: dict[str, set[str]] = {}
    local_attrs: dict[str, set[str]] = {}
    for module, tree in trees.items():
        attrs, top = _private_definitions(tree)
        local_attrs[module] = attrs | top
        top_names[module] = top
        for a in attrs:
            attr_owners[a].add(module)
    found: list[Offence] = []
    for module, tree in trees.items():
        aliases: dict[str, str] = {}  # local name -> one of our modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _absolute(module, node, module in packages)
                if source.split(".")[0] not in PACKAGES:
                    continue
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    if full in trees:
                        aliases[alias.asname or alias.name] = full
                    elif _is_private(alias.name) and source != module:
                        found.append(Offence(module, node.lineno, alias.name, source))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in trees and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not _is_private(node.attr):
                continue
            obj = node.value
            if isinstance(obj, ast.Name) and obj.id in ("self", "cls"):
                continue
            if isinstance(obj, ast.Name) and obj.id in aliases:
                owner = aliases[obj.id]
                if node.attr in top_names.get(owner, ()) and owner != module:
                    found.append(Offence(module, node.lineno, node.attr, owner))
                continue
            if node.attr in local_attrs[module]:
                continue
            owners = attr_owners.get(node.attr, set()) - {module}
            if owners:
                found.append(Offence(module, node.lineno, node.attr, ",".join(sorted(owners))))
    return sorted(set(found))


def crowded_folders() -> dict[str, int]:
    """Folders under ``src/`` with more than the allowed number of modules at one level."""
    out = {}
    for folder in [SRC, *(p for p in SRC.rglob("*") if p.is_dir())]:
        count = sum(1 for p in folder.glob("*.py") if p.name != "__init__.py")
        if count > MAX_MODULES_PER_FOLDER:
            out[str(folder.relative_to(SRC))] = count
    return out


def test_no_module_uses_another_modules_private_names() -> None:
    found = private_name_offences()
    left = [o for o in found if (o.module, o.name) not in ALLOWED]
    assert not left, "\n".join(map(str, left))
    stale = ALLOWED - {(o.module, o.name) for o in found}
    assert not stale, f"no longer needed, delete from ALLOWED: {sorted(stale)}"


def test_no_folder_holds_more_than_15_modules_at_one_level() -> None:
    assert crowded_folders() == {}


def test_the_check_finds_each_kind_of_crossing_and_nothing_else() -> None:
    owner = """
class A:
    _shared = 0
    def __init__(self):
        self._x = 1
def _helper():
    return 2
"""
    user = """
from edge_agent.a import A, _helper
import edge_agent.a as a_mod
class B:
    def __init__(self, other):
        self._y = other._x
        self._z = a_mod._helper()
    def own(self, twin):
        return self._y, twin._y, _helper()
"""
    trees = {"edge_agent.a": ast.parse(owner), "edge_agent.b": ast.parse(user)}
    found = offences(trees, set())
    assert {(o.module, o.name, o.owner) for o in found} == {
        ("edge_agent.b", "_helper", "edge_agent.a"),
        ("edge_agent.b", "_x", "edge_agent.a"),
    }
    lines = sorted(o.line for o in found)
    assert lines == [2, 6, 7]  # the import, other._x, a_mod._helper; never self._y or twin._y
