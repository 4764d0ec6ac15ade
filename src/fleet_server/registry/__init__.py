"""The fleet registry: devices, bundles, desired/reported state and telemetry in SQL.

SQLAlchemy 2 over SQLite (default, WAL) or PostgreSQL (by URL, for several workers); the schema is
managed by the Alembic revisions in ``migrations/``. Open with ``Registry.open(url)`` and call
``upgrade()`` before use. ``RegistryError`` and its subclasses live in ``fleet_server.errors``
and are re-exported here.
"""

from __future__ import annotations

from fleet_server.errors import (
    BundleExistsError,
    DeviceExistsError,
    DeviceRevokedError,
    RegistryError,
    RegistryUnavailableError,
    TelemetryRejectedError,
    UnknownDeviceError,
)
from fleet_server.registry.rollouts import (
    QuarantineRecord,
    RolloutEvent,
    rollout_from_dict,
    rollout_to_dict,
)
from fleet_server.registry.store import (
    BundleRecord,
    DesiredRecord,
    DeviceRecord,
    IngestResult,
    Registry,
    SeqState,
    StoredTelemetry,
    TelemetryEntry,
)

__all__ = [
    "BundleExistsError",
    "BundleRecord",
    "DesiredRecord",
    "DeviceExistsError",
    "DeviceRecord",
    "DeviceRevokedError",
    "IngestResult",
    "QuarantineRecord",
    "Registry",
    "RegistryError",
    "RegistryUnavailableError",
    "RolloutEvent",
    "SeqState",
    "StoredTelemetry",
    "TelemetryEntry",
    "TelemetryRejectedError",
    "UnknownDeviceError",
    "rollout_from_dict",
    "rollout_to_dict",
]
