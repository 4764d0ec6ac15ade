"""Per-client token buckets: the one rate limiter every role uses.

Owns: admitting or refusing one request of one client, and how long that client should wait.
Each client has a bucket of ``burst`` tokens refilled at ``rate`` per second; a request takes one.
At most ``max_clients`` buckets are tracked; the least recently seen is evicted first, so memory
stays bounded whatever the number of peers (an evicted client simply starts again with a full
bucket). The clock is injected; nothing here reads the time, a socket or the environment.

Who a client is, is the caller's choice: the device API uses the peer IP for TCP and one shared
``"uds"`` client for the Unix socket (see ``edge_agent.api.app.limiter_from_config``); the fleet
gateway uses the device id.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from edge_agent.errors import ConfigError, RateLimitedError

Clock = Callable[[], float]
DEFAULT_MAX_CLIENTS = 1024


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class RateLimiter:
    """Token bucket per client, with a bounded LRU of clients. Thread-safe."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Clock = time.monotonic,
        max_clients: int = DEFAULT_MAX_CLIENTS,
    ) -> None:
        """Create a limiter.

        Args:
            rate: tokens added per second, per client.
            burst: bucket size (a client's allowance after a quiet period).
            clock: seconds from a monotonic clock.
            max_clients: buckets kept; the least recently seen client is evicted beyond this.

        Raises:
            ConfigError: a non-positive rate, burst or client limit.
        """
        if not rate > 0 or burst < 1 or max_clients < 1:
            raise ConfigError(
                f"rate limit needs rate > 0, burst >= 1, max_clients >= 1 (got {rate}, {burst},"
                f" {max_clients})"
            )
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def acquire(self, client: str) -> float:
        """Take one token for ``client``.

        Returns:
            ``0.0`` when the request is admitted, otherwise the seconds until a token is due
            (nothing is taken then).
        """
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(client)
            if bucket is None:
                bucket = self._buckets[client] = _Bucket(self.burst, now)
                if len(self._buckets) > self.max_clients:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(client)
                elapsed = now - bucket.stamp
                if elapsed > 0:  # a clock that steps back never refills, nor drains
                    bucket.tokens = min(self.burst, bucket.tokens + elapsed * self.rate)
                    bucket.stamp = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate

    def check(self, client: str) -> None:
        """Take one token for ``client`` or refuse.

        Raises:
            RateLimitedError: the client has no token left; the message says when to retry.
        """
        wait = self.acquire(client)
        if wait > 0:
            raise RateLimitedError(f"client {client!r} is rate limited; retry in {wait:.3f}s")

    def __len__(self) -> int:
        """Number of clients currently tracked."""
        return len(self._buckets)
