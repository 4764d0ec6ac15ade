"""A small client of the admin HTTP API (what the ``fleet-server`` operator commands use).

Every method returns the decoded JSON body or raises one of our errors, never an httpx one:
``AdminUnreachableError`` (connection refused, timeout, TLS), ``AdminAuthError`` (401) or
``AdminRequestError`` (any other error status, carrying the server's ``code`` and message).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import httpx

from fleet_server.errors import AdminAuthError, AdminRequestError, AdminUnreachableError

__all__ = ["DEFAULT_ADMIN_URL", "AdminClient"]

DEFAULT_ADMIN_URL = "http://127.0.0.1:8780"


class AdminClient:
    """Talks to one admin API with one bearer token."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """Prepare a client of ``url`` (e.g. ``http://127.0.0.1:8780``)."""
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        """Close pooled connections."""
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise AdminUnreachableError(
                f"admin API {self._http.base_url} unreachable: {exc}"
            ) from exc
        body = self._raise_for(response)
        if body is None:
            raise AdminRequestError(
                f"{response.status_code}: response is not JSON",
                status=response.status_code,
                server_code="bad_response",
            )
        return body

    @staticmethod
    def _raise_for(response: httpx.Response) -> Any:
        """The JSON body of ``response`` (None: not JSON), or its error raised.

        Raises:
            AdminAuthError: 401.
            AdminRequestError: any other error status.
        """
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code == 401:
            raise AdminAuthError("the admin API refused the token (check --token)")
        if response.status_code >= 400:
            message = body.get("error") if isinstance(body, dict) else None
            code = body.get("code") if isinstance(body, dict) else None
            raise AdminRequestError(
                f"{response.status_code}: {message or response.text[:200]}",
                status=response.status_code,
                server_code=str(code or "unknown"),
            )
        return body

    def status(self) -> dict[str, Any]:
        """``GET /v1/status``. Raises: AdminApiError."""
        return dict(self._call("GET", "/v1/status"))

    def devices(
        self,
        group: str | None = None,
        *,
        selector: str | None = None,
        label_group: str | None = None,
    ) -> list[dict[str, Any]]:
        """``GET /v1/devices`` (optionally by label selector or label group). Raises:
        AdminApiError."""
        given = {"group": group, "selector": selector, "label_group": label_group}
        params = {k: v for k, v in given.items() if v}
        return list(self._call("GET", "/v1/devices", params=params)["devices"])

    def labels(self, device_id: str) -> dict[str, Any]:
        """``GET /v1/devices/{id}/labels``. Raises: AdminApiError."""
        return dict(self._call("GET", f"/v1/devices/{quote(device_id, safe='')}/labels"))

    def set_labels(self, device_id: str, add: dict[str, str], remove: list[str]) -> dict[str, Any]:
        """``POST /v1/devices/{id}/labels``. Raises: AdminApiError."""
        path = f"/v1/devices/{quote(device_id, safe='')}/labels"
        return dict(self._call("POST", path, json={"set": add, "remove": remove}))

    def label_call(self, method: str, path: str, body: Any = None) -> Any:
        """A label group or window route (``/v1/label-groups...``, ``/v1/windows...``).

        Raises:
            AdminApiError: refused, unreachable, or the server's error.
        """
        if not path.startswith(("/v1/label-groups", "/v1/windows")):
            raise ValueError(f"not a label route: {path}")
        return self._call(method, path, **({} if body is None else {"json": body}))

    def device(self, device_id: str) -> dict[str, Any]:
        """``GET /v1/devices/{id}``. Raises: AdminApiError."""
        return dict(self._call("GET", f"/v1/devices/{device_id}"))

    def register(
        self,
        device_id: str,
        group: str,
        tags: dict[str, Any],
        cert_serial: str | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/devices``. Raises: AdminApiError."""
        body = {"id": device_id, "group": group, "tags": tags, "cert_serial": cert_serial}
        return dict(self._call("POST", "/v1/devices", json=body))

    def revoke(self, device_id: str) -> dict[str, Any]:
        """``POST /v1/devices/{id}/revoke``. Raises: AdminApiError."""
        return dict(self._call("POST", f"/v1/devices/{device_id}/revoke"))

    def misbehaviour(self, top: int = 20) -> list[dict[str, Any]]:
        """``GET /v1/misbehaviour``: refusals per device, worst first. Raises: AdminApiError."""
        return list(self._call("GET", "/v1/misbehaviour", params={"top": top})["devices"])

    def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``. Raises: AdminApiError."""
        return list(self._call("GET", "/v1/models")["models"])

    def model(self, name: str, version: int) -> dict[str, Any]:
        """``GET /v1/models/{name}/{version}``: the bundle, its history and rollouts.

        Raises:
            AdminApiError: as every call.
        """
        return dict(self._call("GET", f"/v1/models/{name}/{version}"))

    def publish(self, path: Path) -> dict[str, Any]:
        """``POST /v1/models`` with the bundle file as the body.

        Raises:
            AdminApiError: as every call.
            OSError: the file cannot be read.
        """
        return self._upload("/v1/models", path)

    def assign(
        self,
        target: str,
        model: str,
        version: int,
        *,
        group: bool,
        override_quarantine: str = "",
        override_aborted: str = "",
    ) -> list[Any]:
        """``POST /v1/assign``; one result per device. Raises: AdminApiError."""
        body: dict[str, Any] = {"target": target, "group": group, "model": model}
        body["version"] = version
        if override_quarantine:
            body["override_quarantine"] = override_quarantine
        if override_aborted:
            body["override_aborted"] = override_aborted
        return list(self._call("POST", "/v1/assign", json=body)["results"])

    def agent_releases(self) -> list[Any]:
        """``GET /v1/agent/releases``, newest first. Raises: AdminApiError."""
        return list(self._call("GET", "/v1/agent/releases")["releases"])

    def publish_agent(self, path: Path) -> dict[str, Any]:
        """``POST /v1/agent/releases`` with the agent package as the body.

        Raises:
            AdminApiError: as every call.
            OSError: the file cannot be read.
        """
        return self._upload("/v1/agent/releases", path)

    def assign_agent(self, target: str, release: int, *, group: bool) -> list[Any]:
        """``POST /v1/agent/assign``; one result per device. Raises: AdminApiError."""
        body = {"target": target, "group": group, "release": release}
        return list(self._call("POST", "/v1/agent/assign", json=body)["results"])

    def start_wave(self, sha256: str) -> dict[str, Any]:
        """``POST /v1/waves``. Raises: AdminApiError."""
        return dict(self._call("POST", "/v1/waves", json={"sha256": sha256}))

    def telemetry(
        self, *, after_id: int | None = None, device_id: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """``GET /v1/telemetry`` (no ``after_id``: the newest entries). Raises: AdminApiError."""
        params: dict[str, Any] = {"limit": limit}
        if after_id is not None:
            params["after_id"] = after_id
        if device_id:
            params["device_id"] = device_id
        return list(self._call("GET", "/v1/telemetry", params=params)["telemetry"])

    def drift(
        self,
        model: str,
        *,
        version: int | None = None,
        by: str | None = None,
        since: str | None = None,
        until: str | None = None,
        bucket: str | None = None,
        views: bool = False,
        devices: bool = True,
    ) -> dict[str, Any]:
        """``GET /v1/drift`` (fleet drift of one model). Raises: AdminApiError."""
        params: dict[str, Any] = {"model": model, "views": int(views), "devices": int(devices)}
        for key, value in (
            ("version", version),
            ("by", by),
            ("since", since),
            ("until", until),
            ("bucket", bucket),
        ):
            if value is not None:
                params[key] = value
        return dict(self._call("GET", "/v1/drift", params=params))

    def accuracy(self, model: str, *, hours: int = 24) -> dict[str, Any]:
        """``GET /v1/models/{model}/accuracy`` (labelled accuracy per version). Raises:
        AdminApiError."""
        path = f"/v1/models/{quote(model, safe='')}/accuracy"
        return dict(self._call("GET", path, params={"hours": hours}))

    # ----------------------------------------------------------------- rollouts
    def rollouts(self, *, active: bool = False) -> list[dict[str, Any]]:
        """``GET /v1/rollouts``. Raises: AdminApiError."""
        params = {"active": "1"} if active else {}
        return list(self._call("GET", "/v1/rollouts", params=params)["rollouts"])

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        """``GET /v1/rollouts/{id}`` (with devices, wave sizes, events). Raises: AdminApiError."""
        return dict(self._call("GET", f"/v1/rollouts/{rollout_id}"))

    def create_rollout(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/rollouts``. Raises: AdminApiError."""
        return dict(self._call("POST", "/v1/rollouts", json=body))

    def rollout_command(self, rollout_id: str, command: str) -> dict[str, Any]:
        """``POST /v1/rollouts/{id}/{approve|pause|resume|abort}``. Raises: AdminApiError."""
        return dict(self._call("POST", f"/v1/rollouts/{rollout_id}/{command}"))

    # ----------------------------------------------------------------- evaluation sets
    def evalsets(self, model: str | None = None) -> list[dict[str, Any]]:
        """``GET /v1/evalsets``. Raises: AdminApiError."""
        params = {"model": model} if model else {}
        return list(self._call("GET", "/v1/evalsets", params=params)["evalsets"])

    def evalset(self, sha256: str) -> dict[str, Any]:
        """``GET /v1/evalsets/{sha256}``. Raises: AdminApiError."""
        return dict(self._call("GET", f"/v1/evalsets/{sha256}"))

    def add_evalset(self, path: Path, model: str, source: str, note: str = "") -> dict[str, Any]:
        """``POST /v1/evalsets`` with the set file as the body.

        Raises:
            AdminApiError: as every call.
            OSError: the file cannot be read.
        """
        params = {"model": model, "source": source, **({"note": note} if note else {})}
        return self._upload("/v1/evalsets", path, params)

    def _upload(
        self, route: str, path: Path, params: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """``POST route`` with the file at ``path`` as an octet-stream body.

        Raises:
            AdminApiError: as every call.
            OSError: the file cannot be read.
        """
        with Path(path).open("rb") as fh:
            body = fh.read()
        headers = {"Content-Type": "application/octet-stream"}
        return dict(self._call("POST", route, params=params, content=body, headers=headers))

    def root(self) -> dict[str, Any]:
        """``GET /v1/root``: the fleet's current root. Raises: AdminApiError."""
        return dict(self._call("GET", "/v1/root"))

    def rotate_root(self, roots: list[Any]) -> dict[str, Any]:
        """``POST /v1/root`` with root metadata objects in version order. Raises: AdminApiError."""
        return dict(self._call("POST", "/v1/root", json={"roots": roots}))

    def whoami(self) -> dict[str, Any]:
        """``GET /v1/whoami``: the caller's account, role and permissions.

        Raises: AdminApiError."""
        return dict(self._call("GET", "/v1/whoami"))

    def accounts(self) -> list[dict[str, Any]]:
        """``GET /v1/accounts``. Raises: AdminApiError."""
        return list(self._call("GET", "/v1/accounts")["accounts"])

    def account(self, name: str) -> dict[str, Any]:
        """``GET /v1/accounts/{name}``. Raises: AdminApiError."""
        return dict(self._call("GET", f"/v1/accounts/{quote(name, safe='')}"))

    def create_account(self, name: str, role: str, password: str | None) -> dict[str, Any]:
        """``POST /v1/accounts`` (``password`` None: an account for API tokens only).

        Raises: AdminApiError."""
        body: dict[str, Any] = {"name": name, "role": role}
        if password is not None:
            body["password"] = password
        return dict(self._call("POST", "/v1/accounts", json=body))

    def account_command(
        self, name: str, command: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """``POST /v1/accounts/{name}/{command}`` (``disable``, ``enable``, ``role``,
        ``password``) with ``body``. Raises: AdminApiError."""
        path = f"/v1/accounts/{quote(name, safe='')}/{quote(command, safe='')}"
        return dict(self._call("POST", path, json=body or {}))

    def tokens(self, account: str | None = None) -> list[dict[str, Any]]:
        """``GET /v1/tokens`` (the caller's, or ``account``'s). Raises: AdminApiError."""
        params = {} if account is None else {"account": account}
        return list(self._call("GET", "/v1/tokens", params=params)["tokens"])

    def create_token(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/tokens``: the new token, its secret in ``token`` (shown once).

        Raises: AdminApiError."""
        return dict(self._call("POST", "/v1/tokens", json=body))

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        """``POST /v1/tokens/{id}/revoke``. Raises: AdminApiError."""
        return dict(self._call("POST", f"/v1/tokens/{quote(token_id, safe='')}/revoke"))

    def audit(self, **filters: str | int | None) -> list[dict[str, Any]]:
        """``GET /v1/audit`` with the given filters (``since``, ``until``, ``actor``, ``action``,
        ``object``, ``limit``, ``after_id``; None ones are left out). Raises: AdminApiError."""
        params = {k: str(v) for k, v in filters.items() if v is not None}
        return list(self._call("GET", "/v1/audit", params=params)["entries"])

    def audit_export(self, fmt: str, out: BinaryIO, **filters: str | None) -> int:
        """``GET /v1/audit/export?format=fmt``, streamed into ``out``; the bytes written.

        Raises:
            AdminApiError: as every call (a stream cut short raises ``AdminUnreachableError``).
            OSError: ``out`` cannot be written.
        """
        params = {"format": fmt, **{k: v for k, v in filters.items() if v is not None}}
        written = 0
        try:
            with self._http.stream("GET", "/v1/audit/export", params=params) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise_for(response)
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    written += len(chunk)
        except httpx.HTTPError as exc:
            raise AdminUnreachableError(
                f"admin API {self._http.base_url} unreachable: {exc}"
            ) from exc
        return written

    # ------------------------------------------------------------------ remote diagnostics
    def issue_command(
        self,
        name: str,
        args: dict[str, Any],
        *,
        device_id: str | None = None,
        group: str | None = None,
        ttl_seconds: int = 3600,
    ) -> dict[str, Any]:
        """``POST /v1/devices/{id}/commands`` (or ``/v1/groups/{group}/commands``): sign and
        send one command; ``{"commands": [...], "errors": {...}}``. Raises: AdminApiError."""
        path = f"/v1/devices/{device_id}/commands" if device_id else f"/v1/groups/{group}/commands"
        body = {"name": name, "args": args, "ttl_seconds": ttl_seconds}
        return dict(self._call("POST", path, json=body))

    def command(self, command_id: str) -> dict[str, Any]:
        """``GET /v1/commands/{id}``: one command's state and answer. Raises: AdminApiError."""
        return dict(self._call("GET", f"/v1/commands/{command_id}"))

    def device_commands(self, device_id: str, limit: int = 50) -> list[dict[str, Any]]:
        """``GET /v1/devices/{id}/commands``, newest first. Raises: AdminApiError."""
        body = self._call("GET", f"/v1/devices/{device_id}/commands", params={"limit": limit})
        return list(body["commands"])

    def support_bundle(self, device_id: str, command_id: str, out: BinaryIO) -> int:
        """``GET /v1/devices/{id}/support-bundles/{command id}``, streamed into ``out``; the
        bytes written.

        Raises:
            AdminApiError: as every call.
            OSError: ``out`` cannot be written.
        """
        written = 0
        path = f"/v1/devices/{device_id}/support-bundles/{command_id}"
        try:
            with self._http.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise_for(response)
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    written += len(chunk)
        except httpx.HTTPError as exc:
            raise AdminUnreachableError(
                f"admin API {self._http.base_url} unreachable: {exc}"
            ) from exc
        return written

    # ------------------------------------------------------------------ capture and datasets
    def capture_action(self, model: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/capture/{model}/{enable|disable|collect}``: ``{"policy", "commands",
        "errors"}``. Raises: AdminApiError."""
        return dict(self._call("POST", f"/v1/capture/{model}/{action}", json=body))

    def capture_status(self, model: str | None = None) -> dict[str, Any]:
        """``GET /v1/capture``: policies, device upload state, counters. Raises: AdminApiError."""
        params = {"model": model} if model else {}
        return dict(self._call("GET", "/v1/capture", params=params))

    def datasets(self, model: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """``GET /v1/datasets``, newest first. Raises: AdminApiError."""
        params: dict[str, Any] = {"limit": limit}
        if model:
            params["model"] = model
        return list(self._call("GET", "/v1/datasets", params=params)["datasets"])

    def dataset(self, sha256: str) -> dict[str, Any]:
        """``GET /v1/datasets/{sha256}``: one dataset with provenance. Raises: AdminApiError."""
        return dict(self._call("GET", f"/v1/datasets/{sha256}"))

    def dataset_export(self, sha256: str, out: BinaryIO, fmt: str = "npz") -> int:
        """``GET /v1/datasets/{sha256}/export`` into ``out``; the bytes written.

        Raises:
            AdminApiError: as every call.
            OSError: ``out`` cannot be written.
        """
        return self._download(f"/v1/datasets/{sha256}/export", {"format": fmt}, out)

    def capture_export(
        self,
        model: str,
        out: BinaryIO,
        fmt: str = "npz",
        since: str | None = None,
        until: str | None = None,
    ) -> int:
        """``GET /v1/capture/{model}/export`` (every captured row of ``model`` in a time range,
        over its datasets) into ``out``; the bytes written.

        Raises:
            AdminApiError: as every call.
            OSError: ``out`` cannot be written.
        """
        params = {"format": fmt}
        params.update({k: v for k, v in (("since", since), ("until", until)) if v is not None})
        return self._download(f"/v1/capture/{model}/export", params, out)

    def _download(self, path: str, params: dict[str, str], out: BinaryIO) -> int:
        try:
            response = self._http.get(path, params=params)
        except httpx.HTTPError as exc:
            raise AdminUnreachableError(
                f"admin API {self._http.base_url} unreachable: {exc}"
            ) from exc
        if response.status_code >= 400:
            self._raise_for(response)
        out.write(response.content)
        return len(response.content)

    def register_dataset_evalset(
        self, sha256: str, input_name: str | None = None, note: str = ""
    ) -> dict[str, Any]:
        """``POST /v1/datasets/{sha256}/evalset``: ``{"evalset": registration}``.
        Raises: AdminApiError."""
        body: dict[str, Any] = {"note": note}
        if input_name:
            body["input"] = input_name
        return dict(self._call("POST", f"/v1/datasets/{sha256}/evalset", json=body))
