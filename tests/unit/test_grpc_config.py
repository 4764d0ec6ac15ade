"""``[grpc]``: defaults, validation, the socket path relative to the state directory, env."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import ENV_PREFIX, GrpcConfig, load_config
from edge_agent.errors import ConfigError


def test_defaults_and_file(tmp_path: Path) -> None:
    assert load_config(None, {}).grpc == GrpcConfig()
    assert GrpcConfig().enabled is False  # off by default: docs/agent.md has the RSS it costs
    config = tmp_path / "agent.toml"
    config.write_text(
        '[store]\nstate_dir = "state"\n[grpc]\nenabled = true\nport = 0\nunix_socket = "g.sock"\n'
    )
    loaded = load_config(config, {}).grpc
    assert loaded.enabled
    assert loaded.port == 0
    assert loaded.unix_socket == str(tmp_path / "state" / "g.sock")
    env = {ENV_PREFIX + "GRPC__MAX_WORKERS": "2", ENV_PREFIX + "GRPC__UNIX_SOCKET": "/run/g.sock"}
    assert load_config(config, env).grpc.max_workers == 2
    assert load_config(config, env).grpc.unix_socket == "/run/g.sock"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("port = 70000", "grpc.port"),
        ("max_message_bytes = 10", "grpc.max_message_bytes"),
        ("max_workers = 0", "grpc.max_workers"),
        ("enabled = 1", "grpc"),
        ("unknown = 1", "unknown"),
    ],
)
def test_invalid_values_are_config_errors(tmp_path: Path, text: str, match: str) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f"[grpc]\n{text}\n")
    with pytest.raises(ConfigError, match=match):
        load_config(config, {})
