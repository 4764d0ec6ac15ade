"""Token buckets: the one rate-limiting implementation every role uses.

Owns ``TokenBucket`` (one bucket: ``burst`` tokens, refilled at ``rate`` per second; taking
tokens either succeeds or says how long until they are due) and ``RateLimiter`` (a bucket per
client, with a bounded LRU of clients). At most ``max_clients`` buckets are tracked; the least
recently seen is evicted first, so memory stays bounded whatever the number of peers (an evicted
client simply starts again with a full bucket). The clock is passed in; nothing here reads the
time, sleeps, or touches a socket or the environment.

Users: the device API (``RateLimiter``; the client is the peer IP for TCP and one shared ``"uds"``
client for the Unix socket, see ``edge_agent.api.app.limiter_from_config``), the fleet gateway
(``RateLimiter`` per device id), the block server's publish pacer
(``fleet_server.delivery.block_server.Pacer``, which sleeps) and the drift sketching budget of
``edge_agent.serving.pipeline`` (``TokenBucket``). Does not own who a client is or what waiting
means (refuse, sleep, drop): the callers decide.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from edge_agent.errors import ConfigError, RateLimitedError

__all__ = ["DEFAULT_MAX_CLIENTS", "Clock", "RateLimiter", "TokenBucket"]

Clock = Callable[[], float]
DEFAULT_MAX_CLIENTS = 1024


class TokenBucket:
    """One token bucket. Not thread-safe: callers that share one hold their own lock.

    Attributes:
        rate: tokens added per second.
        burst: capacity (the allowance after a quiet period); the bucket starts full.
        tokens: tokens in the bucket as of ``stamp``.
        stamp: the clock reading of the last refill.
    """

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        """A full bucket at time ``now`` (no validation: ``RateLimiter`` checks its settings)."""
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = self.burst
        self.stamp = now

    def take(self, now: float, n: float = 1.0, *, tolerance: float = 0.0) -> float:
        """Refill up to ``now``, then take ``n`` tokens if there are (``n - tolerance``).

        A clock that steps back neither refills nor drains the bucket. ``tolerance`` admits a
        bucket a rounding error short of ``n`` (it is then left empty, never negative).

        Returns:
            ``0.0`` when the tokens were taken, otherwise the seconds until they are due
            (nothing is taken then).
        """
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now
        if self.tokens >= n - tolerance:
            self.tokens = max(0.0, self.tokens - n)
            return 0.0
        return (n - self.tokens) / self.rate


class RateLimiter:
    """A ``TokenBucket`` per client, with a bounded LRU of clients. Thread-safe."""

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
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
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
                bucket = self._buckets[client] = TokenBucket(self.rate, self.burst, now)
                if len(self._buckets) > self.max_clients:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(client)
            return bucket.take(now)

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
