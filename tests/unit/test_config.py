"""Agent configuration: TOML + environment overrides, validated once with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import load_config
from edge_agent.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "deploy" / "agent.example.toml"


def test_defaults_and_the_shipped_example_load() -> None:
    assert load_config(None, {}).api.port == 8080
    cfg = load_config(EXAMPLE, {})
    here = EXAMPLE.parent
    assert cfg.store.state_dir == str(here / "state")
    assert cfg.store.root_path == str(here / "root.json")
    assert cfg.api.unix_socket == str(here / "state" / "agent.sock")
    assert cfg.sync.identity_dir == str(here / "state" / "identity")
    assert cfg.policy("digits").validation == "reject"


def test_the_example_under_systemd_uses_the_units_paths() -> None:
    unit = (EXAMPLE.parent / "edge-agent.service").read_text()
    env = dict(
        line.removeprefix("Environment=").split("=", 1)
        for line in unit.splitlines()
        if line.startswith("Environment=EDGEFLEET_AGENT__")
    )
    cfg = load_config(EXAMPLE, env)
    assert cfg.store.state_dir == "/var/lib/edgefleet"
    assert cfg.api.unix_socket == "/run/edgefleet/agent.sock"
    assert cfg.sync.identity_dir == "/var/lib/edgefleet/identity"


def test_relative_paths_follow_the_config_file_and_the_state_dir(tmp_path: Path) -> None:
    f = tmp_path / "conf" / "a.toml"
    f.parent.mkdir()
    f.write_text(
        '[store]\nstate_dir = "../var"\nroot_path = "keys/root.json"\n'
        '[api]\nunix_socket = "run/a.sock"\n[sync]\nidentity_dir = "/abs/id"\n'
    )
    cfg = load_config(f, {"EDGEFLEET_AGENT__STORE__STATE_DIR": "../state"})
    assert cfg.store.state_dir == str(tmp_path / "state")
    assert cfg.store.root_path == str(tmp_path / "conf" / "keys" / "root.json")
    assert cfg.api.unix_socket == str(tmp_path / "state" / "run" / "a.sock")
    assert cfg.sync.identity_dir == "/abs/id"


def test_environment_overrides_file(tmp_path: Path) -> None:
    f = tmp_path / "a.toml"
    f.write_text('[api]\nport = 9000\n[models.digits]\nvalidation = "drop"\n')
    cfg = load_config(
        f,
        {
            "EDGEFLEET_AGENT__API__PORT": "9100",
            "EDGEFLEET_AGENT__FALLBACK__MODE": "prefer_device",
            "EDGEFLEET_AGENT__LOG_JSON": "true",
            "EDGEFLEET_AGENT__DRIFT__ALPHA": "0.05",
            "OTHER": "ignored",
        },
    )
    assert cfg.api.port == 9100
    assert cfg.fallback.mode == "prefer_device"
    assert cfg.log_json is True
    assert cfg.drift.alpha == 0.05
    assert cfg.policy("digits").validation == "drop"
    assert cfg.policy("other").validation == "reject"


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[api]\nprot = 1\n", {}, "unknown keys in \\[api\\]: prot"),
        ("[nope]\n", {}, "unknown config keys: nope"),
        ('[api]\nport = "x"\n', {}, "api.port must be int"),
        ("[api]\nport = 70000\n", {}, "0..65535"),
        ('[fallback]\nmode = "sometimes"\n', {}, "fallback.mode"),
        ('[model_defaults]\nvalidation = "ignore"\n', {}, "validation must be"),
        ("[models.m]\nab_fraction = 0.5\n", {}, "ab_fraction needs ab_candidate"),
        ("", {"EDGEFLEET_AGENT__API__PORT": "many"}, "api.port must be int"),
        ('log_level = "loud"\n', {}, "log_level"),
        ("[api\n", {}, "not valid TOML"),
        ("[drift]\nalpha = true\n", {}, "drift.alpha must be float"),
    ],
)
def test_bad_config_names_the_key(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    f = tmp_path / "a.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(f, env)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml", {})


def test_deeply_nested_config_is_a_config_error(tmp_path: Path) -> None:
    from edge_agent.common.config_loader import parse_scalar, read_toml

    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "agent.toml"
    path.write_text(f"v = {deep}\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        read_toml(path)
    assert parse_scalar(deep) == deep  # an env value that is no scalar stays a string
