"""The real cloud-fallback transport: MQTT v5 request/response to the fleet server's workers.

Owns: ``MqttFallbackTransport``, which implements ``edge_agent.serving.fallback.FallbackTransport``
over ``MqttClient.request`` (response topic ``<prefix>/devices/<id>/fallback/resp/<token>``,
correlation data, message expiry from the deadline), maps every failure to the fallback
module's typed errors, and counts device/cloud disagreement when the device sends its own
answer along (hard examples). Does not decide *when* to ask the cloud, guard the call
(``CloudFallback`` does: breaker, budget, late answers) or speak paho (``edge_agent.common.mqtt``).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from edge_agent.common.mqtt_types import Message
from edge_agent.errors import (
    ContractError,
    FallbackRemoteError,
    TransportError,
    TransportTimeoutError,
)
from edge_agent.serving.fallback import CloudFallbackError, Tensors
from edge_agent.wire.fallback import FallbackRequest, FallbackResponse
from edge_agent.wire.fallback_compare import Comparison, compare_outputs
from edge_agent.wire.topics import Topics

__all__ = ["MqttFallbackTransport", "RequestClient"]


class RequestClient(Protocol):
    """The part of ``edge_agent.common.mqtt.MqttClient`` this transport uses."""

    def request(self, topic: str, payload: bytes, response_topic: str, timeout: float) -> Message:
        """Publish and wait for the correlated response (raises ``TransportError``)."""
        ...


class MqttFallbackTransport:
    """``FallbackTransport`` over MQTT v5 request/response. Thread-safe.

    Each transport answers on one response topic of its own (a random token below the
    device's ``fallback/resp/``, the only subtree the broker lets this device read), so
    ``MqttClient.request`` subscribes once, on the first request, and responses are matched
    by correlation data. Disagreement counters (``stats()``) are cumulative; the agent
    reports them in telemetry (see ``docs/fallback.md``).
    """

    def __init__(
        self,
        client: RequestClient,
        topics: Topics,
        device_id: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Bind the transport to a connected (or connecting) client and this device's topics.

        Raises:
            ContractError: ``device_id`` is not a valid device id.
        """
        self._client, self._clock = client, clock
        self._req_topic = topics.fallback_req(device_id)
        self._resp_topic = topics.fallback_resp(device_id, secrets.token_hex(8))
        self._lock = threading.Lock()
        self._counts = Counter[str]()
        self._by_model: dict[str, Counter[str]] = {}

    @property
    def response_topic(self) -> str:
        """The topic this transport's answers arrive on."""
        return self._resp_topic

    def request(
        self,
        model: str,
        inputs: Tensors,
        *,
        deadline_s: float,
        reason: str,
        device_outputs: Tensors | None = None,
        model_version: int | None = None,
    ) -> Tensors:
        """Ask the cloud copy of ``model`` to answer ``inputs`` within ``deadline_s`` seconds.

        ``device_outputs`` (optional, beyond the ``FallbackTransport`` protocol) is the
        device's own answer to the same inputs; it travels with the request and the answer is
        compared with it (``stats()["disagree_rows"]``). ``model_version`` is the version the
        device runs: the cloud answers with that version's cloud model, and refuses
        (``unknown_version``) a version it does not serve rather than answer with another.

        Raises:
            CloudFallbackError: reason ``deadline`` when no answer came in time,
                ``transport_error`` when the request cannot be encoded or sent.
            FallbackRemoteError: the cloud answered with an error, or with an answer that
                does not parse or is for another model (``remote_code`` says which).
        """
        try:
            payload = FallbackRequest(
                model,
                inputs,
                deadline_ms=max(1.0, deadline_s * 1000.0),
                reason=reason,
                device_outputs=device_outputs or {},
                model_version=model_version,
            ).to_bytes()
        except ContractError as exc:
            self._count("encode_errors")
            raise CloudFallbackError(
                f"cannot encode fallback request: {exc}", reason="transport_error"
            ) from exc
        start = self._clock()
        try:
            message = self._client.request(self._req_topic, payload, self._resp_topic, deadline_s)
        except TransportTimeoutError as exc:
            self._count("timeouts")
            raise CloudFallbackError(
                f"no cloud answer for {model!r} in {deadline_s * 1000:.0f} ms", reason="deadline"
            ) from exc
        except TransportError as exc:
            self._count("transport_errors")
            raise CloudFallbackError(
                f"cannot reach the cloud: {exc}", reason="transport_error"
            ) from exc
        self._count("round_trip_us", int((self._clock() - start) * 1e6))
        answer = self._decode(model, message.payload)
        self._count("answered")
        if device_outputs:
            self.observe(model, device_outputs, answer.outputs)
        return answer.outputs

    def _decode(self, model: str, payload: bytes) -> FallbackResponse:
        try:
            answer = FallbackResponse.from_bytes(payload)
        except ContractError as exc:
            self._count("bad_responses")
            raise FallbackRemoteError(
                f"unusable cloud answer: {exc}", remote_code="bad_response"
            ) from exc
        if answer.model != model:
            self._count("bad_responses")
            raise FallbackRemoteError(
                f"cloud answered for {answer.model!r}, not {model!r}", remote_code="bad_response"
            )
        if not answer.ok:
            code = answer.error_code or "internal"
            self._count(f"remote_{code}")
            raise FallbackRemoteError(
                f"cloud refused {model!r}: {code}: {answer.error_message}", remote_code=code
            )
        return answer

    def observe(self, model: str, device_outputs: Tensors, cloud_outputs: Tensors) -> Comparison:
        """Count how far a device answer and the cloud's answer to the same inputs disagree.

        For callers that hold both answers (the agent after a hard-example fallback).
        """
        result = compare_outputs(device_outputs, cloud_outputs)
        with self._lock:
            per = self._by_model.setdefault(model, Counter())
            for c in (self._counts, per):
                c["compared"] += 1
                c["compared_rows"] += result.rows
                c["disagree_rows"] += result.disagree_rows
                c["disagreements"] += int(result.disagree_rows > 0)
                c["incomparable"] += int(not result.comparable)
        return result

    def stats(self) -> dict[str, Any]:
        """Cumulative counters: ``answered``, ``timeouts``, ``transport_errors``,
        ``bad_responses``, ``remote_<code>``, ``encode_errors``, ``round_trip_us`` (sum),
        ``compared``, ``compared_rows``, ``disagree_rows``, ``disagreements`` (requests with
        at least one disagreeing row), ``incomparable``; and ``by_model`` for the comparisons.
        """
        keys = (
            *("answered", "timeouts", "transport_errors", "bad_responses", "encode_errors"),
            *("round_trip_us", "compared", "compared_rows", "disagree_rows", "disagreements"),
        )
        with self._lock:
            out: dict[str, Any] = {k: self._counts[k] for k in (*keys, "incomparable")}
            out.update({k: v for k, v in self._counts.items() if k.startswith("remote_")})
            out["by_model"] = {m: dict(c) for m, c in self._by_model.items()}
        return out

    def telemetry_counts(self) -> dict[str, int]:
        """Flat ``fallback_*`` counters for a telemetry report's ``counts`` section."""
        s = self.stats()
        names = ("compared", "compared_rows", "disagree_rows", "disagreements", "timeouts")
        return {f"fallback_{k}": int(s[k]) for k in names}

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n
