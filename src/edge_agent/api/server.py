"""Run the v2 API with uvicorn on TCP and, optionally, on a Unix socket; drain on SIGTERM.

Owns: binding the listening sockets, running one uvicorn server over both, the graceful drain and
removing the socket file. It does not build the app (``create_app``) nor decide what a request
means.

Unix socket: created mode 0660 and never more open than that, even for an instant (on Linux the
socket's mode is set before ``bind``, then the umask's cut is restored with ``chmod``). A socket
file left by a crash is replaced; one another live server answers on is refused, as is any path
that is not a socket. The file is removed at shutdown if it is still the one this server bound.

Drain: SIGTERM or SIGINT (main thread only) or ``ServerHandle.shutdown()`` (any thread) stop
accepting connections, close idle keep-alive connections, let in-flight requests finish for up to
``drain_seconds``, then cancel what is left. Unlike uvicorn's own runner, the signal is not
re-raised afterwards: ``serve`` returns normally so the daemon can stop its other parts. A model
call still running in a worker thread when the drain times out is abandoned, not killed.
Other front ends (``Listener``, e.g. the gRPC service) start before uvicorn and drain with it:
they stop accepting when uvicorn does and get the same ``drain_seconds``.

uvicorn is configured for a daemon: no logging configuration of its own (the daemon's applies), no
access log (metrics count requests), no ``Server`` header, and proxy headers off so no local
client can pick its rate-limit identity with ``X-Forwarded-For``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import threading
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from types import FrameType
from typing import Protocol

import uvicorn
from starlette.types import ASGIApp

from edge_agent.config import ApiConfig
from edge_agent.errors import ConfigError

logger = logging.getLogger(__name__)

SOCKET_MODE = 0o660
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Listener(Protocol):
    """Another front end (e.g. gRPC) that ``serve`` starts and drains with the HTTP API.

    ``start`` binds and accepts (it raises ``ConfigError`` when it cannot); ``begin_drain``
    stops accepting and gives in-flight calls ``grace`` seconds, returning at once (only its
    first call counts); ``wait_drained`` blocks until they ended or the grace ran out.
    """

    def start(self) -> None: ...

    def begin_drain(self, grace: float) -> None: ...

    def wait_drained(self) -> None: ...

    def describe(self) -> str:
        """Where it listens, for logs (e.g. ``gRPC on 127.0.0.1:8081``)."""
        ...


class ServerHandle:
    """Where a running server listens, and a thread-safe way to stop it."""

    def __init__(
        self,
        server: uvicorn.Server,
        tcp_address: tuple[str, int],
        unix_socket: str | None,
        listeners: Sequence[Listener] = (),
    ) -> None:
        self._server = server
        self.tcp_address = tcp_address
        self.unix_socket = unix_socket
        self.listeners = tuple(listeners)

    @property
    def url(self) -> str:
        """``http://host:port`` of the TCP listener."""
        host, port = self.tcp_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def shutdown(self) -> None:
        """Start the graceful drain, as SIGTERM would. Safe from any thread; returns at once."""
        self._server.should_exit = True


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.on_started: Callable[[], None] | None = None
        self.others: Sequence[Listener] = ()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Every front end stops accepting at the same moment and drains in parallel.
        grace = float(self.config.timeout_graceful_shutdown or 0)
        for other in self.others:
            other.begin_drain(grace)
        try:
            await super().shutdown(sockets=sockets)
        finally:
            for other in self.others:
                await asyncio.to_thread(other.wait_drained)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn re-raises a captured SIGTERM after shutdown, which would kill a daemon before it
        # stops its other components (and before the socket file is removed): handle it here.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C skips the rest of the drain
        self.should_exit = True


def serve(
    app: ASGIApp,
    config: ApiConfig,
    *,
    ready_callback: Callable[[ServerHandle], None] | None = None,
    listeners: Sequence[Listener] = (),
) -> None:
    """Serve ``app`` on ``config.host:config.port`` and ``config.unix_socket``; block until drained.

    ``listeners`` (other front ends, e.g. gRPC) start before the HTTP API and drain with it:
    SIGTERM stops every one accepting at once, and ``serve`` returns when all have drained.

    Args:
        app: the ASGI app, normally ``create_app(...)``.
        config: where to listen (port 0 picks a free port) and ``drain_seconds``.
        ready_callback: called once every listener accepts connections, with their addresses and
            a handle to stop the server (e.g. to notify systemd). It runs on the event loop, so it
            must return quickly; an exception from it aborts ``serve``.

    Raises:
        ConfigError: invalid ``config``, an address that cannot be bound, or a socket path that
            is in use or is not a socket.
    """
    config.validate()
    sockets: list[socket.socket] = []
    identity: tuple[int, int] | None = None
    started: list[Listener] = []
    try:
        tcp = _bind_tcp(config.host, config.port)
        sockets.append(tcp)
        if config.unix_socket:
            unix, identity = _bind_unix(config.unix_socket)
            sockets.append(unix)
        server = _Server(
            uvicorn.Config(
                app,
                log_config=None,
                access_log=False,
                proxy_headers=False,
                server_header=False,
                # typed int, but uvicorn hands it to asyncio.wait_for, which takes seconds as float
                timeout_graceful_shutdown=config.drain_seconds,  # type: ignore[arg-type]
                lifespan="auto",
            )
        )
        for listener in listeners:
            listener.start()
            started.append(listener)
        server.others = started
        handle = ServerHandle(server, tcp.getsockname()[:2], config.unix_socket, started)
        if ready_callback is not None:
            server.on_started = lambda: ready_callback(handle)
        logger.info(
            "inference API listening on %s%s",
            handle.url,
            f" and unix:{config.unix_socket}" if config.unix_socket else "",
        )
        server.run(sockets=sockets)
        logger.info("inference API stopped")
    finally:
        for listener in started:  # a no-op after a drain; stops them if uvicorn never ran
            listener.begin_drain(0.0)
            listener.wait_drained()
        for sock in sockets:
            sock.close()
        if config.unix_socket and identity is not None:
            remove_socket(config.unix_socket, identity)


def _bind_tcp(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc
    return sock


def claim_unix_path(path: str, key: str = "api.unix_socket") -> None:
    """Make ``path`` free for a new Unix socket: remove a stale socket file, refuse anything else.

    Args:
        path: the socket file's path.
        key: the config key that named it, for the error message.

    Raises:
        ConfigError: ``path`` exists and is not a socket, or a live server answers on it.
    """
    file = Path(path)
    if os.path.lexists(path):
        if not stat.S_ISSOCK(file.lstat().st_mode):
            raise ConfigError(f"{key} {path} exists and is not a socket")
        if _answers(path):
            raise ConfigError(f"{key} {path} is in use by another server")
        file.unlink()  # left behind by a process that died


def _bind_unix(path: str) -> tuple[socket.socket, tuple[int, int]]:
    file = Path(path)
    claim_unix_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(OSError):  # Linux: the file takes this mode (minus the umask)
            os.fchmod(sock.fileno(), SOCKET_MODE)
        sock.bind(path)
        file.chmod(SOCKET_MODE)
        info = file.stat()
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on unix socket {path}: {exc}") from exc
    return sock, (info.st_dev, info.st_ino)


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # cannot tell (permissions, timeout): do not steal it
    finally:
        probe.close()
    return True


def remove_socket(path: str, identity: tuple[int, int]) -> None:
    """Remove the socket file at ``path`` if it is still the one with ``identity`` (dev, inode)."""
    try:
        info = Path(path).lstat()
        if (info.st_dev, info.st_ino) == identity:
            Path(path).unlink()
    except OSError as exc:
        if not isinstance(exc, FileNotFoundError):
            logger.warning("could not remove unix socket %s: %s", path, exc)
