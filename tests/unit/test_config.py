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
    assert cfg.api.unix_socket == "/run/edgefleet/agent.sock"
    assert cfg.policy("digits").validation == "reject"


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
