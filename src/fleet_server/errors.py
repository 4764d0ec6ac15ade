"""Every error fleet_server raises on purpose, grouped by who has to react.

Families:
    PkiError           the fleet CA cannot do what was asked: CA files missing or corrupt, a
                       CSR that must not be signed (``CsrRejectedError``), a device id that is
                       unknown or already taken by another role.
    EnrollmentError    a device's enrollment token is unknown, expired or already used; the
                       operator issues a new token.
    BrokerConfigError  the broker configuration cannot be written as asked (bad prefix, port,
                       names); the operator fixes the arguments.

Each error has a stable ``code`` used as a metric label and in the CLI's one-line diagnosis;
codes never change meaning once released.
"""

from __future__ import annotations

from edge_agent.errors import EdgefleetError


class FleetServerError(EdgefleetError):
    """Base of every error raised on purpose by fleet_server."""

    code = "fleet_server_error"


class PkiError(FleetServerError):
    """The fleet CA cannot perform the operation (missing/corrupt CA files, unknown device)."""

    code = "pki_error"


class CsrRejectedError(PkiError):
    """A certificate signing request that must not be signed.

    ``reason`` is a stable label: ``malformed``, ``bad_signature``, ``cn_mismatch``,
    ``san_mismatch``, ``key_type``, ``ca_requested``, ``bad_device_id``, ``role_conflict``.
    """

    code = "csr_rejected"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class EnrollmentError(FleetServerError):
    """An enrollment token cannot be redeemed."""

    code = "enrollment_refused"


class TokenUnknownError(EnrollmentError):
    """No enrollment token with this value exists (mistyped, or never issued)."""

    code = "token_unknown"


class TokenExpiredError(EnrollmentError):
    """The enrollment token is past its expiry."""

    code = "token_expired"


class TokenUsedError(EnrollmentError):
    """The enrollment token was already redeemed (tokens are single use)."""

    code = "token_used"


class BrokerConfigError(FleetServerError):
    """The broker configuration cannot be produced from the given settings."""

    code = "broker_config_invalid"


class RegistryError(FleetServerError):
    """Base of the registry's errors (defined here, not in ``fleet_server.errors``)."""

    code = "registry_error"


class RegistryUnavailableError(RegistryError):
    """The database cannot be reached or failed the operation (locked, down, disk full)."""

    code = "registry_unavailable"


class UnknownDeviceError(RegistryError):
    """No device with this id is enrolled."""

    code = "device_unknown"


class DeviceExistsError(RegistryError):
    """The device id is already enrolled and not revoked."""

    code = "device_exists"


class DeviceRevokedError(RegistryError):
    """The device is revoked; nothing new is assigned to it."""

    code = "device_revoked"


class BundleExistsError(RegistryError):
    """A different bundle with this ``(name, version)`` is already published."""

    code = "bundle_exists"


class TelemetryRejectedError(RegistryError):
    """An ingest call is structurally wrong (bad seq, foreign device, floor above the batch)."""

    code = "telemetry_rejected"
