"""Loading the agent's configuration: TOML plus environment overrides, into one ``AgentConfig``.

Owns ``AgentConfig`` (every section, the top-level keys, the per-model policies and the checks
across sections), ``load_config`` and the resolution of relative paths. Does not own the
sections themselves and their validation (``edge_agent.config.sections``) nor TOML reading and
environment parsing (``edge_agent.common.config_loader``).

``load_config(path, env)`` is the only way in: it reads the file, applies overrides of the form
``EDGEFLEET_AGENT__<SECTION>__<KEY>=value`` (values parsed as TOML scalars, so ``true``, ``8``,
``"text"`` and bare strings all work), validates every field, and returns an ``AgentConfig``.
Unknown sections or keys are errors (a typo must not silently fall back to a default).

Per-model policy lives under ``[models.<name>]`` and falls back to ``[model_defaults]``.

``[labels]`` is a table of ``key = "value"`` the device reports about itself (its site, line,
camera position); ``edge_agent.wire.ops.labels`` says what a valid label is. The agent adds a few
detected facts (``hardware``, ``os``) that a configured label of the same key overrides.

Relative paths (so that an example config runs outside systemd, by hand, in any directory):
``store.state_dir`` and ``store.root_path`` are relative to the config file's directory (the
working directory without a file); ``sync.identity_dir``, ``api.unix_socket`` and
``grpc.unix_socket`` are relative to the state directory. Values from the environment follow the
same rules. Absolute paths are used as they are.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from edge_agent.common.config_loader import apply_env, build_section, read_toml
from edge_agent.config.sections import (
    ApiConfig,
    CaptureConfig,
    DriftConfig,
    FallbackConfig,
    GrpcConfig,
    ModelPolicy,
    RuntimeConfig,
    ServingConfig,
    StoreConfig,
    SyncConfig,
    as_table,
    check,
    is_loopback,
)
from edge_agent.errors import ConfigError, ContractError
from edge_agent.wire.ops.labels import check_labels

__all__ = ["ENV_PREFIX", "AgentConfig", "load_config"]

ENV_PREFIX = "EDGEFLEET_AGENT__"


@dataclass(frozen=True)
class AgentConfig:
    """Everything the daemon needs, validated."""

    device_id: str = "device"
    log_json: bool = False
    log_level: str = "info"
    api: ApiConfig = field(default_factory=ApiConfig)
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    fallback: FallbackConfig = field(default_factory=FallbackConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    model_defaults: ModelPolicy = field(default_factory=ModelPolicy)
    models: Mapping[str, ModelPolicy] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)

    def policy(self, model: str) -> ModelPolicy:
        """The policy of ``model``, or the defaults."""
        return self.models.get(model, self.model_defaults)


_SECTIONS: dict[str, type[Any]] = {
    "api": ApiConfig,
    "grpc": GrpcConfig,
    "store": StoreConfig,
    "runtime": RuntimeConfig,
    "drift": DriftConfig,
    "fallback": FallbackConfig,
    "capture": CaptureConfig,
    "sync": SyncConfig,
    "model_defaults": ModelPolicy,
}
_TOP = ("device_id", "log_json", "log_level")
T = TypeVar("T")


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Read ``path`` (TOML; ``None`` for defaults), apply ``env`` overrides, validate.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or an invalid value; the message
            names the key.
    """
    data = read_toml(path)
    apply_env(data, os.environ if env is None else env, ENV_PREFIX)
    return _resolve_paths(_build(data), path.parent if path is not None else Path.cwd())


def _resolve_paths(cfg: AgentConfig, base: Path) -> AgentConfig:
    """Make the relative paths absolute (see the module docstring)."""
    state = _under(base, cfg.store.state_dir)
    store = replace(cfg.store, state_dir=state, root_path=_under(base, cfg.store.root_path))
    sync = replace(cfg.sync, identity_dir=_under(Path(state), cfg.sync.identity_dir))
    socket = cfg.api.unix_socket
    api = replace(cfg.api, unix_socket=_under(Path(state), socket) if socket else socket)
    socket = cfg.grpc.unix_socket
    grpc = replace(cfg.grpc, unix_socket=_under(Path(state), socket) if socket else socket)
    return replace(cfg, store=store, sync=sync, api=api, grpc=grpc)


def _under(base: Path, value: str) -> str:
    if Path(value).is_absolute():
        return value
    return os.path.normpath((base / value).absolute())  # no symlink resolution, ".." folded


def _build(data: Mapping[str, Any]) -> AgentConfig:
    unknown = set(data) - set(_SECTIONS) - set(_TOP) - {"models", "serving", "labels"}
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    for key in _TOP:
        if key in data:
            kwargs[key] = data[key]
    for section, cls in _SECTIONS.items():
        kwargs[section] = _section(cls, data.get(section, {}), section)
    kwargs["serving"] = ServingConfig.from_table(data.get("serving", {}))
    defaults_raw = data.get("model_defaults", {})
    models_raw = data.get("models", {})
    if not isinstance(models_raw, dict):
        raise ConfigError("models must be a table of per-model tables")
    kwargs["models"] = {
        name: _section(
            ModelPolicy, {**defaults_raw, **as_table(body, f"models.{name}")}, f"models.{name}"
        )
        for name, body in models_raw.items()
    }
    try:
        kwargs["labels"] = check_labels(as_table(data.get("labels", {}), "labels"), "labels")
    except ContractError as exc:
        raise ConfigError(str(exc)) from exc
    cfg = AgentConfig(**kwargs)
    check(
        isinstance(cfg.device_id, str) and 0 < len(cfg.device_id) <= 128,
        "device_id must be a non-empty string",
    )
    check(isinstance(cfg.log_json, bool), "log_json must be true or false")
    check(
        cfg.log_level in ("debug", "info", "warning", "error"),
        "log_level must be debug, info, warning or error",
    )
    check(
        not (cfg.api.repository_control and cfg.grpc.enabled) or is_loopback(cfg.grpc.host),
        f"api.repository_control needs a loopback grpc.host, not {cfg.grpc.host!r}",
    )
    return cfg


def _section(cls: type[T], raw: Any, where: str) -> T:
    return build_section(cls, as_table(raw, where), where)
