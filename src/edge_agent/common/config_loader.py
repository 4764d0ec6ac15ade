"""Loading frozen config dataclasses from TOML plus environment overrides (shared mechanics).

Owns the parts every edgefleet config shares: reading the TOML file, applying overrides of the
form ``<PREFIX><SECTION>__<KEY>=value`` (values parsed as TOML scalars, so ``true``, ``8``,
``"text"`` and bare strings all work), and building one section's dataclass strictly (unknown
keys, wrong types and non-finite numbers are refused, then the section's own ``validate()``
runs). Errors are raised as the caller's error class, always naming the key.

Does not know any section: ``edge_agent.config`` and ``fleet_server.config`` declare theirs.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from edge_agent.errors import ConfigError

__all__ = ["apply_env", "build_section", "parse_scalar", "read_toml"]

T = TypeVar("T")


def read_toml(path: Path | None, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """The parsed file (an empty dict for ``None``).

    Raises:
        ConfigError (as ``error``): the file is unreadable or not valid TOML.
    """
    if path is None:
        return {}
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise error(f"cannot read config {path}: {exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise error(f"config {path} is not valid TOML: {exc}") from exc
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        raise error(f"config {path} is nested too deeply to be a config") from None


def apply_env(
    data: dict[str, Any],
    env: Mapping[str, str],
    prefix: str,
    error: type[ConfigError] = ConfigError,
) -> None:
    """Apply ``<prefix>SECTION__KEY=value`` overrides to ``data`` in place.

    Raises:
        ConfigError (as ``error``): an empty name, or a key below something that is not a table.
    """
    for key, raw in env.items():
        if not key.startswith(prefix):
            continue
        parts = [p.lower() for p in key[len(prefix) :].split("__")]
        if not all(parts):
            raise error(f"{key}: empty section or key name")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise error(f"{key}: {'.'.join(parts[:-1])} is not a section")
        node[parts[-1]] = parse_scalar(raw)


def parse_scalar(raw: str) -> Any:
    """A TOML scalar (``8``, ``true``, ``"x"``, ``1.5``), or the raw string when it is none."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        return raw


def build_section(
    cls: type[T],
    raw: Any,
    where: str,
    error: type[ConfigError] = ConfigError,
    *,
    wrap: Callable[[str, str], str] = lambda where, message: f"[{where}] {message}",
) -> T:
    """Build section ``where`` of dataclass ``cls`` from its table, then ``validate()`` it.

    A key whose default is None takes a string. Integers are accepted for float fields.

    Raises:
        ConfigError (as ``error``): not a table, an unknown key, a wrong type, a non-finite
            number, or what ``validate()`` refuses (its message passed through ``wrap``).
    """
    if not isinstance(raw, dict):
        raise error(f"[{where}] must be a table")
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(raw) - fields
    if unknown:
        raise error(f"unknown keys in [{where}]: {', '.join(sorted(unknown))}")
    defaults = cls()
    values: dict[str, Any] = {}
    for name, given in raw.items():
        default = getattr(defaults, name)
        expected: type[Any] = str if default is None else type(default)
        value = given
        if isinstance(value, int) and not isinstance(value, bool) and expected is float:
            value = float(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise error(f"{where}.{name} must be a finite number, got {value!r}")
        if isinstance(value, bool) is not (expected is bool) or not isinstance(value, expected):
            raise error(f"{where}.{name} must be {expected.__name__}, got {value!r}")
        values[name] = value
    obj = cls(**values)
    try:
        obj.validate()  # type: ignore[attr-defined]
    except ConfigError as exc:
        raise error(wrap(where, str(exc))) from exc
    return obj
