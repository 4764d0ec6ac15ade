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
    edgefleet_api_decode_memory_bytes{kind}                      decode budget: limit, held
    edgefleet_api_decode_waiting_requests                        requests waiting for a share

Label values must come from a bounded set: the API passes ``UNKNOWN_MODEL`` instead of a model
name nobody has confirmed exists (a client can put anything in a URL).

The first four series change on every inference request. prometheus-client's ``Counter``,
``Histogram`` and ``Gauge`` cost ~1-2 us per update there (a lock and a value object per
sample, exemplar checks), so they are kept as plain numbers under one lock and exported by a
collector at scrape time, sample for sample as those classes would (``_total``, ``_created``,
cumulative ``_bucket``, ``_count``, ``_sum``). The rarely changing ones stay prometheus-client
metrics.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Protocol, TypeVar

import prometheus_client.metrics as _pm
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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


_REQUESTS = "edgefleet_api_requests"
_REQUESTS_HELP = "Local API requests by endpoint, model, outcome and reason."
_LATENCY = "edgefleet_api_request_duration_seconds"
_LATENCY_HELP = "Inference request latency, from first byte read to response built."
_IN_FLIGHT = "edgefleet_api_in_flight_requests"
_IN_FLIGHT_HELP = "Inference requests being served."
_SOURCE = "edgefleet_inference_source"
_SOURCE_HELP = "Answered inference requests by where they ran (device or cloud)."
_BOUNDS = (*LATENCY_BUCKETS, math.inf)
_LE: tuple[str, ...] = tuple(floatToGoString(b) for b in _BOUNDS)  # type: ignore[no-untyped-call]


_K = TypeVar("_K", bound=tuple[str, ...])


class _Count:
    """One counter series: its value and creation time."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()


class _Buckets:
    """One histogram series: per-bucket (not cumulative) counts, sum and creation time."""

    __slots__ = ("counts", "created", "sum")

    def __init__(self) -> None:
        self.counts = [0] * len(_BOUNDS)
        self.sum = 0.0
        self.created = time.time()


class _HotCollector(Collector):
    """The per-request series as plain numbers; exported like prometheus-client's classes.

    Callers hold ``lock`` while changing the dicts or the values in them.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, str, str], _Count] = {}
        self.latency: dict[tuple[str, str], _Buckets] = {}
        self.sources: dict[tuple[str, str], _Count] = {}
        self.in_flight = 0

    def collect(self) -> Iterator[Metric]:
        created = bool(getattr(_pm, "_use_created", True))  # PROMETHEUS_DISABLE_CREATED_SERIES
        with self.lock:
            requests = [(k, c.value, c.created) for k, c in self.requests.items()]
            latency = [(k, list(b.counts), b.sum, b.created) for k, b in self.latency.items()]
            sources = [(k, c.value, c.created) for k, c in self.sources.items()]
            in_flight = self.in_flight
        family = CounterMetricFamily(
            _REQUESTS, _REQUESTS_HELP, labels=("endpoint", "model", "outcome", "reason")
        )
        for key, value, since in requests:
            family.add_metric(key, value, created=since if created else None)
        yield family
        histogram = Metric(_LATENCY, _LATENCY_HELP, "histogram")
        for (model, outcome), counts, total, since in latency:
            labels = {"model": model, "outcome": outcome}
            acc = 0
            for le, count in zip(_LE, counts, strict=True):
                acc += count
                histogram.add_sample(_LATENCY + "_bucket", {**labels, "le": le}, float(acc))
            histogram.add_sample(_LATENCY + "_count", labels, float(acc))
            histogram.add_sample(_LATENCY + "_sum", labels, total)
            if created:
                histogram.add_sample(_LATENCY + "_created", labels, since)
        yield histogram
        yield GaugeMetricFamily(_IN_FLIGHT, _IN_FLIGHT_HELP, value=float(in_flight))
        sources_family = CounterMetricFamily(_SOURCE, _SOURCE_HELP, labels=("model", "source"))
        for source_key, value, since in sources:
            sources_family.add_metric(source_key, value, created=since if created else None)
        yield sources_family


class DecodeBudgetView(Protocol):
    """What the metrics read of the decode memory budget (``edge_agent.api.budget``)."""

    total: int
    free: int

    @property
    def waiting(self) -> int:
        """Requests waiting for their share."""
        ...


class ApiMetrics:
    """The API's metric families and the hooks that feed them. Thread-safe."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """Create the families in ``registry`` (a new, private one by default)."""
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._hot = _HotCollector()
        self.registry.register(self._hot)
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
        self._budget: DecodeBudgetView | None = None

    def observe_infer(
        self, model: str, outcome: str, reason: str, seconds: float, *, finished: bool = False
    ) -> None:
        """Count one inference request and observe its latency; ``finished``: it is also no
        longer in flight (``request_finished`` in the same lock)."""
        # The bucket is the first bound >= seconds, as Histogram.observe picks it (none: NaN).
        bucket = bisect.bisect_left(_BOUNDS, seconds) if not math.isnan(seconds) else -1
        hot = self._hot
        with hot.lock:
            if finished:
                hot.in_flight -= 1
            count = hot.requests.get(("infer", model, outcome, reason))
            if count is None:
                count = hot.requests[("infer", model, outcome, reason)] = _Count()
            count.value += 1.0
            series = hot.latency.get((model, outcome))
            if series is None:
                series = hot.latency[(model, outcome)] = _Buckets()
            if bucket >= 0:
                series.counts[bucket] += 1
            series.sum += seconds

    def count_request(self, endpoint: str, model: str, outcome: str, reason: str) -> None:
        """Count one non-inference request (metadata, readiness) by outcome."""
        self._inc(self._hot.requests, (endpoint, model, outcome, reason), 1.0)

    def request_started(self) -> None:
        """An inference request is being served."""
        with self._hot.lock:
            self._hot.in_flight += 1

    def request_finished(self) -> None:
        """An inference request is done (answered or failed)."""
        with self._hot.lock:
            self._hot.in_flight -= 1

    def count_source(self, model: str, source: str, count: int = 1) -> None:
        """Count answers by where they were computed (``device`` or ``cloud``).

        Raises:
            ValueError: ``count`` is negative (a counter only goes up).
        """
        if count < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self._inc(self._hot.sources, (model, source), float(count))

    def _inc(self, series: dict[_K, _Count], key: _K, amount: float) -> None:
        with self._hot.lock:
            count = series.get(key)
            if count is None:
                count = series[key] = _Count()
            count.value += amount

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

    def watch_decode_budget(self, budget: DecodeBudgetView) -> None:
        """Export ``budget`` (read at scrape time): its limit, the bytes held, the waiters.

        A later call (another app on the same metrics) exports that app's budget instead.
        """
        first = self._budget is None
        self._budget = budget
        if not first:
            return
        memory = Gauge(
            "edgefleet_api_decode_memory_bytes",
            "Memory large request bodies may hold while decoded (limit) and hold now (held).",
            ("kind",),
            registry=self.registry,
        )
        memory.labels("limit").set_function(lambda: float(self._watched().total))
        memory.labels("held").set_function(
            lambda: float(self._watched().total - self._watched().free)
        )
        Gauge(
            "edgefleet_api_decode_waiting_requests",
            "Requests waiting for their share of the decode memory budget.",
            registry=self.registry,
        ).set_function(lambda: float(self._watched().waiting))

    def _watched(self) -> DecodeBudgetView:
        assert self._budget is not None  # set before the gauges exist
        return self._budget

    def render(self) -> bytes:
        """The registry in the Prometheus text format (serve with ``CONTENT_TYPE``)."""
        return generate_latest(self.registry)
