"""The console's direct assignment: one published version to one device or to every device of
a group, outside a rollout (``POST /v1/assign``; the models page's form). The service's
checks hold as for the API: a quarantined version or one whose rollout was aborted needs an
override reason, which the audit log keeps.

Owns: reading the form. Does not own the session, CSRF, role and audit checks
(``fleet_server.console.web``) nor the assignment (``FleetService.operator_assign``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, Final
from urllib.parse import quote, urlencode

from starlette.concurrency import run_in_threadpool

from fleet_server.console.web import PREFIX, Ctx, WriteResult
from fleet_server.errors import AdminInputError
from fleet_server.service import FleetService

__all__ = ["Assignments", "assign_body"]

_TARGETS: Final = ("device", "group")
_MAX_VERSION: Final = 2**53 - 1


def _text(form: Mapping[str, str], name: str, limit: int) -> str:
    value = form.get(name, "").strip()
    if len(value) > limit:
        raise AdminInputError(f"{name} is longer than {limit} characters")
    return value


def assign_body(form: Mapping[str, str]) -> dict[str, Any]:
    """The ``POST /v1/assign`` body of the assignment form.

    Raises:
        AdminInputError: a missing or malformed field.
    """
    kind = form.get("kind", "device")
    if kind not in _TARGETS:
        raise AdminInputError("assign to a device or a group")
    target, model = _text(form, "target", 128), _text(form, "model", 128)
    version = _text(form, "version", 19)
    if not target or not model:
        raise AdminInputError("give a model and a device or group")
    if not version.isdigit() or not 1 <= int(version) <= _MAX_VERSION:
        raise AdminInputError("the version is a whole number from 1")
    body: dict[str, Any] = {
        "target": target,
        "group": kind == "group",
        "model": model,
        "version": int(version),
    }
    for name in ("override_quarantine", "override_aborted"):
        reason = _text(form, name, 512)
        if reason:
            body[name] = reason
    return body


class Assignments:
    """The assignment write."""

    def __init__(self, service: FleetService) -> None:
        """Assign through ``service`` (the admin API's)."""
        self.service = service

    async def assign(self, ctx: Ctx) -> WriteResult:
        """Assign a version (``POST /v1/assign``); the browser goes to the device, or to the
        group's device list.

        Raises:
            AdminInputError: a malformed form.
            QuarantinedVersionError, AbortedVersionError: not overridden.
            ModelNotPublishedError, UnknownGroupError, UnknownDeviceError, DeviceRevokedError:
                as ``FleetService.operator_assign``.
        """
        body = assign_body(ctx.form)
        results = await run_in_threadpool(
            lambda: self.service.operator_assign(
                body["target"],
                body["model"],
                body["version"],
                group=body["group"],
                override_quarantine=body.get("override_quarantine", ""),
                override_aborted=body.get("override_aborted", ""),
            )
        )
        if body["group"]:
            where = f"{PREFIX}/devices?{urlencode({'group': body['target']})}"
        else:
            where = f"{PREFIX}/devices/{quote(body['target'], safe='')}"
        return WriteResult({"results": [asdict(r) for r in results]}, redirect=where)
