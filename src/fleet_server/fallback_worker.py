"""Cloud fallback serving: the server end of ``<prefix>/devices/<id>/fallback/req``.

Owns: ``FallbackWorker``, which takes requests from the shared subscription
``$share/<group>/<prefix>/devices/+/fallback/req`` (so several server processes split the
load), checks them, runs the model on a small bounded thread pool (the MQTT client delivers
every message on one handler thread; a slow model must not hold it), and answers on the
request's response topic with its correlation data.

Deadline rule: a request's ``deadline_ms`` is counted from when this worker received it (the
broker already dropped it if its message expiry ran out on the way); a request still queued
at its deadline is dropped (``expired``), and an answer computed past it is not sent
(``late``): the device has given up and a late answer only costs bandwidth. Bad requests get
an error response with a stable code and are counted; nothing a device sends stops the
worker. A response topic that is not the sending device's own ``fallback/resp/...`` is never
published to (a device must not make the server write into another device's topics).

Models published later: with a ``resolve`` callback, a pool thread (never the MQTT handler
thread, which the gateway shares) loads a model a request names that the worker lacks, and
asks again for a model it has at most every ``RESOLVE_EVERY`` seconds, swapping in a newer
version. Both are rate-limited per name; the names remembered for that are bounded (LRU).

Does not load models: ``CloudModel`` and ``CloudModels`` live in ``fleet_server.cloud_models``
(re-exported here). Does not create or close the MQTT client, and does not decide when
devices fall back.
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

from edge_agent.errors import ContractError, EdgefleetError, TransportError
from edge_agent.fallback_wire import (
    CONTENT_TYPE,
    FallbackRequest,
    FallbackResponse,
    compare_outputs,
)
from edge_agent.mqtt import Message, MessageProperties, MqttClient
from edge_agent.topics import Topics
from fleet_server.cloud_models import CloudModel, CloudModels
from fleet_server.errors import FallbackServingError

__all__ = ["CloudModel", "CloudModels", "FallbackWorker"]

log = logging.getLogger(__name__)

_QUEUE_SAMPLES: Final = 4096  # recent queue waits kept for the p50/p99 in stats()

#: Seconds between two ``resolve`` calls for the same name (a known model is refreshed, an
#: unknown one retried, at most this often).
RESOLVE_EVERY = 10.0

#: Names whose last ``resolve`` time is remembered (least recently resolved forgotten first):
#: the names come from devices, so the memory of them must be bounded.
RESOLVE_MEMORY = 1024


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
        client: MqttClient,
        models: Mapping[str, CloudModel],
        topics: Topics,
        share_group: str = "fleet",
        *,
        threads: int = 2,
        max_queue: int = 64,
        clock: Callable[[], float] = time.monotonic,
        resolve: Callable[[str], CloudModel | None] | None = None,
    ) -> None:
        """Prepare (not start) a worker.

        ``resolve(name)`` loads the newest cloud model of that name (e.g. from a bundle
        published after the worker started), or returns None when there is none; it may raise
        ``FallbackServingError``. It runs on the pool threads, at most once per
        ``RESOLVE_EVERY`` seconds per name: for a name the worker lacks (requests wait for it)
        and for one it serves (requests keep the current model meanwhile; a different version
        returned replaces it). Without it, ``models`` is all the worker serves.

        Raises:
            FallbackServingError: ``threads`` < 1, ``max_queue`` < 1 or a bad share group.
        """
        if threads < 1 or max_queue < 1:
            raise FallbackServingError("fallback worker needs threads >= 1 and max_queue >= 1")
        try:
            self._filter = topics.shared(share_group, "fallback_req")
        except ContractError as exc:
            raise FallbackServingError(f"fallback worker: {exc}") from exc
        self._client, self._models, self._topics, self._clock = client, dict(models), topics, clock
        self._resolve = resolve
        # name -> when resolve was last asked (LRU, at most RESOLVE_MEMORY names); the models
        # given here count as just resolved.
        self._resolved_at: OrderedDict[str, float] = OrderedDict.fromkeys(
            list(self._models)[-RESOLVE_MEMORY:], clock()
        )
        self._loading: dict[str, threading.Event] = {}  # names a pool thread is resolving
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
        self._client.subscribe(self._filter, self.handle, qos=1)

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
        if request.model not in self._models and not self._may_resolve(request.model, received):
            self._answer_unknown(job)  # cheap here; the queue stays free for real work
            return
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            msg = "all fallback workers are busy"
            self._answer_error(
                reply_to, correlation, request.model, "overloaded", msg, received, expires
            )

    def _may_resolve(self, name: str, now: float) -> bool:
        """Whether a pool thread may still find ``name``: it is due or being resolved."""
        if self._resolve is None:
            return False
        with self._lock:
            last = self._resolved_at.get(name)
            return name in self._loading or last is None or now - last >= RESOLVE_EVERY

    def _model_for(self, name: str, until: float) -> CloudModel | None:
        """The model to serve ``name`` with, resolving it first when due (pool threads only).

        A missing name waits (until ``until`` at most) for a resolve another thread started;
        a known one is served as it is while another thread refreshes it.
        """
        model = self._models.get(name)
        resolve = self._resolve
        if resolve is None:
            return model
        now = self._clock()
        mine: threading.Event | None = None
        with self._lock:
            loading = self._loading.get(name)
            last = self._resolved_at.get(name)
            if loading is None and (last is None or now - last >= RESOLVE_EVERY):
                mine = self._loading[name] = threading.Event()
                self._resolved_at[name] = now
                self._resolved_at.move_to_end(name)
                while len(self._resolved_at) > RESOLVE_MEMORY:
                    self._resolved_at.popitem(last=False)
        if mine is not None:
            try:
                self._load(name, resolve)
            finally:
                with self._lock:
                    del self._loading[name]
                mine.set()
        elif loading is not None and model is None:
            loading.wait(max(0.0, until - now))
        return self._models.get(name)

    def _load(self, name: str, resolve: Callable[[str], CloudModel | None]) -> None:
        """Ask ``resolve`` for ``name``; swap the result in when it is a different version."""
        try:
            model = resolve(name)
        except EdgefleetError as exc:
            self._count("resolve_failures")
            log.warning("cannot load cloud model %r: %s", name, exc)
            return
        if model is None:
            return  # not published (any more): a model already served stays served
        with self._lock:  # one writer at a time; readers never lock
            old = self._models.get(name)
            if old is not None and old.version == model.version:
                return
            self._models = {**self._models, name: model}  # replaced whole
        self._count("models_loaded")
        if old is None:
            log.info("cloud model %s v%s loaded", name, model.version)
        else:
            log.info("cloud model %s v%s replaces v%s", name, model.version, old.version)

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
        model = self._model_for(req.model, job.expires)
        if self._clock() >= job.expires:
            self._count("expired")  # resolving the model took the time the request had
            return
        if model is None:
            self._answer_unknown(job)
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
    def _answer_unknown(self, job: _Job) -> None:
        model = job.request.model
        self._answer_error(
            job.response_topic,
            job.correlation,
            model,
            "unknown_model",
            f"no cloud model {model!r}",
            job.received,
            job.expires,
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
            self._client.publish(topic, payload, qos=1, properties=props)
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
