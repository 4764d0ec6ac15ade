"""Certificate renewal on the device: new key, CSR over MQTT, switch, confirm.

Owns the device's half of renewal (the CA's half is ``fleet_server.pki.renewal``), driven from
the sync thread by ``drive``:

1. Once ``renew_fraction`` of the certificate's validity has passed, a **new key** is generated
   and written beside the current pair (``IdentityStore.create_next_key``) and a CSR for it is
   sent on ``.../cert/req`` with the serial of the certificate in use.
2. The issued certificate (``.../cert/resp``) is verified against the fleet CA and the new key
   and written beside the current pair; the MQTT session **reconnects with the new pair**
   (``MqttClient.switch_identity``: the old pair stays loaded unless the broker accepts the new).
3. Connected with it, the device **promotes** the new pair over the old files and sends
   ``confirm``; only then does the CA revoke the old certificate.

Any failure (refusal, timeout, a certificate that does not verify, a broker that refuses the
new pair) discards the new pair, keeps the old one, emits ``cert_renewal_failed`` and retries
with exponential backoff; ``status`` reports it. A kill at any step leaves a working pair on
disk (``IdentityStore.recover`` finishes or discards the interrupted step at the next start).
A device whose certificate has *expired* cannot reach the broker to renew: it needs a new
enrollment (docs/operations.md, "Certificate life").
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from edge_agent.common.identity import IdentityStore, build_csr, renewal_due
from edge_agent.common.mqtt_types import Message
from edge_agent.errors import ContractError, IdentityError, TransportError
from edge_agent.wire.ops.certs import CertRequest, CertResponse

__all__ = ["CertRenewer", "RenewalPolicy"]

log = logging.getLogger(__name__)

#: Times a lost confirmation is sent again before the device stops asking (the old
#: certificate then simply expires unrevoked; the new one works either way).
CONFIRM_ATTEMPTS = 5


@dataclass(frozen=True)
class RenewalPolicy:
    """When and how patiently to renew (``[sync]`` ``renew_*`` settings)."""

    fraction: float = 2 / 3
    timeout: float = 30.0
    retry_min: float = 10.0
    retry_max: float = 3600.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


class CertRenewer:
    """The renewal state machine (``idle`` -> ``requested`` -> ``confirming`` -> ``idle``).

    ``on_response`` runs on the MQTT handler thread and only queues; everything else runs on
    the sync thread (``drive``).
    """

    def __init__(
        self,
        store: IdentityStore,
        device_id: str,
        *,
        publish: Callable[[bytes], object],
        switch: Callable[[Path, Path, float], None],
        event: Callable[[str, str], None],
        policy: RenewalPolicy = RenewalPolicy(),
        now: Callable[[], datetime] = _utcnow,
        monotonic: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """``publish`` sends a request on the device's ``cert/req`` topic; ``switch``
        reconnects with a new (cert, key) pair or raises ``TransportError``; ``event`` records
        a telemetry event ``(kind, detail)``."""
        self._store = store
        self._device_id = device_id
        self._publish = publish
        self._switch = switch
        self._event = event
        self._policy = policy
        self._now = now
        self._mono = monotonic
        self._rand = rand
        self._inbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._cert: x509.Certificate | None = None
        self.state = "idle"
        self._request: CertRequest | None = None
        self._deadline = 0.0
        self._retry_at = 0.0
        self._confirm_tries = 0
        self.failures = 0
        self.renewals = 0
        self.last_error: str | None = None

    # ------------------------------------------------------------------ threads
    def on_response(self, message: Message) -> None:
        """MQTT handler for ``.../cert/resp``: queue the payload for ``drive``."""
        self._inbox.put(message.payload)

    def status(self) -> dict[str, Any]:
        """A JSON-safe snapshot for the status file."""
        cert = self._current()
        return {
            "state": self.state,
            "serial": None if cert is None else format(cert.serial_number, "x"),
            "not_after": None if cert is None else cert.not_valid_after_utc.isoformat(),
            "renew_at": None
            if cert is None
            else renewal_due(cert, self._policy.fraction).isoformat(),
            "renewals": self.renewals,
            "failures": self.failures,
            "last_error": self.last_error,
        }

    def drive(self) -> None:
        """One step: start a due renewal, handle a response, or time out. Never raises."""
        try:
            self._drive()
        except (OSError, IdentityError) as exc:  # the disk, or a certificate that fails
            with contextlib.suppress(OSError):  # its checks: keep the current pair, retry
                self._store.discard_next()
            self._fail(f"local: {exc}")

    # ------------------------------------------------------------------ the steps
    def _current(self) -> x509.Certificate | None:
        if self._cert is None:
            try:
                self._cert = self._store.current_certificate()
            except IdentityError:
                return None
        return self._cert

    def _drive(self) -> None:
        while True:
            try:
                payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            self._on_payload(payload)
        mono = self._mono()
        if self.state == "idle":
            cert = self._current()
            due = cert is not None and self._now() >= renewal_due(cert, self._policy.fraction)
            if cert is not None and due and mono >= self._retry_at:
                self._start(cert)
        elif mono >= self._deadline:
            if self.state == "requested":
                self._store.discard_next()
                self._fail("timeout: no answer from the CA")
            else:
                self._send_confirm()

    def _start(self, cert: x509.Certificate) -> None:
        key = self._store.create_next_key()
        csr = build_csr(key, self._device_id).decode("ascii")
        self._request = CertRequest("renew", _rid(), cert.serial_number, csr)
        self.state = "requested"
        self._deadline = self._mono() + self._policy.timeout
        try:
            self._publish(self._request.to_bytes())
        except TransportError as exc:
            self._store.discard_next()
            self._fail(f"not sent: {exc}")

    def _on_payload(self, payload: bytes) -> None:
        try:
            response = CertResponse.from_bytes(payload)
        except ContractError as exc:
            log.warning("certificate response refused: %s", str(exc)[:200])
            return
        request = self._request
        if request is None or response.request_id != request.request_id:
            return  # a late answer to an earlier attempt
        if self.state == "requested":
            self._on_issued(response)
        elif self.state == "confirming" and response.outcome == "confirmed":
            log.info("certificate renewal confirmed; %d older revoked", response.revoked)
            self.state = "idle"
            self._request = None

    def _on_issued(self, response: CertResponse) -> None:
        if response.outcome != "issued" or response.cert_pem is None:
            self._store.discard_next()
            self._fail(f"refused: {response.reason}", retry=response.retry)
            return
        cert = self._store.install_next_certificate(
            response.cert_pem.encode("ascii"), self._device_id, self._now()
        )
        try:
            self._switch(
                self._store.next_cert_path, self._store.next_key_path, self._policy.timeout
            )
        except TransportError as exc:
            self._store.discard_next()
            self._fail(f"broker did not accept the new certificate: {exc}")
            return
        self._store.promote_next()
        self._cert = cert
        self.renewals += 1
        self.failures = 0
        self.last_error = None
        self._retry_at = 0.0
        serial = format(cert.serial_number, "x")
        self._event("cert_renewed", f"serial {serial}, valid until {cert.not_valid_after_utc}")
        self._request = CertRequest("confirm", _rid(), cert.serial_number)
        self.state = "confirming"
        self._confirm_tries = 0
        self._send_confirm()

    def _send_confirm(self) -> None:
        request = self._request
        if request is None or self._confirm_tries >= CONFIRM_ATTEMPTS:
            log.warning("certificate renewal: confirmation unanswered; old one left to expire")
            self.state = "idle"
            self._request = None
            return
        self._confirm_tries += 1
        self._deadline = self._mono() + self._policy.timeout
        try:
            self._publish(request.to_bytes())
        except TransportError as exc:
            log.info("certificate confirmation not sent: %s", exc)

    def _fail(self, reason: str, *, retry: bool = True) -> None:
        self.state = "idle"
        self._request = None
        self.failures += 1
        self.last_error = reason[:200]
        p = self._policy
        cap = (
            p.retry_max if not retry else min(p.retry_max, p.retry_min * 2.0 ** (self.failures - 1))
        )
        delay = cap * (0.5 + 0.5 * self._rand())  # at least half: no burst of retries
        self._retry_at = self._mono() + delay
        log.warning("certificate renewal failed (%s); next try in %.0fs", self.last_error, delay)
        self._event("cert_renewal_failed", f"{self.last_error}; retry in {delay:.0f}s")


def _rid() -> str:
    return secrets.token_urlsafe(12)
