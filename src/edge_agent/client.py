"""A minimal Open Inference Protocol (v2) client over TCP or the agent's Unix socket.

Standard library only (``http.client``), so the device CLI needs nothing extra. Used by
``edge-agent status`` and ``edge-agent infer``; any other v2 client works against the agent too.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

import numpy as np

from edge_agent.config import ApiConfig
from edge_agent.contract.datatypes import PROTOCOL_DATATYPES
from edge_agent.errors import EdgefleetError, InputValidationError


class AgentUnreachableError(EdgefleetError):
    """The daemon's local API did not answer."""

    code = "agent_unreachable"


class AgentRequestError(EdgefleetError):
    """The daemon answered with an error (``status`` and the protocol's error message)."""

    code = "agent_error"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class AgentClient:
    """Talks to the local agent: Unix socket when configured, else TCP."""

    def __init__(self, api: ApiConfig, timeout: float = 10.0) -> None:
        self.api = api
        self.timeout = timeout

    def _conn(self) -> http.client.HTTPConnection:
        if self.api.unix_socket:
            return _UnixConnection(self.api.unix_socket, self.timeout)
        host = "127.0.0.1" if self.api.host in ("0.0.0.0", "") else self.api.host  # noqa: S104
        return http.client.HTTPConnection(host, self.api.port, timeout=self.timeout)

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Send one request; returns (status, decoded JSON or None).

        Raises:
            AgentUnreachableError: nothing listens.
        """
        conn = self._conn()
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except OSError as exc:
            raise AgentUnreachableError(f"agent API not reachable: {exc}") from exc
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw) if raw else None
        except (ValueError, RecursionError):  # not JSON (or not JSON we can hold): say what came
            return resp.status, raw[:2000].decode(errors="replace")

    def ready(self) -> bool:
        return self.request("GET", "/v2/health/ready")[0] == 200

    def infer(
        self, model: str, inputs: dict[str, np.ndarray], parameters: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """v2 JSON inference.

        Raises:
            AgentRequestError: the agent refused the request.
            AgentUnreachableError: nothing listens.
        """
        body: dict[str, Any] = {
            "inputs": [
                {
                    "name": k,
                    "shape": list(v.shape),
                    "datatype": _datatype(v.dtype),
                    "data": v.reshape(-1).tolist(),
                }
                for k, v in inputs.items()
            ]
        }
        if parameters:
            body["parameters"] = parameters
        status, out = self.request("POST", f"/v2/models/{model}/infer", body)
        if status != 200:
            msg = out.get("error", out) if isinstance(out, dict) else out
            raise AgentRequestError(status, str(msg))
        return out if isinstance(out, dict) else {}

    def feedback(
        self,
        model: str,
        request_id: str,
        labels: list[int | str | None],
        *,
        version: str | None = None,
        per_row: bool = False,
    ) -> dict[str, Any]:
        """Tell the agent the true answer of an earlier request (``POST .../feedback``).

        ``labels``: one class index or name for a one-row request (``per_row`` False), else
        one per request row (None: unknown). Returns what the agent counted.

        Raises:
            AgentRequestError: the agent refused it (404: the request's answer is not
                remembered, or no such model; 400: a malformed id or label).
            AgentUnreachableError: nothing listens.
        """
        body: dict[str, Any] = {"id": request_id}
        if per_row or len(labels) != 1:
            body["labels"] = labels
        else:
            body["label"] = labels[0]
        route = f"/v2/models/{model}" + ("" if version is None else f"/versions/{version}")
        status, out = self.request("POST", route + "/feedback", body)
        if status != 200:
            msg = out.get("error", out) if isinstance(out, dict) else out
            raise AgentRequestError(status, str(msg))
        return out if isinstance(out, dict) else {}


def conform_inputs(inputs: dict[str, np.ndarray], metadata: Any) -> dict[str, np.ndarray]:
    """Convert arrays to the element type the model declares, where no value changes kind.

    The protocol refuses a tensor of another datatype than its input's (an FP64 tensor sent to
    an FP32 input is an error, not a silent rounding). Files saved by numpy are FP64 or INT64
    by default, so a convenience client converts float to float and integer to integer, as a
    user of a standard client does by hand; anything else is sent as it is, for the agent to
    refuse with the protocol's error.
    """
    declared = {}
    for t in metadata.get("inputs", []) if isinstance(metadata, dict) else []:
        numpy_name = _NUMPY_OF.get(str(t.get("datatype")))
        if numpy_name is not None:
            declared[str(t.get("name"))] = np.dtype(numpy_name)
    out = {}
    for name, value in inputs.items():
        want = declared.get(name)
        same_kind = want is not None and value.dtype.kind == want.kind and want.kind in "fiu"
        out[name] = value.astype(want) if same_kind else value
    return out


def _datatype(dtype: np.dtype[Any]) -> str:
    """The protocol's name of an array's element type.

    Raises:
        InputValidationError: a type the protocol cannot carry (e.g. complex).
    """
    name = PROTOCOL_DATATYPES.get(np.dtype(dtype).name)
    if name is None:
        raise InputValidationError(
            f"arrays of {np.dtype(dtype).name} cannot be sent over the protocol", reason="dtype"
        )
    return name


# The numpy type of each numeric protocol datatype (BYTES has none to convert to).
_NUMPY_OF = {proto: numpy for numpy, proto in PROTOCOL_DATATYPES.items() if proto != "BYTES"}
