"""The agent's configuration: frozen dataclasses loaded once from TOML plus environment overrides.

``load_config`` (``loader``) is the only way in and returns an ``AgentConfig``; each TOML section
is one frozen class that validates itself (``sections``). The public names are re-exported
here: callers import them from ``edge_agent.config``.
"""

from edge_agent.config.loader import ENV_PREFIX, AgentConfig, load_config
from edge_agent.config.sections import (
    FALLBACK_MODES,
    MAX_DRIFT_BUFFER_BYTES,
    MAX_POLICY_VERSIONS,
    MIN_DRIFT_BUFFER_BYTES,
    VALIDATION_POLICIES,
    VERSION_POLICY_KINDS,
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
    VersionPolicy,
    is_loopback,
)

__all__ = [
    "ENV_PREFIX",
    "FALLBACK_MODES",
    "MAX_DRIFT_BUFFER_BYTES",
    "MAX_POLICY_VERSIONS",
    "MIN_DRIFT_BUFFER_BYTES",
    "VALIDATION_POLICIES",
    "VERSION_POLICY_KINDS",
    "AgentConfig",
    "ApiConfig",
    "CaptureConfig",
    "DriftConfig",
    "FallbackConfig",
    "GrpcConfig",
    "ModelPolicy",
    "RuntimeConfig",
    "ServingConfig",
    "StoreConfig",
    "SyncConfig",
    "VersionPolicy",
    "is_loopback",
    "load_config",
]
