"""Roles, permissions, and which permission every admin API route needs.

Owns: the four built-in roles (``Role``), the permissions (``Permission``), the matrix of which
role holds which permission (``allows``), the route table (``ROUTE_PERMISSIONS``, keyed by the
admin guard's action name, e.g. ``"POST /v1/devices"``) and the authenticated caller
(``Principal``). Pure: no I/O. Does not own: how a caller is authenticated
(``fleet_server.accounts.store``, ``fleet_server.admin.auth``) nor the routes themselves.

The roles follow Mender's built-in ones (Admin, Release Manager, Read Only, with an operator
role for the people who look after devices day to day)::

    permission          admin  release-manager  operator  viewer
    read                  x          x              x        x
    self                  x          x              x        x
    audit.read            x          x              x
    devices.write         x                         x          (enroll, device labels)
    devices.revoke        x                         x
    diagnostics           x                         x
    models.publish        x          x
    releases              x          x
    schedules             x          x              x          (label groups, windows)
    datasets              x          x                         (capture upload, export)
    rollouts.control      x          x              x
    evalsets.write        x          x
    keys                  x
    accounts.admin        x

``self`` is what any account may do to itself: ``GET /v1/whoami``, its own API tokens, its
own password. An operator may pause, resume and abort a rollout (stopping a bad release is
everyone's job) but not create or approve one. ``diagnostics`` is sending remote commands
(ping, logs, support bundle, restart, health check) and downloading support bundles, which
hold device logs and configuration; reading a command's state is ``read``. A route missing
from ``ROUTE_PERMISSIONS`` is refused to everyone (``permission_for`` returns ``None``: fail
closed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final

__all__ = [
    "ROLE_PERMISSIONS",
    "ROUTE_PERMISSIONS",
    "Permission",
    "Principal",
    "Role",
    "allows",
    "permission_for",
    "role_at_most",
]


class Role(StrEnum):
    """A built-in role, highest first."""

    ADMIN = "admin"
    RELEASE_MANAGER = "release-manager"
    OPERATOR = "operator"
    VIEWER = "viewer"


class Permission(StrEnum):
    """What a route or console action needs."""

    READ = "read"  # every GET of fleet state: status, devices, models, rollouts, drift, ...
    SELF = "self"  # whoami, the caller's own tokens and password
    AUDIT_READ = "audit.read"
    DEVICES_WRITE = "devices.write"  # enroll
    DEVICES_REVOKE = "devices.revoke"
    DIAGNOSTICS = "diagnostics"  # remote commands to devices, support-bundle downloads
    MODELS_PUBLISH = "models.publish"  # upload a signed bundle
    RELEASES = "releases"  # assign, waves, create and approve rollouts, overrides
    ROLLOUTS_CONTROL = "rollouts.control"  # pause, resume, abort
    SCHEDULES = "schedules"  # label groups and maintenance windows
    DATASETS = "datasets"  # capture upload from devices, and exporting what it collected
    EVALSETS_WRITE = "evalsets.write"
    KEYS = "keys"  # builder root rotation
    ACCOUNTS_ADMIN = "accounts.admin"  # every account, every token


_P = Permission
_VIEWER = frozenset({_P.READ, _P.SELF})
_OPERATOR = _VIEWER | {
    _P.AUDIT_READ,
    _P.DEVICES_WRITE,
    _P.DEVICES_REVOKE,
    _P.DIAGNOSTICS,
    _P.ROLLOUTS_CONTROL,
    _P.SCHEDULES,
}
_RELEASE = _VIEWER | {
    _P.AUDIT_READ,
    _P.MODELS_PUBLISH,
    _P.RELEASES,
    _P.ROLLOUTS_CONTROL,
    _P.EVALSETS_WRITE,
    _P.SCHEDULES,
    _P.DATASETS,
}

#: The matrix: each role's permissions.
ROLE_PERMISSIONS: Final[Mapping[Role, frozenset[Permission]]] = MappingProxyType(
    {
        Role.ADMIN: frozenset(Permission),
        Role.RELEASE_MANAGER: _RELEASE,
        Role.OPERATOR: _OPERATOR,
        Role.VIEWER: _VIEWER,
    }
)


def allows(role: Role, permission: Permission) -> bool:
    """Whether ``role`` holds ``permission``."""
    return permission in ROLE_PERMISSIONS[role]


def role_at_most(role: Role, ceiling: Role) -> bool:
    """Whether ``role`` grants nothing ``ceiling`` does not (a token's role against its
    account's): its permissions are a subset of the ceiling's."""
    return ROLE_PERMISSIONS[role] <= ROLE_PERMISSIONS[ceiling]


#: Every admin API route by the guard's action name (``"METHOD /path"``) and what it needs.
ROUTE_PERMISSIONS: Final[Mapping[str, Permission]] = MappingProxyType(
    {
        "GET /metrics": _P.READ,
        "GET /v1/status": _P.READ,
        "GET /v1/devices": _P.READ,
        "GET /v1/devices/{device_id}": _P.READ,
        "GET /v1/misbehaviour": _P.READ,
        "GET /v1/models": _P.READ,
        "GET /v1/models/{name}/{version}": _P.READ,
        "GET /v1/models/{name}/accuracy": _P.READ,
        "GET /v1/telemetry": _P.READ,
        "GET /v1/drift": _P.READ,
        "GET /v1/rollouts": _P.READ,
        "GET /v1/rollouts/{rollout_id}": _P.READ,
        "GET /v1/evalsets": _P.READ,
        "GET /v1/evalsets/{sha256}": _P.READ,
        "GET /v1/root": _P.READ,
        "GET /v1/agent/releases": _P.READ,
        "GET /v1/audit": _P.AUDIT_READ,
        "GET /v1/audit/export": _P.AUDIT_READ,
        "POST /v1/devices": _P.DEVICES_WRITE,
        "POST /v1/devices/{device_id}/revoke": _P.DEVICES_REVOKE,
        "POST /v1/devices/{device_id}/commands": _P.DIAGNOSTICS,
        "POST /v1/groups/{group}/commands": _P.DIAGNOSTICS,
        "GET /v1/devices/{device_id}/support-bundles/{command_id}": _P.DIAGNOSTICS,
        "GET /v1/devices/{device_id}/commands": _P.READ,
        "GET /v1/commands/{command_id}": _P.READ,
        "GET /v1/diagnostics/stats": _P.READ,
        # Labels: a device's labels are device administration; label groups and maintenance
        # windows (what a rollout may touch, and when) are shared by releases and operations.
        "GET /v1/devices/{device_id}/labels": _P.READ,
        "POST /v1/devices/{device_id}/labels": _P.DEVICES_WRITE,
        "GET /v1/label-groups": _P.READ,
        "GET /v1/label-groups/{name}": _P.READ,
        "PUT /v1/label-groups/{name}": _P.SCHEDULES,
        "DELETE /v1/label-groups/{name}": _P.SCHEDULES,
        "GET /v1/windows": _P.READ,
        "PUT /v1/windows/{name}": _P.SCHEDULES,
        "DELETE /v1/windows/{name}": _P.SCHEDULES,
        "POST /v1/capture/{model}/enable": _P.DATASETS,
        "POST /v1/capture/{model}/disable": _P.DATASETS,
        "POST /v1/capture/{model}/collect": _P.DATASETS,
        "GET /v1/capture": _P.READ,
        "GET /v1/datasets": _P.READ,
        "GET /v1/datasets/{sha256}": _P.READ,
        "GET /v1/datasets/{sha256}/export": _P.DATASETS,
        "GET /v1/capture/{model}/export": _P.DATASETS,
        "POST /v1/datasets/{sha256}/evalset": _P.EVALSETS_WRITE,
        "POST /v1/models": _P.MODELS_PUBLISH,
        "POST /v1/assign": _P.RELEASES,
        "POST /v1/agent/releases": _P.MODELS_PUBLISH,
        "POST /v1/agent/assign": _P.RELEASES,
        "POST /v1/waves": _P.RELEASES,
        "POST /v1/rollouts": _P.RELEASES,
        "POST /v1/rollouts/{rollout_id}/approve": _P.RELEASES,
        "POST /v1/rollouts/{rollout_id}/pause": _P.ROLLOUTS_CONTROL,
        "POST /v1/rollouts/{rollout_id}/resume": _P.ROLLOUTS_CONTROL,
        "POST /v1/rollouts/{rollout_id}/abort": _P.ROLLOUTS_CONTROL,
        "POST /v1/evalsets": _P.EVALSETS_WRITE,
        "POST /v1/root": _P.KEYS,
        # Accounts (fleet_server.admin.accounts): the handlers of the ``self`` routes also
        # require accounts.admin when the object is another account.
        "GET /v1/whoami": _P.SELF,
        "GET /v1/accounts": _P.ACCOUNTS_ADMIN,
        "POST /v1/accounts": _P.ACCOUNTS_ADMIN,
        "GET /v1/accounts/{name}": _P.ACCOUNTS_ADMIN,
        "POST /v1/accounts/{name}/disable": _P.ACCOUNTS_ADMIN,
        "POST /v1/accounts/{name}/enable": _P.ACCOUNTS_ADMIN,
        "POST /v1/accounts/{name}/role": _P.ACCOUNTS_ADMIN,
        "POST /v1/accounts/{name}/password": _P.SELF,
        "GET /v1/tokens": _P.SELF,
        "POST /v1/tokens": _P.SELF,
        "POST /v1/tokens/{token_id}/revoke": _P.SELF,
    }
)


def permission_for(action: str) -> Permission | None:
    """The permission the route ``action`` needs; ``None`` for a route not in the table (the
    guard refuses it to everyone)."""
    return ROUTE_PERMISSIONS.get(action)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    ``via`` is how it authenticated: ``"token"`` (a per-account API token), ``"session"`` (a
    console session cookie) or ``"bootstrap-token"`` (the configured shared token).
    ``credential`` names the credential without revealing it: the token id or the session id.
    ``role`` is the effective role: a token's own role, never above its account's current one.
    """

    account: str
    role: Role
    via: str
    credential: str

    def allows(self, permission: Permission) -> bool:
        """Whether this caller's role holds ``permission``."""
        return allows(self.role, permission)
