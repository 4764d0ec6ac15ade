"""The ``[retention]`` section of the server config: defaults, overrides, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet_server.config import load_config
from fleet_server.errors import ServerConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "fleet-server.example.toml"


def test_defaults_and_the_example_config(tmp_path: Path) -> None:
    r = load_config(None, env={}).retention
    assert (r.raw_days, r.fine_days, r.hour_days, r.delete_batch) == (3.0, 1.0, 400.0, 2000)
    assert load_config(EXAMPLE, env={}).retention == r


def test_overrides_from_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text("[retention]\nraw_days = 0.5\n")
    env = {"EDGEFLEET_SERVER__RETENTION__HOUR_DAYS": "30"}
    r = load_config(path, env=env).retention
    assert (r.raw_days, r.hour_days) == (0.5, 30.0)


@pytest.mark.parametrize(
    "line",
    ["raw_days = 0", "hour_days = 0.5", "delete_batch = 10", "interval_seconds = 0", "x = 1"],
)
def test_bad_values_are_refused(tmp_path: Path, line: str) -> None:
    path = tmp_path / "server.toml"
    path.write_text(f"[retention]\n{line}\n")
    with pytest.raises(ServerConfigError):
        load_config(path, env={})
