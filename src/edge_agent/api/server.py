"""The local API's front ends as listeners: HTTP on TCP and a Unix socket; drained together.

Owns: the ``Listener`` interface every front end implements (start, begin the drain, wait for
it, describe), ``HttpListener`` (binding the HTTP sockets and running one uvicorn server over
both on a thread of its own, the graceful drain, removing the socket file), ``Listeners`` (a
group started in order and drained together), ``stop_on_signals`` (SIGTERM/SIGINT set a stop
event; whoever owns the process installs it) and ``serve``, which runs the HTTP API and other
listeners in the foreground until a signal (for embedding and tests; the daemon composes the
same pieces itself and owns the signals: ``edge_agent.daemon.run``). It does not build the app
(``create_app``) nor decide what a request means.

Unix socket: created mode 0660 and never more open than that, even for an instant (on Linux the
socket's mode is set before ``bind``, then the umask's cut is restored with ``chmod``). A socket
file left by a crash is replaced; one another live server answers on is refused, as is any path
that is not a socket. The file is removed at shutdown if it is still the one this server bound.

Drain: ``begin_drain`` (from any thread) makes every listener stop accepting at the same moment
and close idle keep-alive connections; in-flight requests get ``grace`` seconds (the daemon passes
``api.drain_seconds``), then what is left is cancelled. A model call still running in a worker
thread when the drain times out is abandoned, not killed. No listener touches signal handlers:
``stop_on_signals`` turns SIGTERM/SIGINT into a stop event, never re-raised, so the process
returns normally and can stop its other parts; a second SIGINT cuts the HTTP drain short.

uvicorn is configured for a daemon: no logging configuration of its own (the daemon's applies), no
access log (metrics count requests), no ``Server`` header, and proxy headers off so no local
client can pick its rate-limit identity with ``X-Forwarded-For``.
"""

from __future__ import annotations

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
from typing import Protocol, runtime_checkable

import uvicorn
from starlette.types import ASGIApp

from edge_agent.config import ApiConfig
from edge_agent.errors import ConfigError

logger = logging.getLogger(__name__)

SOCKET_MODE = 0o660
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Listener(Protocol):
    """A front end (HTTP, gRPC, ...) that the daemon starts and drains with the others.

    ``start`` binds and accepts (it raises ``ConfigError`` when it cannot); ``begin_drain``
    stops accepting and gives in-flight calls ``grace`` seconds, returning at once (only its
    first call counts); ``wait_drained`` blocks until they ended or the grace ran out (a no-op
    when it never started; it may raise what made the listener fail while serving).
    """

    def start(self) -> None: ...

    def begin_drain(self, grace: float) -> None: ...

    def wait_drained(self) -> None: ...

    def describe(self) -> str:
        """Where it listens, for logs (e.g. ``gRPC on 127.0.0.1:8081``)."""
        ...


@runtime_checkable
class Abortable(Protocol):
    """A listener whose drain can be cut short (``HttpListener``; gRPC keeps its grace)."""

    def abort(self) -> None: ...


class _Server(uvicorn.Server):
    """uvicorn that reports its start and never touches signal handlers."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.on_started()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # signals belong to the process owner (``stop_on_signals``), not to uvicorn


class HttpListener:
    """The v2 HTTP API on ``config.host:config.port`` and ``config.unix_socket``; a ``Listener``.

    ``on_exit`` (e.g. a stop event's ``set``) is called when the server thread ends, for
    whatever reason, so a server that stops by itself stops its owner too.
    """

    def __init__(
        self, app: ASGIApp, config: ApiConfig, *, on_exit: Callable[[], None] | None = None
    ) -> None:
        """Bind nothing yet.

        Raises:
            ConfigError: invalid ``config``.
        """
        config.validate()
        self._app, self._config, self._on_exit = app, config, on_exit
        self._sockets: list[socket.socket] = []
        self._identity: tuple[int, int] | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._draining = False
        self.tcp_address: tuple[str, int] = (config.host, config.port)

    @property
    def unix_socket(self) -> str | None:
        return self._config.unix_socket

    @property
    def url(self) -> str:
        """``http://host:port`` of the TCP listener (the bound port after ``start``)."""
        host, port = self.tcp_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def describe(self) -> str:
        """Where it listens, for logs."""
        unix = f" and unix:{self.unix_socket}" if self.unix_socket else ""
        return f"HTTP on {self.url}{unix}"

    def start(self) -> None:
        """Bind both sockets and serve on a thread of its own; return once it accepts.

        Raises:
            ConfigError: an address cannot be bound, a socket path is in use or is not a
                socket, or the server did not start.
            BaseException: what the server raised while starting (e.g. the app's lifespan).
        """
        config = self._config
        try:
            tcp = _bind_tcp(config.host, config.port)
            self._sockets.append(tcp)
            self.tcp_address = tcp.getsockname()[:2]
            if config.unix_socket:
                unix, self._identity = _bind_unix(config.unix_socket)
                self._sockets.append(unix)
        except ConfigError:
            self._release()
            raise
        self._server = _Server(
            uvicorn.Config(
                self._app,
                log_config=None,
                access_log=False,
                proxy_headers=False,
                server_header=False,
                # typed int, but uvicorn hands it to asyncio.wait_for, which takes seconds as float
                timeout_graceful_shutdown=config.drain_seconds,  # type: ignore[arg-type]
                lifespan="auto",
            ),
            self._started.set,
        )
        self._thread = threading.Thread(target=self._run, name="http-api", daemon=True)
        self._thread.start()
        self._started.wait()  # set once serving, or when the thread ended without starting
        if not self._server.started:
            self._thread.join()
            self._release()
            error, self._error = self._error, None
            if error is not None:
                raise error
            raise ConfigError(f"the HTTP API did not start on {self.url}")
        logger.info("inference API listening: %s", self.describe())

    def _run(self) -> None:
        assert self._server is not None
        try:
            self._server.run(sockets=self._sockets)
        except BaseException as exc:  # handed to start() or wait_drained() in the owner's thread
            self._error = exc
        finally:
            self._started.set()
            if self._on_exit is not None:
                self._on_exit()

    def begin_drain(self, grace: float) -> None:
        """Stop accepting; requests in flight get ``grace`` seconds (only the first call counts)."""
        server = self._server
        if server is None or self._draining:
            return
        self._draining = True
        server.config.timeout_graceful_shutdown = grace  # type: ignore[assignment]
        server.should_exit = True

    def abort(self) -> None:
        """Cut a drain short: cancel what is still running (a second Ctrl-C)."""
        if self._server is not None and self._draining:
            self._server.force_exit = True

    def wait_drained(self) -> None:
        """Block until the drain has finished; close the sockets and remove the socket file.

        Raises:
            BaseException: what the server thread died with, if it did.
        """
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            logger.info("inference API stopped")
        self._release()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _release(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        if self._config.unix_socket and self._identity is not None:
            remove_socket(self._config.unix_socket, self._identity)
            self._identity = None


class Listeners:
    """Front ends started in order and drained together."""

    def __init__(self, listeners: Sequence[Listener]) -> None:
        self._listeners = tuple(listeners)
        self.started: list[Listener] = []

    def start(self) -> None:
        """Start each listener in order; if one cannot start, stop those already started.

        Raises:
            ConfigError: a listener cannot start (see ``Listener.start``).
        """
        for listener in self._listeners:
            try:
                listener.start()
            except BaseException:
                self.drain(0.0)
                raise
            self.started.append(listener)

    def drain(self, grace: float) -> None:
        """Every started listener stops accepting at the same moment; wait for all of them.

        Raises:
            BaseException: the first error a listener failed with (after all have drained).
        """
        for listener in self.started:
            listener.begin_drain(grace)
        first: BaseException | None = None
        for listener in self.started:
            try:
                listener.wait_drained()
            except BaseException as exc:  # the others still drain; the first error is raised
                first = first or exc
        self.started = []
        if first is not None:
            raise first

    def abort(self) -> None:
        """Cut the drain short where a listener can (a second Ctrl-C); safe in a signal handler."""
        for listener in self.started:
            if isinstance(listener, Abortable):
                listener.abort()

    def describe(self) -> str:
        """Where they all listen, for logs."""
        return "; ".join(listener.describe() for listener in self._listeners)


@contextlib.contextmanager
def stop_on_signals(
    stop: threading.Event, *, again: Callable[[], None] | None = None
) -> Generator[None, None, None]:
    """While inside, SIGTERM and SIGINT set ``stop`` (main thread only; elsewhere a no-op).

    A SIGINT after ``stop`` is set calls ``again`` (cut the drain short). The previous handlers
    are restored on exit; a signal is never re-raised.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(sig: int, _frame: FrameType | None) -> None:
        if stop.is_set() and sig == signal.SIGINT and again is not None:
            again()
        # Event.set takes a lock the interrupted main thread may hold: set it from a thread.
        threading.Thread(target=stop.set, name="stop", daemon=True).start()

    previous = {sig: signal.signal(sig, on_signal) for sig in _SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class ServerHandle:
    """Where a running ``serve`` listens, and a thread-safe way to stop it."""

    def __init__(
        self, http: HttpListener, stop: threading.Event, listeners: Sequence[Listener] = ()
    ) -> None:
        self._stop = stop
        self.tcp_address = http.tcp_address
        self.unix_socket = http.unix_socket
        self.url = http.url
        self.listeners = tuple(listeners)

    def shutdown(self) -> None:
        """Start the graceful drain, as SIGTERM would. Safe from any thread; returns at once."""
        self._stop.set()


def serve(
    app: ASGIApp,
    config: ApiConfig,
    *,
    ready_callback: Callable[[ServerHandle], None] | None = None,
    listeners: Sequence[Listener] = (),
) -> None:
    """Serve ``app`` on ``config.host:config.port`` and ``config.unix_socket``; block until drained.

    ``listeners`` (other front ends, e.g. gRPC) start before the HTTP API and drain with it:
    SIGTERM/SIGINT (in the main thread) or ``ServerHandle.shutdown`` stop every one accepting at
    once, and ``serve`` returns normally when all have drained.

    Args:
        app: the ASGI app, normally ``create_app(...)``.
        config: where to listen (port 0 picks a free port) and ``drain_seconds``.
        ready_callback: called once every listener accepts connections, with their addresses and
            a handle to stop the server (e.g. to notify systemd); an exception from it aborts
            ``serve`` (after the drain).

    Raises:
        ConfigError: invalid ``config``, an address that cannot be bound, or a socket path that
            is in use or is not a socket.
    """
    config.validate()
    stop = threading.Event()
    http = HttpListener(app, config, on_exit=stop.set)
    front = Listeners([*listeners, http])
    with stop_on_signals(stop, again=http.abort):
        front.start()
        try:
            if ready_callback is not None:
                ready_callback(ServerHandle(http, stop, front.started[:-1]))
            stop.wait()
        finally:
            front.drain(config.drain_seconds)


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
