"""Prometheus metrics of the local inference API, in a registry of their own.

Owns: the metric families the API exports and the hooks other components (the agent, the model
store, the fallback client) call to feed them. Every ``ApiMetrics`` has its own
``CollectorRegistry`` (never the process-global one), so two apps in one process, or tests, never
share series. ``render()`` is what ``GET /metrics`` serves.

Series:
    edgefleet_api_requests_total{endpoint,model,outcome,reason}  every /v2 model request
    edgefleet_api_request_duration_seconds{model,outcome}        inference latency histogram
    edgefleet_api_in_flight_requests                             inference requests in progress
    edgefleet_inference_source_total{model,source}               answered on device or in cloud
    edgefleet_model_version_info{model,version}                  1 for the version serving now
    edgefleet_validation_rows_rejected_total{model,reason}       rows refused or dropped

Label values must come from a bounded set: the API passes ``UNKNOWN_MODEL`` instead of a model
name nobody has confirmed exists (a client can put anything in a URL).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

OUTCOME_OK = "ok"
OUTCOME_INVALID = "invalid"
OUTCOME_TOO_LARGE = "too_large"
OUTCOME_RATE_LIMITED = "rate_limited"
OUTCOME_NOT_FOUND = "not_found"
OUTCOME_UNAVAILABLE = "unavailable"
OUTCOME_ERROR = "error"
OUTCOME_ABORTED = "aborted"
NO_REASON = "none"
UNKNOWN_MODEL = "_unknown"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Inference on a small edge model takes ~0.2-5 ms; cloud fallback up to its deadline (~250 ms).
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class ApiMetrics:
    """The API's metric families and the hooks that feed them. Thread-safe."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """Create the families in ``registry`` (a new, private one by default)."""
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "edgefleet_api_requests",
            "Local API requests by endpoint, model, outcome and reason.",
            ("endpoint", "model", "outcome", "reason"),
            registry=self.registry,
        )
        self._latency = Histogram(
            "edgefleet_api_request_duration_seconds",
            "Inference request latency, from first byte read to response built.",
            ("model", "outcome"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._in_flight = Gauge(
            "edgefleet_api_in_flight_requests",
            "Inference requests being served.",
            registry=self.registry,
        )
        self._source = Counter(
            "edgefleet_inference_source",
            "Answered inference requests by where they ran (device or cloud).",
            ("model", "source"),
            registry=self.registry,
        )
        self._version = Gauge(
            "edgefleet_model_version_info",
            "1 for the model version serving now.",
            ("model", "version"),
            registry=self.registry,
        )
        self._rows = Counter(
            "edgefleet_validation_rows_rejected",
            "Input rows rejected or dropped by validation, by reason.",
            ("model", "reason"),
            registry=self.registry,
        )
        self._versions: dict[str, str] = {}
        self._lock = threading.Lock()
        # labels() costs a lock and a dict build per call: cache the children on the hot path.
        self._observers: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}
        self._sources: dict[tuple[str, str], Counter] = {}

    def observe_infer(self, model: str, outcome: str, reason: str, seconds: float) -> None:
        """Count one inference request and observe its latency."""
        key = (model, outcome, reason)
        children = self._observers.get(key)
        if children is None:
            children = (
                self._requests.labels("infer", model, outcome, reason),
                self._latency.labels(model, outcome),
            )
            self._observers[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def count_request(self, endpoint: str, model: str, outcome: str, reason: str) -> None:
        """Count one non-inference request (metadata, readiness) by outcome."""
        self._requests.labels(endpoint, model, outcome, reason).inc()

    def request_started(self) -> None:
        """An inference request is being served."""
        self._in_flight.inc()

    def request_finished(self) -> None:
        """An inference request is done (answered or failed)."""
        self._in_flight.dec()

    def count_source(self, model: str, source: str, count: int = 1) -> None:
        """Count answers by where they were computed (``device`` or ``cloud``)."""
        child = self._sources.get((model, source))
        if child is None:
            child = self._sources[(model, source)] = self._source.labels(model, source)
        child.inc(count)

    def set_model_version(self, model: str, version: str) -> None:
        """Mark ``version`` as the one ``model`` serves now (the previous one is removed)."""
        if self._versions.get(model) == version:
            return
        with self._lock:
            previous = self._versions.get(model)
            if previous == version:
                return
            if previous is not None:
                self._version.remove(model, previous)
            self._version.labels(model, version).set(1)
            self._versions[model] = version

    def remove_model(self, model: str) -> None:
        """Forget the version series of a model that was unloaded."""
        with self._lock:
            previous = self._versions.pop(model, None)
            if previous is not None:
                self._version.remove(model, previous)

    def count_rejected_rows(self, model: str, counts: Mapping[str, int]) -> None:
        """Count rows validation refused or dropped, by reason (``nan``, ``out_of_range``, ...)."""
        for reason, count in counts.items():
            if count > 0:
                self._rows.labels(model, reason).inc(count)

    def render(self) -> bytes:
        """The registry in the Prometheus text format (serve with ``CONTENT_TYPE``)."""
        return generate_latest(self.registry)
