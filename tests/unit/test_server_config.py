"""fleet_server.config: defaults, file + env overrides, unknown keys, bad values (named)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet_server.config import GatewayConfig, load_config
from fleet_server.errors import ServerConfigError


def test_defaults_derive_paths_from_state_dir() -> None:
    cfg = load_config(None, {})
    assert cfg.registry.url == "sqlite:////var/lib/edgefleet-server/registry.db"
    assert cfg.gateway.bundles_dir == "/var/lib/edgefleet-server/bundles"
    assert (cfg.api.host, cfg.api.port, cfg.api.token, cfg.api.token_file) == (
        "127.0.0.1",
        8780,
        None,
        None,
    )
    assert cfg.mqtt.client_id == "fleet.server"
    assert cfg.signing.desired_ttl_seconds == 86400


def test_file_then_env_override(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(
        'log_level = "debug"\n'
        "[registry]\n"
        f'state_dir = "{tmp_path}"\n'
        "[api]\n"
        "port = 9000\n"
        'token_file = "/etc/token"\n'
        "[gateway]\n"
        "resend_round_seconds = 1\n"
    )
    env = {
        "EDGEFLEET_SERVER__API__PORT": "9001",
        "EDGEFLEET_SERVER__MQTT__HOST": "broker.example",
        "EDGEFLEET_SERVER__SIGNING__DESIRED_TTL_SECONDS": "600",
        "OTHER": "ignored",
    }
    cfg = load_config(path, env)
    assert cfg.log_level == "debug"
    assert cfg.api.port == 9001
    assert cfg.api.token_file == "/etc/token"
    assert cfg.mqtt.host == "broker.example"
    assert cfg.signing.desired_ttl_seconds == 600
    assert cfg.gateway.resend_round_seconds == 1.0  # int accepted for a float
    assert cfg.registry.url == f"sqlite:///{tmp_path / 'registry.db'}"
    assert cfg.gateway.bundles_dir == str(tmp_path / "bundles")


def test_explicit_url_is_kept() -> None:
    url = "postgresql+psycopg://fleet@db/fleet"
    assert load_config(None, {"EDGEFLEET_SERVER__REGISTRY__URL": url}).registry.url == url


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"EDGEFLEET_SERVER__API__PORTT": "1"}, "portt"),
        ({"EDGEFLEET_SERVER__NOPE__X": "1"}, "nope"),
        ({"EDGEFLEET_SERVER__API__PORT": "70000"}, "api.port"),
        ({"EDGEFLEET_SERVER__API__PORT": '"80"'}, "api.port"),
        ({"EDGEFLEET_SERVER__API__PORT": "true"}, "api.port"),
        ({"EDGEFLEET_SERVER__API__TOKEN": "short"}, "api.token"),
        (
            {"EDGEFLEET_SERVER__API__TOKEN": "x" * 20, "EDGEFLEET_SERVER__API__TOKEN_FILE": "/t"},
            "api.token",
        ),
        ({"EDGEFLEET_SERVER__MQTT__PORT": "0"}, "mqtt.port"),
        ({"EDGEFLEET_SERVER__MQTT__CLIENT_ID": '"bad id"'}, "mqtt.client_id"),
        ({"EDGEFLEET_SERVER__MQTT__SESSION_EXPIRY": "-1"}, "mqtt.session_expiry"),
        # "a/b" is a valid prefix since the server takes the agents' and broker's rule
        # (Topics.check_prefix); these are not.
        ({"EDGEFLEET_SERVER__GATEWAY__PREFIX": '"a/#"'}, "gateway.prefix"),
        ({"EDGEFLEET_SERVER__GATEWAY__PREFIX": '"a//b"'}, "gateway.prefix"),
        ({"EDGEFLEET_SERVER__GATEWAY__PREFIX": '"a/b\\n"'}, "gateway.prefix"),
        ({"EDGEFLEET_SERVER__GATEWAY__BLOCK_SIZE": "10"}, "gateway.block_size"),
        (
            {"EDGEFLEET_SERVER__GATEWAY__RESEND_ROUND_SECONDS": "nan"},
            "gateway.resend_round_seconds",
        ),
        ({"EDGEFLEET_SERVER__SIGNING__DESIRED_TTL_SECONDS": "5"}, "signing.desired_ttl_seconds"),
        ({"EDGEFLEET_SERVER__REGISTRY__URL": '"mysql://x"'}, "registry.url"),
        ({"EDGEFLEET_SERVER__LOG_LEVEL": "loud"}, "log_level"),
        ({"EDGEFLEET_SERVER__API": "3"}, "[api]"),
    ],
)
def test_bad_values_are_refused_naming_the_key(env: dict[str, str], names: str) -> None:
    with pytest.raises(ServerConfigError) as info:
        load_config(None, env)
    assert names in str(info.value)


def test_unknown_top_level_key_and_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text("[apii]\nport = 1\n")
    with pytest.raises(ServerConfigError, match="apii"):
        load_config(path, {})
    path.write_text("[api\n")
    with pytest.raises(ServerConfigError, match="not valid TOML"):
        load_config(path, {})
    with pytest.raises(ServerConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml", {})


def test_example_config_loads() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "fleet-server.example.toml"
    cfg = load_config(example, {})
    assert cfg.api.token_file is not None


def test_the_gateway_section_is_the_gateway_config(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text('[gateway]\nbundles_dir = "bundles"\ndevice_burst = 7\n')
    cfg = load_config(path, {})
    assert type(cfg.gateway) is GatewayConfig  # one class: what the TOML gives the gateway takes
    assert (cfg.gateway.bundles_dir, cfg.gateway.device_burst) == ("bundles", 7)
    cfg.gateway.validate()


def test_the_gateway_refusals_apply_when_loading() -> None:
    # Values the gateway refuses at start are refused when the file is read, naming the key.
    for key, value in (("BLOCK_SIZE", "2048"), ("INGEST_MAX_BATCH", "20000")):
        with pytest.raises(ServerConfigError, match=f"gateway.{key.lower()}"):
            load_config(None, {f"EDGEFLEET_SERVER__GATEWAY__{key}": value})
