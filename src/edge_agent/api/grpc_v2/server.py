"""The gRPC front end's listener: a grpc server on TCP and, optionally, a Unix socket.

Owns binding (``grpc.port``, ``grpc.unix_socket``), the message size limit, the worker threads,
the bound on calls admitted at once (``grpc.max_concurrent_rpcs``: grpc answers more with
RESOURCE_EXHAUSTED, so the memory queued messages hold stays bounded) and the drain. It
implements ``edge_agent.api.server.Listener``, so ``serve`` starts it before the HTTP API and
drains both together on SIGTERM: new calls are refused at once, calls in flight get
``api.drain_seconds`` to finish, then are cancelled.

Binding is exclusive: grpc's default ``SO_REUSEPORT`` is turned off, so a second daemon on the
same port fails at start (``ConfigError``) instead of silently sharing the port. The Unix socket
follows the HTTP API's rules (a stale socket file is replaced, a live one or a non-socket path is
refused, the file is removed at shutdown if it is still ours) except one: grpc creates the file
itself, so it has the umask's mode until the ``chmod`` to 0660 right after binding (put the socket
in a directory only the agent's group can enter).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from edge_agent.api.grpc_v2.service import GrpcInference
from edge_agent.api.server import SOCKET_MODE, claim_unix_path, remove_socket
from edge_agent.config import GrpcConfig
from edge_agent.errors import ConfigError

__all__ = ["GrpcListener"]

logger = logging.getLogger(__name__)


class GrpcListener:
    """``inference.GRPCInferenceService`` on ``config``'s addresses; see the module docstring."""

    def __init__(self, servicer: GrpcInference, config: GrpcConfig) -> None:
        config.validate()
        self._servicer = servicer
        self._config = config
        self._server: grpc.Server | None = None
        self._stopped: threading.Event | None = None
        self._identity: tuple[int, int] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.port: int | None = None

    @property
    def target(self) -> str:
        """``host:port`` of the TCP listener (after ``start``), as a grpc client dials it."""
        return f"{self._host()}:{self.port}"

    def _host(self) -> str:
        host = self._config.host
        return f"[{host}]" if ":" in host else host

    def describe(self) -> str:
        """Where it listens, for logs."""
        unix = f" and unix:{self._config.unix_socket}" if self._config.unix_socket else ""
        return f"gRPC on {self.target}{unix}"

    def start(self) -> None:
        """Bind and start serving.

        Raises:
            ConfigError: an address cannot be bound, or the socket path is in use or not a socket.
        """
        config = self._config
        limit = config.max_message_bytes
        self._pool = ThreadPoolExecutor(config.max_workers, thread_name_prefix="edgefleet-grpc")
        server = grpc.server(
            self._pool,
            handlers=[self._servicer.handler()],
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ],
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        try:
            self.port = self._bind(server, f"{self._host()}:{config.port}")
            if config.unix_socket:
                claim_unix_path(config.unix_socket, "grpc.unix_socket")
                self._bind(server, f"unix:{config.unix_socket}")
                path = Path(config.unix_socket)
                path.chmod(SOCKET_MODE)
                info = path.stat()
                self._identity = (info.st_dev, info.st_ino)
            server.start()
        except (ConfigError, OSError) as exc:
            server.stop(None)
            self._remove_socket()
            raise ConfigError(f"cannot start the gRPC API: {exc}") from exc
        self._server = server
        logger.info("inference API listening: %s", self.describe())

    @staticmethod
    def _bind(server: grpc.Server, address: str) -> int:
        try:
            port: int = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc >= 1.59 raises where older versions returned 0
            raise ConfigError(f"cannot listen on {address}: {exc}") from exc
        if port == 0:
            raise ConfigError(f"cannot listen on {address}")
        return port

    def begin_drain(self, grace: float) -> None:
        """Stop accepting; calls in flight get ``grace`` seconds (only the first call counts)."""
        if self._server is not None and self._stopped is None:
            self._stopped = self._server.stop(grace)

    def wait_drained(self) -> None:
        """Block until the drain has finished; then remove the socket file."""
        if self._stopped is not None:
            self._stopped.wait()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._remove_socket()

    def _remove_socket(self) -> None:
        if self._config.unix_socket and self._identity is not None:
            with contextlib.suppress(OSError):
                remove_socket(self._config.unix_socket, self._identity)
            self._identity = None
