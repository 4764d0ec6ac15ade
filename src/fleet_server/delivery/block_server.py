"""The gateway's bundle delivery: block request rounds, re-sends and broadcast waves.

Owns: ``Pacer`` (a token bucket plus a bound on unacknowledged publishes, so neither paho's
queue nor the broker is flooded) and ``BlockServer``, which collects requests for
``round_seconds``, maps transfer ids to published bundles (``<bundles_dir>/<sha256>.bundle``,
checked against the signed SHA-256 once when first opened), publishes the blocks wanted by
``broadcast_min_devices`` or more devices once on ``<prefix>/broadcast/<transfer_id>`` and the
rest on each device's ``blocks/resp``, and runs waves (every block once, in the background).
A block already broadcast in the last ``hold_seconds`` or still ahead of a running wave is not
broadcast again by a round (``fleet_server.delivery.blocks.RecentBroadcasts``): with a large fleet
one
re-broadcast costs one delivery per subscriber, and the requesters' copy is already in flight.

Serves a device only the bundles its latest signed desired state names (``entitled``): a
request for any other published bundle is refused and counted against the device, whether or
not a wave of it runs. Does not decide what a device should download (desired state does) or
parse telemetry. Publishes through ``edge_agent.common.transport.Transport`` (the paho adapter
in production, ``edge_agent.common.memory`` in unit tests); subscribes to nothing (the
gateway routes block requests here).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from edge_agent.common.ratelimit import TokenBucket
from edge_agent.common.transport import PublishHandle, Transport
from edge_agent.errors import EdgefleetError, NotConnectedError, TransportError
from edge_agent.wire.topics import Publication, Topics
from edge_agent.wire.transfer import BlockPlan, BlockRequest, transfer_id_for
from fleet_server.delivery.blocks import BlockSource, RecentBroadcasts, RoundPlan, plan_round
from fleet_server.errors import ModelNotPublishedError, RegistryError
from fleet_server.registry.ops.agent_releases import list_agent_releases
from fleet_server.registry.store import Registry

__all__ = ["BlockServer", "Pacer"]

log = logging.getLogger(__name__)

_MAX_INFLIGHT: Final = 64  # unacknowledged block publishes per publishing thread
_PUBACK_TIMEOUT: Final = 10.0
_REFRESH_EVERY: Final = 1.0  # seconds between bundle-list refreshes caused by unknown ids
_RECONNECT_WAIT: Final = 30.0  # a wave waits this long for the session to come back
DEFAULT_HOLD_SECONDS: Final = 4.0  # a broadcast block is not re-broadcast within this time


class Pacer:
    """At most ``rate`` publishes per second: a ``TokenBucket`` that waits instead of refusing.

    One instance is shared by every publishing thread (rate); each thread keeps its own window
    of unacknowledged handles (``_Window``).
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._bucket = TokenBucket(
            rate, burst if burst is not None else max(1.0, rate / 10.0), monotonic()
        )
        self._monotonic = monotonic
        self._sleep = sleep
        self._lock = threading.Lock()

    def acquire(self) -> None:
        """Wait until one publish is allowed."""
        while True:
            with self._lock:
                # The tolerance stops a livelock on rounding (0.999... tokens, tiny waits).
                wait = self._bucket.take(self._monotonic(), tolerance=1e-9)
            if wait <= 0:
                return
            self._sleep(wait)


class _Window:
    """Bounded window of unacknowledged publishes of one thread."""

    def __init__(self, client: Transport, size: int = _MAX_INFLIGHT) -> None:
        self._client = client
        self._size = size
        self._handles: collections.deque[PublishHandle] = collections.deque()

    def add(self, handle: PublishHandle) -> None:
        self._handles.append(handle)
        while len(self._handles) >= self._size:
            oldest = self._handles.popleft()
            if not oldest.is_published():
                try:
                    self._client.wait_published(oldest, _PUBACK_TIMEOUT)
                except TransportError:
                    return  # connection trouble: the next publish reports it


class BlockServer:
    """Serves bundle blocks over MQTT: request rounds and waves. Thread-safe.

    Args:
        registry: published bundles (``list_bundles``).
        client: the gateway's MQTT session (any ``Transport``).
        topics: the topic tree.
        bundles_dir: where ``<sha256>.bundle`` files live.
        block_size: block size of every transfer.
        broadcast_min_devices: see ``plan_resend``.
        round_seconds: how long requests are collected before a round is planned.
        pacer: rate limit shared by rounds and waves.
        count: ``count(name, n)`` increments a gateway counter.
        entitled: ``entitled(device_id, sha256)``: may this device fetch this bundle (its
            signed desired state names it)? A request for any other bundle is refused and
            counted (``foreign_bundle``). None serves every published bundle (tests only).
        refuse: ``refuse(device_id, reason)`` counts one refused request against its device.
        monotonic: clock for the bundle-list refresh rate limit and the broadcast memory.
        hold_seconds: a broadcast block is not re-broadcast by a round within this time.
    """

    def __init__(
        self,
        registry: Registry,
        client: Transport,
        topics: Topics,
        *,
        bundles_dir: Path,
        block_size: int,
        broadcast_min_devices: int,
        round_seconds: float,
        pacer: Pacer,
        count: Callable[[str, int], None],
        entitled: Callable[[str, str], bool] | None = None,
        refuse: Callable[[str, str], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        hold_seconds: float = DEFAULT_HOLD_SECONDS,
    ) -> None:
        self._registry = registry
        self._client = client
        self._topics = topics
        self._dir = Path(bundles_dir)
        self._block_size = block_size
        self._min_devices = broadcast_min_devices
        self._round = round_seconds
        self._pacer = pacer
        self._count = count
        self._entitled = entitled
        self._refuse = refuse
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._requests: list[tuple[str, BlockRequest]] = []
        self._recent = RecentBroadcasts(hold_seconds)  # guarded by _lock
        self._plans: dict[str, tuple[BlockPlan, str]] = {}  # transfer id -> (plan, sha256)
        self._sources: dict[str, BlockSource] = {}
        self._last_refresh = -1e9
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._waves: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the round thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fleet-blocks", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop rounds and waves, close the bundle files."""
        self._stop.set()
        for t in [self._thread, *self._waves]:
            if t is not None:
                t.join(timeout)
        self._thread = None
        with self._lock:
            for source in self._sources.values():
                source.close()
            self._sources.clear()

    # ------------------------------------------------------------------ requests
    def submit(self, device_id: str, request: BlockRequest) -> None:
        """Queue one device's request for the next round (called by the MQTT handler)."""
        with self._lock:
            self._requests.append((device_id, request))

    def _run(self) -> None:
        while not self._stop.wait(self._round):
            with self._lock:
                requests, self._requests = self._requests, []
            if requests:
                try:
                    self.serve_round(requests)
                except Exception:  # never let one bad round stop block serving
                    log.exception("block round failed")

    def serve_round(self, requests: Sequence[tuple[str, BlockRequest]]) -> RoundPlan:
        """Plan and publish one round of requests (round thread; public for tests).

        Returns:
            The plan that was executed.
        """
        for transfer_id in {r.transfer_id for _, r in requests}:
            self._resolve(transfer_id)
        requests = self._entitled_only(requests)
        now = self._monotonic()
        with self._lock:
            plans = {t: p for t, (p, _sha) in self._plans.items()}
            in_flight = {
                t: self._recent.in_flight(t, now) for t in {r.transfer_id for _, r in requests}
            }
        plan = plan_round(
            requests, plans, broadcast_min_devices=self._min_devices, in_flight=in_flight
        )
        if plan.unknown:
            self._count("unknown_transfer", plan.unknown)
        if plan.out_of_range:
            self._count("out_of_range", plan.out_of_range)
        if plan.suppressed:
            self._count("blocks_suppressed", plan.suppressed)
        window = _Window(self._client)
        for transfer_id, resend in plan.transfers.items():
            source = self._source(transfer_id)
            if source is None:
                continue
            try:
                for index in resend.broadcast:
                    wave = self._topics.publication("broadcast", arg=transfer_id)
                    self._send(window, source, index, wave)
                    self._sent(transfer_id, index)
                    self._count("blocks_broadcast", 1)
                for device_id, indices in resend.unicast.items():
                    unicast = self._topics.publication("blocks_resp", device_id)
                    for index in indices:
                        self._send(window, source, index, unicast)
                        self._count("blocks_unicast", 1)
            except TransportError as exc:
                # Devices ask again for what they still miss; what the broker was still
                # fanning out may be lost with it, so nothing counts as in flight any more.
                with self._lock:
                    self._recent.forget_sent()
                self._count("block_publish_failures", 1)
                log.info("block round for %s interrupted: %s", transfer_id, exc)
            except (OSError, EdgefleetError) as exc:
                self._count("bundle_unreadable", 1)
                log.warning("cannot read bundle of transfer %s: %s", transfer_id, exc)
        return plan

    def _entitled_only(
        self, requests: Sequence[tuple[str, BlockRequest]]
    ) -> list[tuple[str, BlockRequest]]:
        """Drop (and count) requests for bundles the requesting device is not assigned."""
        with self._lock:
            digests = {t: sha for t, (_p, sha) in self._plans.items()}
        kept: list[tuple[str, BlockRequest]] = []
        foreign = 0
        for device_id, request in requests:
            sha256 = digests.get(request.transfer_id)
            if sha256 is None:
                if self._refuse is not None:
                    self._refuse(device_id, "unknown_transfer")
            elif self._entitled is not None and not self._entitled(device_id, sha256):
                foreign += 1
                if self._refuse is not None:
                    self._refuse(device_id, "foreign_bundle")
                continue
            kept.append((device_id, request))
        if foreign:
            self._count("foreign_bundle", foreign)
        return kept

    def _sent(self, transfer_id: str, index: int) -> None:
        with self._lock:
            self._recent.record(transfer_id, index, self._monotonic())

    def _send(self, window: _Window, source: BlockSource, index: int, to: Publication) -> None:
        payload = source.message(index).to_bytes()
        self._pacer.acquire()
        window.add(self._client.publish(to.topic, payload, to.qos, to.retain))

    # ------------------------------------------------------------------ waves
    def start_wave(self, sha256: str) -> str:
        """Broadcast every block of a published bundle once, in the background.

        Returns:
            The wave id: the transfer id, also the last level of the wave topic.

        Raises:
            ModelNotPublishedError: no published bundle has this SHA-256, or its file is missing
                or does not match the signed digest and length.
            RegistryUnavailableError: the database failed.
        """
        bundle = next((b for b in self._published() if b[0] == sha256), None)
        if bundle is None:
            raise ModelNotPublishedError(f"no published bundle with sha256 {sha256}")
        transfer_id = self._remember(BlockPlan(bundle[1], sha256, self._block_size))
        source = self._source(transfer_id)
        if source is None:
            raise ModelNotPublishedError(f"bundle file of {sha256} is missing or corrupt")
        thread = threading.Thread(
            target=self._wave, args=(source, transfer_id), name="fleet-wave", daemon=True
        )
        with self._lock:
            self._waves = [t for t in self._waves if t.is_alive()]
            self._waves.append(thread)
        thread.start()
        return transfer_id

    def _wave(self, source: BlockSource, transfer_id: str) -> None:
        n_blocks = source.plan.n_blocks
        with self._lock:
            self._recent.wave_at(transfer_id, 0, n_blocks)
        try:
            self._wave_blocks(source, transfer_id)
        finally:
            with self._lock:
                self._recent.wave_ended(transfer_id)

    def _wave_blocks(self, source: BlockSource, transfer_id: str) -> None:
        window = _Window(self._client)
        wave = self._topics.publication("broadcast", arg=transfer_id)
        index = 0
        deadline = 0.0
        while index < source.plan.n_blocks and not self._stop.is_set():
            try:
                self._send(window, source, index, wave)
            except NotConnectedError:
                with self._lock:
                    self._recent.forget_sent()
                now = self._monotonic()
                deadline = deadline or now + _RECONNECT_WAIT
                if now > deadline:
                    self._count("waves_aborted", 1)
                    log.warning("wave %s aborted at block %d: not connected", transfer_id, index)
                    return
                self._stop.wait(0.2)
                continue
            except (TransportError, OSError, EdgefleetError) as exc:
                self._count("waves_aborted", 1)
                log.warning("wave %s aborted at block %d: %s", transfer_id, index, exc)
                return
            deadline = 0.0
            with self._lock:
                self._recent.record(transfer_id, index, self._monotonic())
                self._recent.wave_at(transfer_id, index + 1, source.plan.n_blocks)
            self._count("blocks_broadcast", 1)
            index += 1

    # ------------------------------------------------------------------ bundles
    def _remember(self, plan: BlockPlan) -> str:
        with self._lock:
            self._plans[plan.transfer_id] = (plan, plan.sha256)
        return plan.transfer_id

    def _resolve(self, transfer_id: str) -> bool:
        """Whether ``transfer_id`` is a published bundle; refreshes the cache (rate-limited)."""
        with self._lock:
            if transfer_id in self._plans:
                return True
            now = self._monotonic()
            if now - self._last_refresh < _REFRESH_EVERY:
                return False
            self._last_refresh = now
        try:
            bundles = self._published()
        except RegistryError as exc:
            log.warning("cannot list bundles: %s", exc)
            return False
        for sha256, length in bundles:
            if transfer_id_for(sha256, length, self._block_size) in self._plans:
                continue
            try:
                self._remember(BlockPlan(length, sha256, self._block_size))
            except EdgefleetError:  # a bundle too large to transfer in blocks
                continue
        with self._lock:
            return transfer_id in self._plans

    def _published(self) -> list[tuple[str, int]]:
        """(SHA-256, length) of every published file: model bundles and agent packages.

        Raises:
            RegistryError: the database failed.
        """
        files = [(b.sha256, b.length) for b in self._registry.list_bundles()]
        return files + [(a.sha256, a.length) for a in list_agent_releases(self._registry)]

    def _source(self, transfer_id: str) -> BlockSource | None:
        """The open, digest-checked bundle file of a known transfer (None: unusable)."""
        with self._lock:
            source = self._sources.get(transfer_id)
            entry = self._plans.get(transfer_id)
        if source is not None or entry is None:
            return source
        plan, sha256 = entry
        try:
            source = BlockSource(self._dir / f"{sha256}.bundle", plan)
        except (OSError, EdgefleetError) as exc:
            self._count("bundle_unreadable", 1)
            log.warning("bundle %s cannot be served: %s", sha256, exc)
            return None
        try:
            source.verify()
        except (OSError, EdgefleetError) as exc:
            source.close()
            self._count("bundle_unreadable", 1)
            log.warning("bundle %s cannot be served: %s", sha256, exc)
            return None
        with self._lock:
            existing = self._sources.setdefault(transfer_id, source)
        if existing is not source:
            source.close()
        return existing
