"""Every error edge_agent raises, grouped by who has to react.

Families:
    ContractError            a manifest, contract or sketch that does not follow the schema
                             (a builder or integration bug; the operator fixes the input).
    BundleFormatError        a bundle file that cannot be read as a bundle (truncated, missing
                             member, not a tar); the transfer or the disk is at fault.
    BundleVerificationError  a security outcome: the bundle is not trusted. Subclasses name the
                             attack that was stopped, so telemetry can count them by kind.
    RuntimeAdapterError      a model that fails to load or to run in its runtime.
    InputValidationError     a request that does not fit the model's input contract.
    DriftError               sketches that cannot be combined (different edges, shapes).
    ConfigError              the agent's configuration is invalid (the operator fixes it).
    ModelStoreError          install/activate/load/rollback failed (disk, state, memory budget).
    FallbackError            the cloud could not answer in time or is switched off.
    UnknownRequestError      feedback names a request whose answer is not remembered (never
                             seen, already labelled, forgotten or expired).
    RateLimitedError         a client exceeded its request rate.
    TransportError           the MQTT connection cannot carry the message (not connected, refused).
    OutboxError              the on-disk telemetry outbox refused or failed (full, corrupt).
    CommandRefusedError      a signed remote command the device will not run: an unknown name,
                             arguments outside their bounds, over the command rate or the
                             upload budget, or nothing to act on (the operator's request).
                             A command that is not authentic, fresh, addressed to this device
                             or new is a ``BundleVerificationError`` like any signed document.
    AgentUpdateError         the agent's own update cannot be staged (busy, failed here before,
                             no launcher, the side-by-side install failed).

Each error has a stable ``code`` used as a metric label and in telemetry; codes never change
meaning once released.

``ERRORS`` (at the end) is the one table of how each family answers at every boundary: its HTTP
status and gRPC code on the local inference API, its admin API status and its CLI exit code.
``fleet_server.errors`` and ``model_builder.errors`` extend it with their own families (a new
table each; this module imports neither). The boundaries only read it: REST
(``edge_agent.api.endpoints``), gRPC (``edge_agent.api.grpc_v2.service``), the admin API
(``fleet_server.admin.api``) and the three CLIs (``edge_agent.cli.support.run_cli``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class EdgefleetError(Exception):
    """Base of every error raised on purpose by edgefleet."""

    code = "edgefleet_error"


class ContractError(EdgefleetError):
    """A manifest, input contract or serialised sketch does not follow its schema."""

    code = "contract_invalid"


class BundleFormatError(EdgefleetError):
    """A bundle file is not a readable bundle (truncated, wrong members, oversized member)."""

    code = "bundle_format"


class BundleVerificationError(EdgefleetError):
    """The bundle, or the metadata naming it, is not trusted. Never install it."""

    code = "bundle_untrusted"


class MetadataFormatError(BundleVerificationError):
    """Signed metadata cannot be parsed, or is of the wrong type."""

    code = "metadata_malformed"


class SignatureThresholdError(BundleVerificationError):
    """Fewer valid signatures from trusted keys than the role's threshold.

    Covers unknown keys, revoked or rotated-out keys, and missing co-signatures.
    """

    code = "signature_threshold"


class ExpiredMetadataError(BundleVerificationError):
    """A signed document is past its expiry at the reference time (freeze attack)."""

    code = "metadata_expired"


class RollbackError(BundleVerificationError):
    """A version older than the one already trusted or installed (rollback attack)."""

    code = "rollback"


class DigestMismatchError(BundleVerificationError):
    """Bytes whose SHA-256 differs from the signed one (tampering or mix-and-match)."""

    code = "digest_mismatch"


class LengthMismatchError(BundleVerificationError):
    """Bytes longer or shorter than the signed length (endless data or truncation)."""

    code = "length_mismatch"


class MixAndMatchError(BundleVerificationError):
    """Pieces of different signed targets were combined into one bundle."""

    code = "mix_and_match"


class IncompatibleTargetError(BundleVerificationError):
    """The bundle is signed for another runtime, runtime version, architecture or accelerator."""

    code = "incompatible_target"


class RootRotationError(BundleVerificationError):
    """A new root is not signed by both the old and the new thresholds, or skips a version."""

    code = "root_rotation"


class RuntimeAdapterError(EdgefleetError):
    """A runtime failed to load or run a model."""

    code = "runtime_error"


class RuntimeUnavailableError(RuntimeAdapterError):
    """The runtime a bundle needs is not installed on this device."""

    code = "runtime_unavailable"


class ModelLoadError(RuntimeAdapterError):
    """The model bytes were rejected by the runtime."""

    code = "model_load"


class InferenceError(RuntimeAdapterError):
    """The runtime raised while running a loaded model."""

    code = "inference_failed"


class InputValidationError(EdgefleetError):
    """A request does not fit the input contract.

    ``field`` names the offending input, ``reason`` is a stable label (``dtype``, ``rank``,
    ``shape``, ``batch_too_large``, ``payload_too_large``, ``nan``, ``inf``, ``out_of_range``, ...)
    and ``counts`` holds per-row problem counts by reason when rows were the problem.
    """

    code = "input_invalid"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        reason: str = "invalid",
        counts: dict[str, int] | None = None,
    ) -> None:
        super().__init__(message)
        self.field = field
        self.reason = reason
        self.counts = counts or {}


class DriftError(EdgefleetError):
    """Sketches cannot be merged or scored (different edges, feature counts or versions)."""

    code = "drift_incompatible"


class ConfigError(EdgefleetError):
    """The agent's configuration file or environment overrides are invalid."""

    code = "config_invalid"


class ModelStoreError(EdgefleetError):
    """The model store cannot install, activate, load or roll back (disk, state, budget)."""

    code = "model_store"


class ModelNotFoundError(ModelStoreError):
    """No such model (or version) is installed or loaded."""

    code = "model_not_found"


class AdmissionError(ModelStoreError):
    """Loading the model would exceed the configured memory budget."""

    code = "memory_budget"


class UnknownRequestError(EdgefleetError):
    """Feedback names a request whose answer the agent does not remember (or no longer).

    ``expired``: the answer was remembered but is older than the memory keeps answers.
    """

    code = "request_unknown"

    def __init__(self, message: str, *, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


class FallbackError(EdgefleetError):
    """The cloud fallback could not answer (no transport, deadline, breaker open, budget spent)."""

    code = "fallback_unavailable"


class FallbackRemoteError(FallbackError):
    """The cloud answered a fallback request with an error or with an unusable answer.

    ``remote_code`` is the response's error code (``bad_request``, ``unknown_model``,
    ``inference_failed``, ``overloaded``, ``internal``) or ``bad_response``.
    """

    code = "fallback_remote_error"

    def __init__(self, message: str, *, remote_code: str) -> None:
        super().__init__(message)
        self.remote_code = remote_code


class RateLimitedError(EdgefleetError):
    """A client sent more requests than its rate limit allows."""

    code = "rate_limited"


class IdentityError(ConfigError):
    """The device's identity material is invalid: a bad device id, a key that cannot be read,
    or an issued certificate that does not chain to the fleet CA or does not match the key."""

    code = "identity_invalid"


class ClaimRefusedError(IdentityError):
    """The CA refused this device's enrollment claim; ``reason`` is the CA's stable label
    (revoked, expired, used up, an existing identity)."""

    code = "claim_refused"

    def __init__(self, message: str, *, reason: str = "refused") -> None:
        super().__init__(message)
        self.reason = reason


class TransportError(EdgefleetError):
    """The broker could not be reached or did not accept an operation."""

    code = "transport"


class NotConnectedError(TransportError):
    """The client has no live session with the broker right now."""

    code = "transport_not_connected"


class PublishError(TransportError):
    """paho refused to queue a message (bad topic, queue full, connection lost)."""

    code = "transport_publish"


class SubscribeError(TransportError):
    """The broker refused a subscription (SUBACK failure reason code)."""

    code = "transport_subscribe"


class TransportTimeoutError(TransportError):
    """An acknowledgement or response did not arrive in time, or waiting would deadlock."""

    code = "transport_timeout"


class AgentUpdateError(EdgefleetError):
    """The agent's own update cannot be staged (an update already in progress, a release that
    failed its trial here, no launcher, or the side-by-side install failed)."""

    code = "agent_update"


class OutboxError(EdgefleetError):
    """The outbox cannot do what was asked (I/O failure, bad argument, unknown schema).

    Defined here rather than in ``errors.py`` because only the outbox raises it.
    """

    code = "outbox"


class PayloadTooLargeError(OutboxError):
    """A single payload is larger than the whole outbox may hold."""

    code = "outbox_payload_too_large"


class AckOutOfRangeError(OutboxError):
    """An ack names a ``seq`` that was never assigned: the server is confused."""

    code = "outbox_ack_out_of_range"


class OutboxCorruptError(OutboxError):
    """The database file is damaged; see ``Outbox.recover``."""

    code = "outbox_corrupt"


class TransferMismatchError(ContractError):
    """A block message belongs to another transfer (another bundle, length or block size)."""

    code = "transfer_mismatch"


class TransferIncompleteError(ContractError):
    """The transfer was asked to finish before every block arrived (a caller bug)."""

    code = "transfer_incomplete"


class CommandRefusedError(EdgefleetError):
    """A verified remote command the device refuses to run (see the subclasses)."""

    code = "command_refused"


class UnknownCommandError(CommandRefusedError):
    """The command's name is not on the device's fixed list."""

    code = "command_unknown"


class CommandArgumentError(CommandRefusedError):
    """The command's arguments are missing, unknown, of the wrong type or out of bounds."""

    code = "command_arguments"


class CommandLimitError(CommandRefusedError):
    """Over the device's command rate, its daily upload budget or its pending uploads."""

    code = "command_limited"


class CommandFailedError(CommandRefusedError):
    """A valid command that could not be carried out (no such model loaded, bundle too big)."""

    code = "command_failed"


#: Exit codes every CLI shares (``edge_agent.cli.support`` exits with them; docs/*.md list them).
EXIT_OK = 0
EXIT_UNEXPECTED = 1  # a bug: please report it with the traceback from EDGEFLEET_DEBUG=1
EXIT_USAGE = 2  # click's usage errors
EXIT_BAD_INPUT = 3  # data, contract, config or bundle file format
EXIT_UNTRUSTED = 4  # a signature, expiry, version or compatibility check refused a bundle
EXIT_GATE = 5  # accuracy gate failed
EXIT_KEYS = 6  # key store problem
EXIT_RUNTIME = 7  # model or runtime problem (load, quantize, run)
EXIT_STORE = 8  # model store problem (disk full, nothing to roll back to, corrupt state)
EXIT_MISSING_EXTRA = 9  # the command needs an optional extra that is not installed

#: Anything the local inference API has no row for: an opaque internal error (the traceback
#: goes to the log, never to the client).
INTERNAL_STATUS = (500, "INTERNAL")
#: A request larger than the API accepts (HTTP 413; gRPC's own size limit answers the same way).
TOO_LARGE_STATUS = (413, "RESOURCE_EXHAUSTED")
#: What the admin API answers for an error family it has no row for (the operator's request).
ADMIN_DEFAULT_STATUS = 400
#: REST answers with no error family behind them (gRPC has no such answer: its probes say
#: ``ready=False``, grpc itself times reads out and sees no disconnected client's request).
NOT_READY_HTTP = 503  # a probe, or a model, that is not live / not ready
READ_TIMEOUT_HTTP = 408  # the body did not arrive within ``body_read_seconds``
DISCONNECTED_HTTP = 400  # the client went away mid-body (it never reads the answer)


@dataclass(frozen=True)
class ErrorRow:
    """How one error family answers at each boundary. ``None``: this row says nothing there.

    Attributes:
        family: the error class (one of ours, or the few builtins a CLI answers: ``OSError``,
            ``TimeoutError``); its subclasses answer the same unless they have a row.
        http: the local inference API's HTTP status (REST), with ``grpc``, the gRPC status
            code name the same failure gets on the gRPC API.
        admin: the fleet server's admin API status.
        exit: every CLI's exit code.
    """

    family: type[BaseException]
    http: int | None = None
    grpc: str | None = None
    admin: int | None = None
    exit: int | None = None


class ErrorTable:
    """The one table from error families to HTTP status, gRPC code, admin status and exit code.

    An error answers by the first class in its MRO (most specific first) whose row fills the
    column asked for; with none, the boundary's default (500/INTERNAL, admin 400, exit 1).
    Immutable: a package adds its families with ``extend`` (a new table), so ``edge_agent``
    never imports the packages above it.
    """

    def __init__(self, rows: Iterable[ErrorRow]) -> None:
        """Index ``rows``.

        Raises:
            ValueError: a family has two rows, or a row gives an HTTP status without a gRPC
                code (or the other way round).
        """
        self.rows: tuple[ErrorRow, ...] = tuple(rows)
        self._by_family: dict[type, ErrorRow] = {}
        for row in self.rows:
            if row.family in self._by_family:
                raise ValueError(f"two rows for {row.family.__name__}")
            if (row.http is None) is not (row.grpc is None):
                raise ValueError(f"{row.family.__name__}: an HTTP status needs its gRPC code")
            self._by_family[row.family] = row

    def extend(self, rows: Iterable[ErrorRow]) -> ErrorTable:
        """A new table: these rows plus ``rows``.

        Raises:
            ValueError: as the constructor (a family already in this table, for one).
        """
        return ErrorTable((*self.rows, *rows))

    def _row(self, exc: BaseException | type[BaseException], column: str) -> ErrorRow | None:
        cls = exc if isinstance(exc, type) else type(exc)
        for family in cls.__mro__:
            row = self._by_family.get(family)
            if row is not None and getattr(row, column) is not None:
                return row
        return None

    def api_status(
        self, exc: BaseException | type[BaseException], *, from_service: bool = True
    ) -> tuple[int, str]:
        """(HTTP status, gRPC status code name) on the local inference API.

        ``from_service``: the inference service raised it. Families that mean "cannot answer
        now" (503 / UNAVAILABLE) only do so then; raised while decoding or encoding around the
        service they are a bug (``INTERNAL_STATUS``), as is any family without a row.
        """
        row = self._row(exc, "http")
        if row is None or row.http is None or row.grpc is None:
            return INTERNAL_STATUS
        if row.http == 503 and not from_service:
            return INTERNAL_STATUS
        return row.http, row.grpc

    def admin_status(self, exc: BaseException | type[BaseException]) -> int:
        """The fleet server's admin API status (``ADMIN_DEFAULT_STATUS`` without a row)."""
        row = self._row(exc, "admin")
        return ADMIN_DEFAULT_STATUS if row is None or row.admin is None else row.admin

    def exit_code(self, exc: BaseException | type[BaseException]) -> int:
        """The CLI exit code (``EXIT_UNEXPECTED`` without a row)."""
        row = self._row(exc, "exit")
        return EXIT_UNEXPECTED if row is None or row.exit is None else row.exit


#: The families of edge_agent (fleet_server and model_builder ``extend`` it with theirs in their
#: ``errors.py``). Read by the local inference API (REST and gRPC), the admin API and every CLI.
ERRORS = ErrorTable(
    (
        ErrorRow(InputValidationError, http=400, grpc="INVALID_ARGUMENT", exit=EXIT_BAD_INPUT),
        ErrorRow(ModelNotFoundError, http=404, grpc="NOT_FOUND"),
        ErrorRow(UnknownRequestError, http=404, grpc="NOT_FOUND"),
        ErrorRow(RateLimitedError, http=429, grpc="RESOURCE_EXHAUSTED"),
        ErrorRow(RuntimeAdapterError, http=503, grpc="UNAVAILABLE", exit=EXIT_RUNTIME),
        ErrorRow(FallbackError, http=503, grpc="UNAVAILABLE"),
        ErrorRow(ModelStoreError, http=503, grpc="UNAVAILABLE", exit=EXIT_STORE),
        ErrorRow(AgentUpdateError, admin=409, exit=EXIT_STORE),
        ErrorRow(BundleVerificationError, admin=400, exit=EXIT_UNTRUSTED),
        ErrorRow(BundleFormatError, admin=400, exit=EXIT_BAD_INPUT),
        ErrorRow(ContractError, admin=400, exit=EXIT_BAD_INPUT),
        ErrorRow(ConfigError, exit=EXIT_BAD_INPUT),
        ErrorRow(TransportError, admin=503),
        ErrorRow(CommandRefusedError, admin=400, exit=EXIT_BAD_INPUT),
        # Not ours, but every CLI answers them: a lock held too long (the store's file lock) and
        # any other file or OS failure (a path that does not exist, a permission).
        ErrorRow(TimeoutError, exit=EXIT_STORE),
        ErrorRow(OSError, exit=EXIT_BAD_INPUT),
    )
)

#: The local inference API's rows of ``ERRORS`` as (family, HTTP status, gRPC code name).
API_STATUS: tuple[tuple[type[BaseException], int, str], ...] = tuple(
    (row.family, row.http, row.grpc)
    for row in ERRORS.rows
    if row.http is not None and row.grpc is not None
)


def api_status(exc: BaseException, *, from_service: bool = True) -> tuple[int, str]:
    """(HTTP status, gRPC status code name) of ``exc`` on the local inference API (``ERRORS``).

    ``from_service``: the inference service raised it (not decoding or encoding around it).
    """
    return ERRORS.api_status(exc, from_service=from_service)
