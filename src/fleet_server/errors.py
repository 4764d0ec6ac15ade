"""Every error fleet_server raises on purpose, grouped by who has to react.

Families:
    PkiError           the fleet CA cannot do what was asked: CA files missing or corrupt, a
                       CSR that must not be signed (``CsrRejectedError``), a device id that is
                       unknown or already taken by another role, a certificate renewal
                       the CA refuses (``RenewalRefusedError``).
    EnrollmentError    a device's enrollment token is unknown, expired or already used; the
                       operator issues a new token. A provisioning claim that refuses a device
                       (``ClaimRefusedError``) or waits for approval (``ClaimPendingError``).
    BrokerConfigError  the broker configuration cannot be written as asked (bad prefix, port,
                       names); the operator fixes the arguments.
    ServerConfigError  the server's TOML/env configuration is invalid (also a ``ConfigError``).
    LibraryError       a bundle cannot be published: untrusted or unreadable
                       (``BundleRejectedError``) or the library directory failed.
    NotFoundError      a named model version or group does not exist.
    AdminApiError      the admin API client could not get an answer: unreachable, token refused,
                       or the server's own error (``AdminRequestError`` keeps its code).
    RolloutError       a rollout cannot be created or commanded as asked: invalid policy,
                       a command that does not fit its state, a quarantined version, a
                       candidate the offline comparison refuses (``OfflineRegressionError``)
                       or cannot run on the evaluation set (``OfflineCheckError``).
    EvalSetError       a labelled evaluation set cannot be registered or read: a malformed or
                       oversized file (``EvalSetRejectedError``) or the directory failed.
    AccountError       an operator account, API token or session request refused: a bad name,
                       a weak password (``PasswordPolicyError``), an account that exists,
                       a login that failed (``AuthenticationError``, ``AccountLockedError``),
                       a role the caller may not use (``ForbiddenError``, ``CsrfError``).
    DiagnosticsError   a remote command cannot be issued or read as asked: too many pending
                       for a device (``CommandQueueFullError``), a support bundle not
                       uploaded (yet) (``SupportBundleNotReadyError``), or the state file
                       failed.
    LabelError         a device label, label selector or maintenance window refused as given
                       (``SelectorSyntaxError`` keeps the position); the operator fixes it.
    CaptureError       capture upload or a dataset cannot be used as asked: no policy for the
                       model (``CapturePolicyError``), a dataset that cannot become an
                       evaluation set (``DatasetUnusableError``), or storage failed.
    AdminInputError    an admin API request refused as given: a malformed body, field or query
                       value (``code`` says which), or a body over its cap
                       (``AdminBodyTooLargeError``).

Each error has a stable ``code`` used as a metric label and in the CLI's one-line diagnosis;
codes never change meaning once released. ``ERRORS`` (at the end) is edge_agent's one error
table extended with these families' admin API statuses and exit codes; the admin API
(``fleet_server.admin.api``) and the ``fleet-server`` CLI read it. The admin API's two answers
with no error family behind them are ``ADMIN_UNAUTHORIZED_STATUS`` and ``ADMIN_INTERNAL_STATUS``.
"""

from __future__ import annotations

from edge_agent import errors as device_errors
from edge_agent.errors import (
    EXIT_BAD_INPUT,
    EXIT_GATE,
    EXIT_KEYS,
    EXIT_RUNTIME,
    EXIT_UNTRUSTED,
    ConfigError,
    EdgefleetError,
    ErrorRow,
)


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


class RenewalRefusedError(PkiError):
    """The CA refuses a device's certificate renewal.

    ``reason`` is one of ``edge_agent.wire.ops.certs.REFUSAL_REASONS``.
    """

    code = "renewal_refused"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ClaimRefusedError(EnrollmentError):
    """A provisioning claim does not admit this device.

    ``reason``: ``unknown``, ``revoked``, ``expired``, ``full``, ``device_exists``,
    ``key_mismatch``, or ``csr_rejected`` (the CSR failed the CA's checks).
    """

    code = "claim_refused"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ClaimPendingError(EnrollmentError):
    """The claim needs an operator's approval of this device first; ask again later.

    ``record`` is the claim record with the device now pending (``fleet_server.pki.claims``).
    """

    code = "claim_pending"

    def __init__(self, message: str, *, record: object = None) -> None:
        super().__init__(message)
        self.record = record


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


class ServerConfigError(FleetServerError, ConfigError):
    """The server configuration is unreadable or invalid; the message names the key."""

    code = "server_config_invalid"


class LibraryError(FleetServerError):
    """The bundle library cannot store or find a bundle file (disk full, file missing)."""

    code = "bundle_library"


class BundleRejectedError(LibraryError):
    """A bundle offered for publication is not trusted or not readable.

    ``reason`` is the code of the underlying check (``signature_threshold``,
    ``digest_mismatch``, ``bundle_format``, ``unreadable``, ``too_large`` ...).
    """

    code = "bundle_rejected"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class NotFoundError(FleetServerError):
    """Something the operator named does not exist (model version, group, wave bundle)."""

    code = "not_found"


class ModelNotPublishedError(NotFoundError):
    """No bundle of this name and version (or digest) is published."""

    code = "model_unknown"


class UnknownGroupError(NotFoundError):
    """No active (non-revoked) device belongs to the group."""

    code = "group_unknown"


class UnknownLabelGroupError(NotFoundError):
    """No label group (a named selector) of this name is defined."""

    code = "label_group_unknown"


class UnknownWindowError(NotFoundError):
    """No maintenance window of this name is defined."""

    code = "window_unknown"


class LabelError(FleetServerError):
    """A label, selector, label group or maintenance window is refused as given."""

    code = "label_invalid"


class SelectorSyntaxError(LabelError):
    """A label selector that does not parse; ``position`` is the 0-based character offset."""

    code = "selector_invalid"

    def __init__(self, message: str, *, position: int) -> None:
        super().__init__(f"{message} (at character {position})")
        self.position = position


class WindowInvalidError(LabelError):
    """A maintenance window definition that is refused (weekday, time, duration, time zone)."""

    code = "window_invalid"


class AdminApiError(FleetServerError):
    """Base of the admin API client's errors (the CLI side of ``fleet_server.admin.api``)."""

    code = "admin_error"


class AdminUnreachableError(AdminApiError):
    """The admin API cannot be reached (refused, timed out, DNS, TLS)."""

    code = "admin_unreachable"


class AdminAuthError(AdminApiError):
    """The admin API refused the bearer token (missing or wrong)."""

    code = "admin_unauthorized"


class AdminRequestError(AdminApiError):
    """The admin API answered with an error; ``status`` and the server's ``server_code`` kept."""

    code = "admin_request_failed"

    def __init__(self, message: str, *, status: int, server_code: str) -> None:
        super().__init__(message)
        self.status = status
        self.server_code = server_code


class AdminInputError(EdgefleetError):
    """A request the admin API refuses as given (400), with a stable ``code``.

    ``code`` is ``bad_request`` (a field or query value of the wrong type, out of range, too
    long, with control characters) or ``bad_json`` (a body that is not strict JSON).
    """

    code = "bad_request"

    def __init__(self, message: str, *, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


class AdminBodyTooLargeError(AdminInputError):
    """A request body over its cap, declared or while it streams (413 ``too_large``)."""

    code = "too_large"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="too_large")


class FleetDriftError(FleetServerError):
    """A fleet drift query cannot be answered as asked (bad cohort spec, time, parameters)."""

    code = "fleet_drift"


class DriftMismatchError(FleetDriftError):
    """Drift windows that cannot be merged with each other or with the baseline.

    ``reason`` is a stable label: ``features`` (different feature counts) or ``edges``
    (different bin edges: the window was counted against another baseline).
    """

    code = "drift_mismatch"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class BaselineUnavailableError(NotFoundError):
    """The drift baseline of a published model version cannot be read from its bundle file."""

    code = "baseline_unavailable"


class FallbackServingError(FleetServerError):
    """Cloud fallback models cannot be served: a models directory or bundle that cannot be
    loaded, a model that onnxruntime refuses, or an invalid worker setting."""

    code = "fallback_serving"


class RolloutError(FleetServerError):
    """Base of the rollout engine's errors: the operator changes the request or the rollout."""

    code = "rollout_error"


class RolloutPolicyError(RolloutError):
    """A rollout policy or target selector is invalid (the message names the field)."""

    code = "rollout_policy_invalid"


class RolloutStateError(RolloutError):
    """The command does not apply to the rollout's state (approve a completed rollout ...)."""

    code = "rollout_state"


class RolloutConflictError(RolloutStateError):
    """The rollout changed since it was read (another worker's command or step): read again."""

    code = "rollout_conflict"


class QuarantinedVersionError(RolloutError):
    """The model version is quarantined after repeated aborted rollouts; it is not rolled out."""

    code = "version_quarantined"


class AbortedVersionError(RolloutError):
    """A rollout of the model version was aborted before; it is rolled out again only with an
    operator's override and its recorded reason."""

    code = "version_aborted"


class OfflineRegressionError(RolloutError):
    """The candidate is worse than the version it replaces on the model's evaluation set,
    beyond the policy's offline limits; it is rolled out only with an operator's override and
    its recorded reason. ``reasons`` lists each regression."""

    code = "offline_regression"

    def __init__(self, message: str, *, reasons: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.reasons = reasons


class OfflineCheckError(RolloutError):
    """The offline comparison cannot run: the evaluation set does not fit a version's inputs or
    outputs, or a version's bundle cannot be loaded. Overridable like a regression."""

    code = "offline_check_failed"


class EvalSetError(FleetServerError):
    """An evaluation set cannot be stored or read (the directory failed, a file is missing)."""

    code = "evalset_error"


class EvalSetRejectedError(EvalSetError):
    """An evaluation set file that is not registered: ``reason`` is a stable label
    (``too_large``, ``not_npz``, ``members``, ``bad_array``, ``dtype``, ``shape``, ``length``,
    ``labels``, ``non_finite``, ``empty``, ``bad_text``)."""

    code = "evalset_rejected"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class UnknownEvalSetError(NotFoundError):
    """No evaluation set with this digest (for this model) is registered."""

    code = "evalset_unknown"


class UnknownRolloutError(NotFoundError):
    """No rollout with this id exists."""

    code = "rollout_unknown"


class AccountError(FleetServerError):
    """An account, API token or session operation refused as asked (the message says why)."""

    code = "account_error"


class AccountExistsError(AccountError):
    """An account with this name already exists."""

    code = "account_exists"


class LastAdminError(AccountError):
    """The change would leave no enabled admin account (disable, or a lower role)."""

    code = "last_admin"


class PasswordPolicyError(AccountError):
    """A new password does not meet the policy (too short, too long, control characters)."""

    code = "password_policy"


class AuthenticationError(AccountError):
    """A login failed: unknown account, wrong password or disabled account (one answer for
    all three, so a caller cannot tell which)."""

    code = "login_failed"


class AccountLockedError(AuthenticationError):
    """Too many failed logins in a row: the account refuses logins until ``until``."""

    code = "account_locked"


class ForbiddenError(AccountError):
    """The caller's role does not allow the action (or the route is not in the table)."""

    code = "forbidden"


class CsrfError(ForbiddenError):
    """A cookie-authenticated write without the session's CSRF token."""

    code = "csrf_failed"


class UnknownAccountError(NotFoundError):
    """No account with this name exists."""

    code = "account_unknown"


class UnknownApiTokenError(NotFoundError):
    """No API token with this id exists (for this account)."""

    code = "api_token_unknown"


class DiagnosticsError(FleetServerError):
    """Remote diagnostics failed on the server (its state file, its upload directory)."""

    code = "diagnostics_error"


class CommandQueueFullError(DiagnosticsError):
    """A device already has the most pending commands the server keeps for one device."""

    code = "command_queue_full"


class SupportBundleNotReadyError(DiagnosticsError):
    """The command has no verified support bundle (not a support-bundle command, still
    uploading, failed or expired)."""

    code = "support_bundle_not_ready"


class UnknownCommandRecordError(NotFoundError):
    """No command with this id (for this device) was issued by this server."""

    code = "unknown_command"


class CaptureError(FleetServerError):
    """Capture upload or the datasets failed on the server (storage, the registry)."""

    code = "capture_error"


class CapturePolicyError(CaptureError):
    """The capture request does not fit: no policy for the model, an empty cohort, a bad
    selector or setting."""

    code = "capture_policy"


class DatasetUnusableError(CaptureError):
    """A dataset cannot be used as asked (an evaluation set needs one labelled float input)."""

    code = "dataset_unusable"


class UnknownDatasetError(NotFoundError):
    """No dataset with this digest is stored."""

    code = "unknown_dataset"


#: The admin API's answer to a missing or wrong bearer token (no error is raised for it).
ADMIN_UNAUTHORIZED_STATUS = 401
#: The admin API's answer to anything that is not one of our errors (a bug; no details).
ADMIN_INTERNAL_STATUS = 500

#: ``edge_agent.errors.ERRORS`` plus fleet_server's families (admin API status, exit code).
ERRORS = device_errors.ERRORS.extend(
    (
        ErrorRow(PkiError, exit=EXIT_KEYS),
        ErrorRow(CsrRejectedError, exit=EXIT_BAD_INPUT),
        ErrorRow(EnrollmentError, exit=EXIT_UNTRUSTED),
        ErrorRow(BrokerConfigError, exit=EXIT_BAD_INPUT),
        ErrorRow(ServerConfigError, exit=EXIT_BAD_INPUT),
        ErrorRow(FleetDriftError, exit=EXIT_BAD_INPUT),
        ErrorRow(RolloutError, exit=EXIT_BAD_INPUT),
        # A command that does not fit the rollout's state, or a version that needs an override.
        ErrorRow(RolloutStateError, admin=409),
        ErrorRow(QuarantinedVersionError, admin=409),
        ErrorRow(AbortedVersionError, admin=409),
        # The candidate regressed on the evaluation set: an override with a reason, or a fix.
        ErrorRow(OfflineRegressionError, admin=409, exit=EXIT_GATE),
        ErrorRow(OfflineCheckError, admin=422),
        ErrorRow(EvalSetError, admin=503, exit=EXIT_RUNTIME),  # the disk, not the file
        ErrorRow(EvalSetRejectedError, admin=422, exit=EXIT_BAD_INPUT),
        ErrorRow(FallbackServingError, exit=EXIT_RUNTIME),
        ErrorRow(RegistryError, admin=400, exit=EXIT_BAD_INPUT),
        ErrorRow(RegistryUnavailableError, admin=503, exit=EXIT_RUNTIME),
        ErrorRow(UnknownDeviceError, admin=404),
        ErrorRow(DeviceExistsError, admin=409),
        ErrorRow(DeviceRevokedError, admin=409),
        ErrorRow(BundleExistsError, admin=409),
        ErrorRow(LibraryError, admin=503, exit=EXIT_RUNTIME),  # the disk, not the bundle
        ErrorRow(BundleRejectedError, admin=400, exit=EXIT_UNTRUSTED),
        ErrorRow(NotFoundError, admin=404, exit=EXIT_BAD_INPUT),
        ErrorRow(AdminApiError, exit=EXIT_RUNTIME),
        ErrorRow(AdminUnreachableError, exit=EXIT_RUNTIME),
        ErrorRow(AdminAuthError, exit=EXIT_KEYS),
        ErrorRow(AdminRequestError, exit=EXIT_BAD_INPUT),
        ErrorRow(DiagnosticsError, admin=503, exit=EXIT_RUNTIME),
        ErrorRow(CommandQueueFullError, admin=429, exit=EXIT_BAD_INPUT),
        ErrorRow(SupportBundleNotReadyError, admin=409, exit=EXIT_BAD_INPUT),
        ErrorRow(CaptureError, admin=503, exit=EXIT_RUNTIME),
        ErrorRow(CapturePolicyError, admin=400, exit=EXIT_BAD_INPUT),
        ErrorRow(DatasetUnusableError, admin=409, exit=EXIT_BAD_INPUT),
        ErrorRow(AdminInputError, admin=400),
        ErrorRow(LabelError, admin=400, exit=EXIT_BAD_INPUT),
        ErrorRow(AdminBodyTooLargeError, admin=413),
        ErrorRow(AccountError, admin=400, exit=EXIT_BAD_INPUT),
        ErrorRow(AccountExistsError, admin=409),
        ErrorRow(LastAdminError, admin=409),
        ErrorRow(PasswordPolicyError, admin=400),
        ErrorRow(AuthenticationError, admin=401, exit=EXIT_KEYS),
        ErrorRow(AccountLockedError, admin=429, exit=EXIT_KEYS),
        ErrorRow(ForbiddenError, admin=403, exit=EXIT_KEYS),
        ErrorRow(CsrfError, admin=403, exit=EXIT_KEYS),
        ErrorRow(UnknownAccountError, admin=404),
        ErrorRow(UnknownApiTokenError, admin=404),
    )
)
