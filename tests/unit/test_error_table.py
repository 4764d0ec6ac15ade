"""The one error table: every error class answers exactly as it did before the table was one.

``PINNED`` was recorded from the boundaries as they were (the device API's ``API_STATUS`` loop,
the admin API's own table plus the rollout routes' 409s, and the three CLIs' exit-code maps)
and must never change by accident: a new error class gets a row here, a changed status is a
deliberate, documented decision. The classes are collected by walking the tree under
``EdgefleetError``, so a class that is missing here fails the test.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import edge_agent
import edge_agent.client
import edge_agent.serving.fallback
import fleet_server
import fleet_server.admin.body
import model_builder
import model_builder.errors
from edge_agent import errors as device
from edge_agent.errors import EdgefleetError, ErrorRow, ErrorTable
from fleet_server import errors as fleet
from fleet_server.admin.api import status_of

#: class -> (REST status from the service, gRPC code from the service, REST status from
#: decoding/encoding, admin API status, exit code of edge-agent, fleet-server, model-builder).
PINNED: dict[str, tuple[int, str, int, int, int, int, int]] = {
    "edge_agent.client.AgentRequestError": (500, "INTERNAL", 500, 400, 1, 1, 1),
    "edge_agent.client.AgentUnreachableError": (500, "INTERNAL", 500, 400, 1, 1, 1),
    "edge_agent.errors.AckOutOfRangeError": (500, "INTERNAL", 500, 400, 1, 1, 1),
    "edge_agent.errors.ClaimRefusedError": (500, "INTERNAL", 500, 400, 3, 3, 3),
    "edge_agent.errors.AdmissionError": (503, "UNAVAILABLE", 500, 400, 8, 8, 8),
    "edge_agent.errors.AgentUpdateError": (500, "INTERNAL", 500, 409, 8, 8, 8),
    "edge_agent.errors.BundleFormatError": (500, "INTERNAL", 500, 400, 3, 3, 3),
    "edge_agent.errors.BundleVerificationError": (500, "INTERNAL", 500, 400, 4, 4, 4),
    "edge_agent.errors.ConfigError": (500, "INTERNAL", 500, 400, 3, 3, 3),
    "edge_agent.errors.ContractError": (500, "INTERNAL", 500, 400, 3, 3, 3),
    "edge_agent.errors.DigestMismatchError": (500, "INTERNAL", 500, 400, 4, 4, 4),
    "edge_agent.errors.DriftError": (500, "INTERNAL", 500, 400, 1, 1, 1),
    "edge_agent.errors.EdgefleetError": (500, "INTERNAL", 500, 400, 1, 1, 1),
    "edge_agent.errors.ExpiredMetadataError": (500, "INTERNAL", 500, 400, 4, 4, 4),
    "edge_agent.errors.FallbackError": (503, "UNAVAILABLE", 500, 400, 1, 1, 1),
    "edge_agent.errors.FallbackRemoteError": (503, "UNAVAILABLE", 500, 400, 1, 1, 1),
    "edge_agent.errors.IdentityError": (500, "INTERNAL", 500, 400, 3, 3, 3),
    "edge_agent.errors.IncompatibleTargetError": (500, "INTERNAL", 500, 400, 4, 4, 4),
    "edge_agent.errors.InferenceError": (503, "UNAVAILABLE", 500, 400, 7, 7, 7),
    "edge_agent.errors.InputValidationError": (400, "INVALID_ARGUMENT", 400, 400, 3, 3, 3),
    "edge_agent.errors.LengthMismatchError": (500, "INTERNAL", 500, 400, 4, 4, 4),
    "edge_agent.errors.MetadataFormatError": (500, "INTERNAL", 500, 400, 4, 4, 4),
    "edge_agent.errors.MixAndMatchError": (500, "INTERNAL", 500, 400, 4, 4, 4),
    "edge_agent.errors.ModelLoadError": (503, "UNAVAILABLE", 500, 400, 7, 7, 7),
    "edge_agent.errors.ModelNotFoundError": (404, "NOT_FOUND", 404, 400, 8, 8, 8),
    "edge_agent.errors.ModelStoreError": (503, "UNAVAILABLE", 500, 400, 8, 8, 8),
    "edge_agent.errors.NotConnectedError": (500, "INTERNAL", 500, 503, 1, 1, 1),
    "edge_agent.errors.OutboxCorruptError": (500, "INTERNAL", 500, 400, 1, 1, 1),
    "edge_agent.errors.OutboxError": (500, "INTERNAL", 500, 400, 1, 1, 1),
    "edge_agent.errors.PayloadTooLargeError": (500, "INTERNAL", 500, 400, 1, 1, 1),
    "edge_agent.errors.PublishError": (500, "INTERNAL", 500, 503, 1, 1, 1),
    "edge_agent.errors.RateLimitedError": (429, "RESOURCE_EXHAUSTED", 429, 400, 1, 1, 1),
    "edge_agent.errors.RollbackError": (500, "INTERNAL", 500, 400, 4, 4, 4),
    "edge_agent.errors.RootRotationError": (500, "INTERNAL", 500, 400, 4, 4, 4),
    "edge_agent.errors.RuntimeAdapterError": (503, "UNAVAILABLE", 500, 400, 7, 7, 7),
    "edge_agent.errors.RuntimeUnavailableError": (503, "UNAVAILABLE", 500, 400, 7, 7, 7),
    "edge_agent.errors.SignatureThresholdError": (500, "INTERNAL", 500, 400, 4, 4, 4),
    "edge_agent.errors.UnknownRequestError": (404, "NOT_FOUND", 404, 400, 1, 1, 1),
    "edge_agent.errors.SubscribeError": (500, "INTERNAL", 500, 503, 1, 1, 1),
    "edge_agent.errors.TransferIncompleteError": (500, "INTERNAL", 500, 400, 3, 3, 3),
    "edge_agent.errors.TransferMismatchError": (500, "INTERNAL", 500, 400, 3, 3, 3),
    "edge_agent.errors.TransportError": (500, "INTERNAL", 500, 503, 1, 1, 1),
    "edge_agent.errors.TransportTimeoutError": (500, "INTERNAL", 500, 503, 1, 1, 1),
    "edge_agent.serving.fallback.CloudFallbackError": (503, "UNAVAILABLE", 500, 400, 1, 1, 1),
    "fleet_server.errors.AbortedVersionError": (500, "INTERNAL", 500, 409, 1, 3, 1),
    "fleet_server.errors.AdminApiError": (500, "INTERNAL", 500, 400, 1, 7, 1),
    "fleet_server.errors.AdminAuthError": (500, "INTERNAL", 500, 400, 1, 6, 1),
    # AdminInputError was fleet_server.admin.body's and carried its status (400, or 413 for a
    # body over its cap): both are rows of the table now, the 413 as its own family.
    "fleet_server.errors.AdminBodyTooLargeError": (500, "INTERNAL", 500, 413, 1, 1, 1),
    "fleet_server.errors.AdminInputError": (500, "INTERNAL", 500, 400, 1, 1, 1),
    "fleet_server.errors.AdminRequestError": (500, "INTERNAL", 500, 400, 1, 3, 1),
    "fleet_server.errors.AdminUnreachableError": (500, "INTERNAL", 500, 400, 1, 7, 1),
    "fleet_server.errors.BaselineUnavailableError": (500, "INTERNAL", 500, 404, 1, 3, 1),
    "fleet_server.errors.BrokerConfigError": (500, "INTERNAL", 500, 400, 1, 3, 1),
    "fleet_server.errors.BundleExistsError": (500, "INTERNAL", 500, 409, 1, 3, 1),
    "fleet_server.errors.BundleRejectedError": (500, "INTERNAL", 500, 400, 1, 4, 1),
    "fleet_server.errors.CsrRejectedError": (500, "INTERNAL", 500, 400, 1, 3, 1),
    "fleet_server.errors.DeviceExistsError": (500, "INTERNAL", 500, 409, 1, 3, 1),
    "fleet_server.errors.DeviceRevokedError": (500, "INTERNAL", 500, 409, 1, 3, 1),
    "fleet_server.errors.DriftMismatchError": (500, "INTERNAL", 500, 400, 1, 3, 1),
    "fleet_server.errors.EnrollmentError": (500, "INTERNAL", 500, 400, 1, 4, 1),
    "fleet_server.errors.EvalSetError": (500, "INTERNAL", 500, 503, 1, 7, 1),
    "fleet_server.errors.EvalSetRejectedError": (500, "INTERNAL", 500, 422, 1, 3, 1),
    "fleet_server.errors.FallbackServingError": (500, "INTERNAL", 500, 400, 1, 7, 1),
    "fleet_server.errors.FleetDriftError": (500, "INTERNAL", 500, 400, 1, 3, 1),
    "fleet_server.errors.FleetServerError": (500, "INTERNAL", 500, 400, 1, 1, 1),
    "fleet_server.errors.LibraryError": (500, "INTERNAL", 500, 503, 1, 7, 1),
    "fleet_server.errors.ModelNotPublishedError": (500, "INTERNAL", 500, 404, 1, 3, 1),
    "fleet_server.errors.NotFoundError": (500, "INTERNAL", 500, 404, 1, 3, 1),
    "fleet_server.errors.OfflineCheckError": (500, "INTERNAL", 500, 422, 1, 3, 1),
    "fleet_server.errors.OfflineRegressionError": (500, "INTERNAL", 500, 409, 1, 5, 1),
    "fleet_server.errors.PkiError": (500, "INTERNAL", 500, 400, 1, 6, 1),
    "fleet_server.errors.QuarantinedVersionError": (500, "INTERNAL", 500, 409, 1, 3, 1),
    "fleet_server.errors.RegistryError": (500, "INTERNAL", 500, 400, 1, 3, 1),
    "fleet_server.errors.RegistryUnavailableError": (500, "INTERNAL", 500, 503, 1, 7, 1),
    "fleet_server.errors.RolloutConflictError": (500, "INTERNAL", 500, 409, 1, 3, 1),
    "fleet_server.errors.RolloutError": (500, "INTERNAL", 500, 400, 1, 3, 1),
    "fleet_server.errors.RolloutPolicyError": (500, "INTERNAL", 500, 400, 1, 3, 1),
    "fleet_server.errors.RolloutStateError": (500, "INTERNAL", 500, 409, 1, 3, 1),
    "fleet_server.errors.ServerConfigError": (500, "INTERNAL", 500, 400, 3, 3, 3),
    "fleet_server.errors.TelemetryRejectedError": (500, "INTERNAL", 500, 400, 1, 3, 1),
    "fleet_server.errors.TokenExpiredError": (500, "INTERNAL", 500, 400, 1, 4, 1),
    "fleet_server.errors.TokenUnknownError": (500, "INTERNAL", 500, 400, 1, 4, 1),
    "fleet_server.errors.TokenUsedError": (500, "INTERNAL", 500, 400, 1, 4, 1),
    "fleet_server.errors.UnknownDeviceError": (500, "INTERNAL", 500, 404, 1, 3, 1),
    "fleet_server.errors.UnknownEvalSetError": (500, "INTERNAL", 500, 404, 1, 3, 1),
    "fleet_server.errors.UnknownGroupError": (500, "INTERNAL", 500, 404, 1, 3, 1),
    "fleet_server.errors.UnknownRolloutError": (500, "INTERNAL", 500, 404, 1, 3, 1),
    "fleet_server.errors.AccountError": (500, "INTERNAL", 500, 400, 1, 3, 1),
    "fleet_server.errors.AccountExistsError": (500, "INTERNAL", 500, 409, 1, 3, 1),
    "fleet_server.errors.LastAdminError": (500, "INTERNAL", 500, 409, 1, 3, 1),
    "fleet_server.errors.PasswordPolicyError": (500, "INTERNAL", 500, 400, 1, 3, 1),
    "fleet_server.errors.AuthenticationError": (500, "INTERNAL", 500, 401, 1, 6, 1),
    "fleet_server.errors.AccountLockedError": (500, "INTERNAL", 500, 429, 1, 6, 1),
    "fleet_server.errors.ForbiddenError": (500, "INTERNAL", 500, 403, 1, 6, 1),
    "fleet_server.errors.CsrfError": (500, "INTERNAL", 500, 403, 1, 6, 1),
    "fleet_server.errors.UnknownAccountError": (500, "INTERNAL", 500, 404, 1, 3, 1),
    "fleet_server.errors.UnknownApiTokenError": (500, "INTERNAL", 500, 404, 1, 3, 1),
    "fleet_server.errors.ClaimPendingError": (500, "INTERNAL", 500, 400, 1, 4, 1),
    "fleet_server.errors.ClaimRefusedError": (500, "INTERNAL", 500, 400, 1, 4, 1),
    "fleet_server.errors.RenewalRefusedError": (500, "INTERNAL", 500, 400, 1, 6, 1),
    "fleet_server.errors.LabelError": (500, "INTERNAL", 500, 400, 1, 3, 1),
    "fleet_server.errors.SelectorSyntaxError": (500, "INTERNAL", 500, 400, 1, 3, 1),
    "fleet_server.errors.UnknownLabelGroupError": (500, "INTERNAL", 500, 404, 1, 3, 1),
    "fleet_server.errors.UnknownWindowError": (500, "INTERNAL", 500, 404, 1, 3, 1),
    "fleet_server.errors.WindowInvalidError": (500, "INTERNAL", 500, 400, 1, 3, 1),
    "edge_agent.errors.CommandArgumentError": (500, "INTERNAL", 500, 400, 3, 3, 3),
    "edge_agent.errors.CommandFailedError": (500, "INTERNAL", 500, 400, 3, 3, 3),
    "edge_agent.errors.CommandLimitError": (500, "INTERNAL", 500, 400, 3, 3, 3),
    "edge_agent.errors.CommandRefusedError": (500, "INTERNAL", 500, 400, 3, 3, 3),
    "edge_agent.errors.UnknownCommandError": (500, "INTERNAL", 500, 400, 3, 3, 3),
    "fleet_server.errors.CommandQueueFullError": (500, "INTERNAL", 500, 429, 1, 3, 1),
    "fleet_server.errors.DiagnosticsError": (500, "INTERNAL", 500, 503, 1, 7, 1),
    "fleet_server.errors.SupportBundleNotReadyError": (500, "INTERNAL", 500, 409, 1, 3, 1),
    "fleet_server.errors.UnknownCommandRecordError": (500, "INTERNAL", 500, 404, 1, 3, 1),
    "fleet_server.errors.CaptureError": (500, "INTERNAL", 500, 503, 1, 7, 1),
    "fleet_server.errors.CapturePolicyError": (500, "INTERNAL", 500, 400, 1, 3, 1),
    "fleet_server.errors.DatasetUnusableError": (500, "INTERNAL", 500, 409, 1, 3, 1),
    "fleet_server.errors.UnknownDatasetError": (500, "INTERNAL", 500, 404, 1, 3, 1),
    "model_builder.errors.AccuracyGateError": (500, "INTERNAL", 500, 400, 1, 1, 5),
    "model_builder.errors.ChampionMismatchError": (500, "INTERNAL", 500, 400, 1, 1, 3),
    "model_builder.errors.ChampionRegressionError": (500, "INTERNAL", 500, 400, 1, 1, 5),
    "model_builder.errors.ContractMismatchError": (500, "INTERNAL", 500, 400, 1, 1, 3),
    "model_builder.errors.InputDataError": (500, "INTERNAL", 500, 400, 1, 1, 3),
    "model_builder.errors.KeyStoreError": (500, "INTERNAL", 500, 400, 1, 1, 6),
    "model_builder.errors.ModelBuilderError": (500, "INTERNAL", 500, 400, 1, 1, 7),
    "model_builder.errors.ModelCheckError": (500, "INTERNAL", 500, 400, 1, 1, 7),
    "model_builder.errors.QuantizationError": (500, "INTERNAL", 500, 400, 1, 1, 7),
}

_IMPORTED = (edge_agent.client, edge_agent.serving.fallback, fleet_server.admin.body, model_builder)


def _tree(cls: type[EdgefleetError]) -> list[type[EdgefleetError]]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _tree(sub))]


def _import_everything() -> None:
    """Import every module of the three packages, so an error class defined anywhere is found
    whichever tests ran before (a class in a module no earlier test imported was missed)."""
    for package in (edge_agent, fleet_server, model_builder):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if ".migrations." in info.name:  # Alembic revision scripts need Alembic's context
                continue
            importlib.import_module(info.name)


_import_everything()
CLASSES = sorted(set(_tree(EdgefleetError)), key=lambda c: f"{c.__module__}.{c.__qualname__}")


def _instance(cls: type[EdgefleetError]) -> EdgefleetError:
    exc = cls.__new__(cls)  # some families need keyword arguments; the mapping reads the type
    Exception.__init__(exc, "x")
    return exc


def test_every_error_class_is_pinned() -> None:
    names = {f"{c.__module__}.{c.__qualname__}" for c in CLASSES}
    assert names == set(PINNED)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__qualname__)
def test_each_boundary_answers_as_pinned(cls: type[EdgefleetError]) -> None:
    exc = _instance(cls)
    http, grpc, http_around, admin, exit_agent, exit_fleet, exit_builder = PINNED[
        f"{cls.__module__}.{cls.__qualname__}"
    ]
    assert device.api_status(exc) == (http, grpc)
    around = (http, grpc) if http_around == http else (500, "INTERNAL")
    assert device.api_status(exc, from_service=False) == around
    assert status_of(exc) == admin
    assert device.ERRORS.exit_code(exc) == exit_agent
    assert fleet.ERRORS.exit_code(exc) == exit_fleet
    assert model_builder.errors.ERRORS.exit_code(exc) == exit_builder


def test_a_table_refuses_a_family_twice_and_extending_keeps_the_original() -> None:
    base = ErrorTable([ErrorRow(device.ConfigError, exit=3)])
    with pytest.raises(ValueError, match="ConfigError"):
        base.extend([ErrorRow(device.ConfigError, exit=4)])
    wider = base.extend([ErrorRow(device.DriftError, exit=5)])
    assert (base.exit_code(device.DriftError("x")), wider.exit_code(device.DriftError("x"))) == (
        1,
        5,
    )


def test_a_row_with_an_http_status_names_its_grpc_code() -> None:
    with pytest.raises(ValueError, match="gRPC"):
        ErrorTable([ErrorRow(device.DriftError, http=400)])


def test_the_answers_without_a_family_and_what_the_front_ends_share_are_pinned() -> None:
    from edge_agent.api import metrics as m
    from edge_agent.api import outcomes

    assert (device.INTERNAL_STATUS, device.TOO_LARGE_STATUS) == (
        (500, "INTERNAL"),
        (413, "RESOURCE_EXHAUSTED"),
    )
    assert (device.NOT_READY_HTTP, device.READ_TIMEOUT_HTTP, device.DISCONNECTED_HTTP) == (
        503,
        408,
        400,
    )
    assert outcomes.RATE_LIMITED_STATUS == (429, "RESOURCE_EXHAUSTED")
    assert (outcomes.NOT_FOUND_HTTP, outcomes.INTERNAL_HTTP) == (404, 500)
    assert outcomes.OUTCOME_BY_STATUS == {
        400: m.OUTCOME_INVALID,
        404: m.OUTCOME_NOT_FOUND,
        413: m.OUTCOME_TOO_LARGE,
        429: m.OUTCOME_RATE_LIMITED,
        503: m.OUTCOME_UNAVAILABLE,
    }
    assert (outcomes.outcome_of(409), outcomes.UDS_CLIENT) == (m.OUTCOME_ERROR, "uds")
    assert (fleet.ADMIN_UNAUTHORIZED_STATUS, fleet.ADMIN_INTERNAL_STATUS) == (401, 500)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (TimeoutError("lock held"), device.EXIT_STORE),
        (FileNotFoundError("no such file"), device.EXIT_BAD_INPUT),
        (PermissionError("denied"), device.EXIT_BAD_INPUT),
        (OSError("disk"), device.EXIT_BAD_INPUT),
        (KeyError("a bug"), device.EXIT_UNEXPECTED),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_the_builtins_every_cli_answers_have_rows(exc: BaseException, code: int) -> None:
    for table in (device.ERRORS, fleet.ERRORS, model_builder.errors.ERRORS):
        assert table.exit_code(exc) == code
    assert device.api_status(exc) == device.INTERNAL_STATUS  # no API answer: still a bug
    assert status_of(exc) == device.ADMIN_DEFAULT_STATUS  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (TimeoutError("lock held"), 8),
        (FileNotFoundError("no such file"), 3),
        (device.RollbackError("older"), 4),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_run_cli_exits_with_the_tables_code(exc: BaseException, code: int) -> None:
    import click

    from edge_agent.cli.support import run_cli

    @click.command()
    def fails() -> None:
        raise exc

    with pytest.raises(SystemExit) as exited:
        run_cli(fails, device.ERRORS, argv=[])
    assert exited.value.code == code
