"""docs/architecture.md stays the map of the code: it names every package and every layer.

The layers are read from the import-linter ``layers`` contracts in pyproject.toml (what the test
run enforces), the packages from the source tree; a package added, renamed or moved to another
layer without updating the map fails here.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "architecture.md").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONTRACTS = PYPROJECT["tool"]["importlinter"]["contracts"]
LAYERS = {c["name"].split()[0]: c["layers"] for c in CONTRACTS if c["type"] == "layers"}


def _section(package: str) -> str:
    start = DOC.index(f"### `{package}`")
    end = DOC.find("\n## ", start)
    return DOC[start:end]


def _named(text: str) -> list[str]:
    """Names in backticks, in order of appearance."""
    return re.findall(r"`([a-z_][a-z0-9_.]*)`", text)


def test_every_role_package_has_a_layers_contract() -> None:
    assert set(LAYERS) == {"edge_agent", "fleet_server", "model_builder"}


@pytest.mark.parametrize("package", ["edge_agent", "fleet_server", "model_builder"])
def test_the_map_lists_the_layers_in_the_enforced_order(package: str) -> None:
    named = _named(_section(package))
    positions = []
    for layer in LAYERS[package]:
        for module in (m.strip() for m in layer.split("|")):
            short = module.removeprefix(f"{package}.")
            assert short in named, f"docs/architecture.md does not name layer {module}"
            positions.append((named.index(short), module))
    order = [module for _, module in positions]
    assert [module for _, module in sorted(positions)] == order, (
        "docs/architecture.md lists the layers in another order than pyproject.toml"
    )


@pytest.mark.parametrize("package", ["edge_agent", "fleet_server", "model_builder"])
def test_the_map_names_every_sub_package_and_top_level_module(package: str) -> None:
    named = set(_named(_section(package)))
    src = ROOT / "src" / package
    children = {p.name for p in src.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    children |= {p.stem for p in src.glob("*.py") if p.stem != "__init__"}
    missing = sorted(c for c in children if c not in named)
    assert not missing, f"docs/architecture.md does not name {package}: {missing}"
