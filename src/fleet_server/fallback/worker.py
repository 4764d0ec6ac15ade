"""Cloud fallback serving: the server end of ``<prefix>/devices/<id>/fallback/req``.

Owns: ``FallbackWorker``, which takes requests from the fallback-worker role's subscriptions in
``Topics`` (``fallback_worker_subscriptions``: ``$share/<group>/<prefix>/devices/+/fallback/req``,
so several server processes split the load) over any ``Transport``, checks them, runs the
model on a small bounded thread pool (the MQTT client delivers every message on one handler
thread; a slow model must not hold it), and answers on the request's response topic with its
correlation data.

Deadline rule: a request's ``deadline_ms`` is counted from when this worker received it (the
broker already dropped it if its message expiry ran out on the way); a request still queued
at its deadline is dropped (``expired``), and an answer computed past it is not sent
(``late``): the device has given up and a late answer only costs bandwidth. Bad requests get
an error response with a stable code and are counted; nothing a device sends stops the
worker. A response topic that is not the sending device's own ``fallback/resp/...`` is never
published to (a device must not make the server write into another device's topics).

Which model answers: the version the device runs, never simply the newest published one (a
candidate that is merely published must not change what the fleet's fallback answers, nor
touch a rollout's control group). A request names its version (``model_version``); a request
of an older agent that does not is resolved with ``CloudModelSource.version_of`` (what the
registry says the device runs). With a ``source``, a pool thread (never the MQTT handler
thread, which the gateway shares) loads ``(name, version)`` with ``CloudModelSource.load``;
a version it does not serve (unpublished, unknown) is refused with ``unknown_version``
(``unknown_model`` for requests without a version: older agents know only that code), and
asked again at most every ``RESOLVE_EVERY`` seconds. Versions are immutable, so a loaded one
is never refreshed; at most ``MAX_LOADED`` are kept (least recently used dropped), and the
refusals remembered are bounded too. Without a source, ``models`` (by name, e.g. an
operator's float model) answers every version of its name.

Does not load models: ``CloudModel``, ``CloudModels`` and ``CloudModelSource`` live in
``fleet_server.fallback.cloud_models`` (import them from there). Does not create or close the
MQTT client, and does not decide when devices fall back.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from edge_agent.common.mqtt_types import Message, MessageProperties
from edge_agent.common.transport import Transport
from edge_agent.errors import ContractError, EdgefleetError, TransportError
from edge_agent.wire.fallback import CONTENT_TYPE, FallbackRequest, FallbackResponse
from edge_agent.wire.fallback_compare import compare_outputs
from edge_agent.wire.topics import TOPIC_SPECS, Topics
from fleet_server.errors import FallbackServingError
from fleet_server.fallback.cloud_models import CloudModel, CloudModelSource

__all__ = ["FallbackWorker"]

log = logging.getLogger(__name__)

#: Answers go to the requester's ``fallback_resp`` topic, with that kind's QoS and retain.
_RESP: Final = TOPIC_SPECS["fallback_resp"]
_QUEUE_SAMPLES: Final = 4096  # recent queue waits kept for the p50/p99 in stats()

#: Seconds between two ``load`` calls for a ``(name, version)`` the source did not serve.
RESOLVE_EVERY = 10.0

#: ``(name, version)`` pairs whose last refused ``load`` is remembered (oldest forgotten
#: first): the names and versions come from devices, so the memory of them must be bounded.
RESOLVE_MEMORY = 1024

#: Loaded cloud models kept (least recently used dropped, loaded again when asked for).
MAX_LOADED = 16

_Key = tuple[str, int]


@dataclass(frozen=True)
class _Job:
    device_id: str
    request: FallbackRequest
    response_topic: str
    correlation: bytes
    received: float
    expires: float


class FallbackWorker:
    """Answers fallback requests with the cloud models. Thread-safe; see the module docstring."""

    def __init__(
        self,
        client: Transport,
        models: Mapping[str, CloudModel],
        topics: Topics,
        share_group: str = "fleet",
        *,
        threads: int = 2,
        max_queue: int = 64,
        clock: Callable[[], float] = time.monotonic,
        source: CloudModelSource | None = None,
    ) -> None:
        """Prepare (not start) a worker.

        ``source`` loads the cloud model of one published version and says which version a
        device runs (both on the pool threads; see the module docstring). Without it,
        ``models`` (by name) is all the worker serves, for every version of each name.

        Raises:
            FallbackServingError: ``threads`` < 1, ``max_queue`` < 1 or a bad share group.
        """
        if threads < 1 or max_queue < 1:
            raise FallbackServingError("fallback worker needs threads >= 1 and max_queue >= 1")
        try:
            self._subscriptions = topics.fallback_worker_subscriptions(share_group)
        except ContractError as exc:
            raise FallbackServingError(f"fallback worker: {exc}") from exc
        self._client, self._models, self._topics, self._clock = client, dict(models), topics, clock
        self._source = source
        self._loaded: OrderedDict[_Key, CloudModel] = OrderedDict()  # LRU, MAX_LOADED
        self._refused_at: OrderedDict[_Key, float] = OrderedDict()  # LRU, RESOLVE_MEMORY
        self._loading: dict[_Key, threading.Event] = {}  # keys a pool thread is loading
        self._jobs: queue.Queue[_Job | None] = queue.Queue(max_queue)
        self._threads = [
            threading.Thread(target=self._work, name=f"fallback-{i}", daemon=True)
            for i in range(threads)
        ]
        self._lock = threading.Lock()
        self._counts = Counter[str]()
        self._waits: list[float] = []
        self._started = False

    def start(self) -> None:
        """Start the pool and subscribe (now if connected, else on connect).

        Raises:
            TransportError: the broker refused the subscription or did not acknowledge it.
        """
        if not self._started:
            self._started = True
            for t in self._threads:
                t.start()
        for sub in self._subscriptions:
            self._client.subscribe(sub.filter, self.handle, qos=sub.qos)

    def close(self, timeout: float = 2.0) -> None:
        """Stop the pool after the jobs already queued (does not close the client)."""
        for _ in self._threads:
            try:
                self._jobs.put(None, timeout=timeout)
            except queue.Full:
                break
        for t in self._threads:
            if t.is_alive():
                t.join(timeout)

    # ------------------------------------------------------------------ handler thread
    def handle(self, message: Message) -> None:
        """Check one request and queue it for the pool (the MQTT handler; never raises)."""
        received = self._clock()
        self._count("received")
        props = message.properties
        try:
            ref = self._topics.parse_ref(message.topic)
        except ContractError:
            self._count("dropped_bad_topic")
            return
        device_id = ref.device_id
        if ref.kind != "fallback_req" or device_id is None:
            self._count("dropped_bad_topic")
            return
        reply_to, correlation = props.response_topic, props.correlation_data
        if (
            reply_to is None
            or correlation is None
            or not self._own_reply_topic(reply_to, device_id)
        ):
            self._count("dropped_no_reply")  # nowhere (safe) to answer: drop, counted
            return
        try:
            request = FallbackRequest.from_bytes(message.payload)
        except ContractError as exc:
            self._answer_error(reply_to, correlation, "?", "bad_request", str(exc), received, 5.0)
            return
        expires = received + request.deadline_ms / 1000.0
        job = _Job(device_id, request, reply_to, correlation, received, expires)
        if not self._may_serve(request, received):
            self._answer_unknown(job, request.model_version)  # cheap; the queue stays free
            return
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            msg = "all fallback workers are busy"
            self._answer_error(
                reply_to, correlation, request.model, "overloaded", msg, received, expires
            )

    def _may_serve(self, request: FallbackRequest, now: float) -> bool:
        """False when the request is sure to be refused: no source and no model of the name,
        or a version refused less than ``RESOLVE_EVERY`` seconds ago."""
        if self._source is None:
            return request.model in self._models
        if request.model_version is None:
            return True  # the registry is asked on a pool thread
        key = (request.model, request.model_version)
        with self._lock:
            last = self._refused_at.get(key)
            return key in self._loading or last is None or now - last >= RESOLVE_EVERY

    def _model_for(self, name: str, version: int | None, until: float) -> CloudModel | None:
        """The model that answers ``name`` v``version``, loading it first (pool threads only).

        A key another thread is loading is waited for (until ``until`` at most).
        """
        source = self._source
        if source is None:
            return self._models.get(name)
        if version is None:
            return None
        key = (name, version)
        now = self._clock()
        mine: threading.Event | None = None
        with self._lock:
            model = self._loaded.get(key)
            if model is not None:
                self._loaded.move_to_end(key)
                return model
            loading = self._loading.get(key)
            last = self._refused_at.get(key)
            if loading is None and (last is None or now - last >= RESOLVE_EVERY):
                mine = self._loading[key] = threading.Event()
        if mine is not None:
            try:
                self._load(key, source, now)
            finally:
                with self._lock:
                    del self._loading[key]
                mine.set()
        elif loading is not None:
            loading.wait(max(0.0, until - now))
        with self._lock:
            return self._loaded.get(key)

    def _load(self, key: _Key, source: CloudModelSource, now: float) -> None:
        """Ask the source for ``key``; keep what it serves, remember when it refused."""
        try:
            model = source.load(*key)
        except EdgefleetError as exc:
            self._count("resolve_failures")
            log.warning("cannot load cloud model %s v%d: %s", key[0], key[1], exc)
            model = None
        with self._lock:
            if model is None:
                self._refused_at[key] = now
                self._refused_at.move_to_end(key)
                while len(self._refused_at) > RESOLVE_MEMORY:
                    self._refused_at.popitem(last=False)
                return
            self._refused_at.pop(key, None)
            self._loaded[key] = model
            while len(self._loaded) > MAX_LOADED:
                self._loaded.popitem(last=False)
        self._count("models_loaded")
        log.info("cloud model %s v%d loaded (answers as %s)", key[0], key[1], model.version)

    def _version_of(self, job: _Job) -> int | None:
        """The version the request names, else the one the registry says the device runs."""
        req = job.request
        if req.model_version is not None or self._source is None:
            return req.model_version
        try:
            return self._source.version_of(req.model, job.device_id)
        except EdgefleetError as exc:
            self._count("resolve_failures")
            log.warning("cannot tell which %s version %s runs: %s", req.model, job.device_id, exc)
            return None

    def _own_reply_topic(self, topic: str, device_id: str) -> bool:
        try:
            ref = self._topics.parse_ref(topic)
        except ContractError:
            return False
        return ref.kind == "fallback_resp" and ref.device_id == device_id

    # ------------------------------------------------------------------ pool
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._serve(job)
            except Exception:  # a bug must not kill the pool thread
                self._count("errors_internal")
                log.exception("fallback request from %s failed", job.device_id)

    def _serve(self, job: _Job) -> None:
        start = self._clock()
        with self._lock:
            if len(self._waits) >= _QUEUE_SAMPLES:
                del self._waits[: _QUEUE_SAMPLES // 2]
            self._waits.append(start - job.received)
        if start >= job.expires:
            self._count("expired")
            return
        req = job.request
        version = self._version_of(job)
        model = self._model_for(req.model, version, job.expires)
        if self._clock() >= job.expires:
            self._count("expired")  # resolving the model took the time the request had
            return
        if model is None:
            self._answer_unknown(job, version)
            return
        try:
            outputs = model.run(req.inputs)
        except ContractError as exc:
            self._answer_error(
                job.response_topic,
                job.correlation,
                req.model,
                "bad_request",
                str(exc),
                job.received,
                job.expires,
            )
            return
        except EdgefleetError as exc:
            msg = f"cloud model failed: {exc}"
            self._answer_error(
                job.response_topic,
                job.correlation,
                req.model,
                "inference_failed",
                msg,
                job.received,
                job.expires,
            )
            return
        done = self._clock()
        if done >= job.expires:
            self._count("late")
            return
        if req.device_outputs:
            cmp = compare_outputs(req.device_outputs, outputs)
            self._count("compared")
            self._count("compared_rows", cmp.rows)
            self._count("disagree_rows", cmp.disagree_rows)
        try:
            answer = FallbackResponse(
                req.model, model.version, outputs, compute_ms=(done - start) * 1000
            )
            payload = answer.to_bytes()
        except ContractError as exc:
            self._answer_error(
                job.response_topic,
                job.correlation,
                req.model,
                "internal",
                str(exc),
                job.received,
                job.expires,
            )
            return
        if self._publish(job.response_topic, job.correlation, payload, job.expires):
            self._count("answered")

    # ------------------------------------------------------------------ replies
    def _answer_unknown(self, job: _Job, version: int | None) -> None:
        model = job.request.model
        if job.request.model_version is not None:  # an agent that knows unknown_version
            code, text = "unknown_version", f"no cloud model for {model!r} v{version}"
        elif version is None:
            code, text = "unknown_model", f"no cloud model {model!r} for this device"
        else:
            code, text = "unknown_model", f"no cloud model for {model!r} v{version}"
        self._answer_error(
            job.response_topic, job.correlation, model, code, text, job.received, job.expires
        )

    def _answer_error(
        self,
        topic: str,
        correlation: bytes,
        model: str,
        code: str,
        message: str,
        received: float,
        expires: float,
    ) -> None:
        self._count(f"errors_{code}")
        try:
            payload = FallbackResponse.failure(
                model if model != "?" else "unknown", code, message
            ).to_bytes()
        except ContractError:  # the model name itself was unusable
            payload = FallbackResponse.failure("unknown", code, message).to_bytes()
        self._publish(topic, correlation, payload, max(expires, received + 1.0))

    def _publish(self, topic: str, correlation: bytes, payload: bytes, expires: float) -> bool:
        left = expires - self._clock()
        props = MessageProperties(
            correlation_data=correlation,
            message_expiry=max(1, math.ceil(left)),
            content_type=CONTENT_TYPE,
        )
        try:
            self._client.publish(topic, payload, _RESP.qos, _RESP.retain, properties=props)
        except TransportError as exc:
            self._count("publish_errors")
            log.warning("cannot answer fallback request on %s: %s", topic, exc)
            return False
        return True

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict[str, Any]:
        """Counters (``received``, ``answered``, ``expired``, ``late``, ``errors_<code>``,
        ``dropped_bad_topic``, ``dropped_no_reply``, ``publish_errors``, ``compared``,
        ``compared_rows``, ``disagree_rows``, ``models_loaded``, ``resolve_failures``),
        ``queued`` now, and the queue wait p50/p99 (ms) over recent requests.
        """
        with self._lock:
            out: dict[str, Any] = dict(self._counts)
            waits = sorted(self._waits)
        for k in ("received", "answered", "expired", "late", "dropped_no_reply"):
            out.setdefault(k, 0)
        out["queued"] = self._jobs.qsize()
        if waits:
            out["queue_wait_ms_p50"] = waits[len(waits) // 2] * 1000
            out["queue_wait_ms_p99"] = waits[min(len(waits) - 1, int(len(waits) * 0.99))] * 1000
        return out

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n
