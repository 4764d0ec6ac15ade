"""Console actions on one device besides revoking it: its operator labels (set one, remove
one) and remote diagnostics (ping, fetch logs, support bundle), with what the device page
shows of them (the labels by source, the recent commands with their answers, a download link
for an uploaded support bundle).

Labels are written with ``fleet_server.registry.labels.set_labels`` as
``POST /v1/devices/{device_id}/labels`` writes them; commands are issued with
``Diagnostics.issue`` (the command's default arguments, the default time to live) as
``POST /v1/devices/{device_id}/commands`` issues them; a support bundle downloads from
``GET /v1/devices/{device_id}/support-bundles/{command_id}`` (the session cookie
authenticates a GET there). A device's labels and its command answers are device-supplied:
shown escaped and clipped.

Owns: reading the forms and the page's view of labels and commands. Does not own the
session, CSRF, role and audit checks (``fleet_server.console.web``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from edge_agent.errors import IdentityError
from edge_agent.ids import validate_device_id
from fleet_server.console.shaping import clip
from fleet_server.console.web import PREFIX, Ctx, WriteResult
from fleet_server.diagnostics.book import CommandRecord
from fleet_server.diagnostics.service import Diagnostics
from fleet_server.errors import AdminInputError
from fleet_server.registry import labels as label_store
from fleet_server.registry.store import Registry

__all__ = ["CONSOLE_COMMANDS", "DeviceOps", "command_body", "command_view", "labels_body"]

#: The remote commands the device page offers (the fixed list's read-only diagnostics).
CONSOLE_COMMANDS: Final = ("ping", "logs", "support-bundle")
_COMMANDS_SHOWN: Final = 10
_ANSWER_CHARS: Final = 4000
_LABEL_CHARS: Final = 256


def _device(request: Request) -> str:
    raw = str(request.path_params.get("device_id", ""))
    try:
        return validate_device_id(raw)
    except IdentityError as exc:
        raise AdminInputError(f"invalid device id {raw[:64]!r}") from exc


def labels_body(form: Mapping[str, str]) -> dict[str, Any]:
    """The ``POST /v1/devices/{device_id}/labels`` body of the label form: ``key`` and
    ``value`` set one label; ``remove`` (a key) removes one.

    Raises:
        AdminInputError: neither or both, or a field over its length.
    """
    key, value, remove = (form.get(n, "").strip() for n in ("key", "value", "remove"))
    if any(len(v) > _LABEL_CHARS for v in (key, value, remove)):
        raise AdminInputError(f"a label key or value has at most {_LABEL_CHARS} characters")
    if bool(key) == bool(remove):
        raise AdminInputError("give a label key (and value) to set, or a key to remove")
    return {"set": {key: value}} if key else {"remove": [remove]}


def command_body(form: Mapping[str, str]) -> dict[str, Any]:
    """The ``POST /v1/devices/{device_id}/commands`` body of a diagnostics button.

    Raises:
        AdminInputError: not one of ``CONSOLE_COMMANDS``.
    """
    name = form.get("name", "")
    if name not in CONSOLE_COMMANDS:
        raise AdminInputError(f"the console sends {', '.join(CONSOLE_COMMANDS)}")
    return {"name": name}


def command_view(device_id: str, record: CommandRecord) -> dict[str, Any]:
    """A command as the device page shows it: the device's answer as clipped JSON text and,
    for an uploaded support bundle, its download link."""
    answer = record.answer
    text = "" if answer is None else json.dumps(answer, indent=1, sort_keys=True, default=str)
    download = None
    if record.name == "support-bundle" and record.state == "uploaded":
        download = f"/v1/devices/{quote(device_id, safe='')}/support-bundles/{record.id}"
    return {
        "id": record.id,
        "name": record.name,
        "state": record.state,
        "issued": record.issued,
        "answered_at": record.answered_at,
        "answer": clip(text, _ANSWER_CHARS),
        "download": download,
    }


class DeviceOps:
    """Labels and diagnostics of one device: the page's view and the writes."""

    def __init__(self, registry: Registry, diagnostics: Diagnostics | None) -> None:
        """Labels in ``registry``; commands through ``diagnostics`` (``None``: the server
        runs no diagnostics, the page offers none)."""
        self.registry = registry
        self.diagnostics = diagnostics

    async def view(self, device_id: str) -> dict[str, Any]:
        """What the device page shows: ``labels`` (operator, device, effective, refused as
        clipped text), ``commands`` (newest first) and ``diagnostics`` (offered or not).

        Raises:
            UnknownDeviceError: no such device.
            DiagnosticsError: the command book failed.
        """
        found = await run_in_threadpool(label_store.device_labels, self.registry, device_id)

        def shown(labels: Mapping[str, str]) -> list[tuple[str, str]]:
            return [(clip(k, 128), clip(v, _LABEL_CHARS)) for k, v in sorted(labels.items())]

        commands: list[dict[str, Any]] = []
        if self.diagnostics is not None:
            records = await run_in_threadpool(
                self.diagnostics.of_device, device_id, _COMMANDS_SHOWN
            )
            commands = [command_view(device_id, r) for r in records]
        return {
            "labels": {
                "operator": shown(found.operator),
                "device": shown(found.device),
                "effective": shown(found.effective),
                "refused": found.refused,
            },
            "commands": commands,
            "diagnostics": self.diagnostics is not None,
            "console_commands": CONSOLE_COMMANDS,
        }

    async def set_labels(self, ctx: Ctx) -> WriteResult:
        """Set or remove one operator label (``POST /v1/devices/{device_id}/labels``).

        Raises:
            AdminInputError: a malformed form.
            LabelError: a bad key or value, or too many labels.
            UnknownDeviceError: no such device.
        """
        device_id = _device(ctx.request)
        body = labels_body(ctx.form)
        found = await run_in_threadpool(
            lambda: label_store.set_labels(
                self.registry, device_id, body.get("set", {}), body.get("remove", [])
            )
        )
        return WriteResult(
            found.to_dict(), redirect=f"{PREFIX}/devices/{quote(device_id, safe='')}#labels"
        )

    async def command(self, ctx: Ctx) -> WriteResult:
        """Send a diagnostics command (``POST /v1/devices/{device_id}/commands``).

        Raises:
            AdminInputError: not a console command, or the server runs no diagnostics.
            UnknownDeviceError: the device is not enrolled or is revoked.
            CommandQueueFullError: too many pending commands for the device.
        """
        device_id = _device(ctx.request)
        body = command_body(ctx.form)
        if self.diagnostics is None:
            raise AdminInputError("this server runs no remote diagnostics")
        diagnostics = self.diagnostics
        result = await run_in_threadpool(
            lambda: diagnostics.issue(body["name"], {}, device_id=device_id)
        )
        return WriteResult(
            {"commands": [c.to_dict() for c in result.commands], "errors": result.errors},
            redirect=f"{PREFIX}/devices/{quote(device_id, safe='')}#diagnostics",
            status=202,
        )
