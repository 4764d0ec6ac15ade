"""The CA's certificate renewal service on MQTT: ``.../cert/req`` in, ``.../cert/resp`` out.

Owns the server's half of renewal (the device's half is ``edge_agent.sync.ops.renewal``):

1. ``renew``: the device is asking from its own topic, which the broker lets only the client
   whose certificate CN is that device id publish on (``use_identity_as_username`` and the
   ACL), so the topic's device id *is* the requester's authenticated identity. The service
   checks that the device is allowed (``allowed``, e.g. enrolled and not revoked in the
   registry), that the serial it names is a live certificate of that device at the CA, that
   the CSR's CN is the device id (``check_csr``), and that it did not just ask (a per-device
   minimum interval); then the CA signs it.
2. ``confirm``: the device is connected with the new certificate and says so; the CA revokes
   every other certificate of the device, rewrites the CRL and ``crl_changed`` is called so the
   broker re-reads it (``fleet_server.pki.crl_reload``: a command such as ``systemctl reload
   mosquitto`` or a SIGHUP to a pid file). Revocation therefore never comes before the device
   has shown that its new certificate works.

Every refusal is answered (``refused`` with a stable reason and whether a retry can help) and
counted. Malformed requests are counted and dropped after a ``malformed`` answer. Device text is
never logged unbounded. Runs wherever the CA key lives (``fleet-server ca serve``), on its own
MQTT session with a server identity and a shared subscription, so several CA workers split the
load.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from edge_agent.common.mqtt_types import Message
from edge_agent.common.transport import Transport
from edge_agent.errors import ContractError, EdgefleetError, TransportError
from edge_agent.wire.ops.certs import CertRequest, CertResponse
from edge_agent.wire.topics import Topics
from fleet_server.errors import CsrRejectedError, PkiError, RenewalRefusedError
from fleet_server.pki.ca import CertificateAuthority

__all__ = ["RenewalService"]

log = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class RenewalService:
    """Answers certificate renewal requests with the fleet CA. ``start`` once, then it runs on
    the transport's handler thread."""

    def __init__(
        self,
        ca: CertificateAuthority,
        transport: Transport,
        *,
        prefix: str = "edgefleet",
        group: str = "fleet-ca",
        validity: timedelta = timedelta(days=365),
        min_interval: float = 10.0,
        allowed: Callable[[str], str | None] | None = None,
        crl_changed: Callable[[], None] | None = None,
        now: Callable[[], datetime] = _utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """Prepare the service (``start`` subscribes).

        ``allowed(device_id)`` returns None when the device may renew, else a refusal reason
        (``not_enrolled``, ``revoked``); by default only the CA's own records decide.
        ``crl_changed`` runs after every CRL rewrite, on the MQTT handler thread: make the
        broker reload, through ``crl_reload.CoalescedReload`` so it neither blocks nor storms.
        """
        self._ca = ca
        self._transport = transport
        self._topics = Topics(prefix)
        self._group = group
        self._validity = validity
        self._min_interval = min_interval
        self._allowed = allowed
        self._crl_changed = crl_changed
        self._now = now
        self._mono = monotonic
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {
            "issued": 0,
            "confirmed": 0,
            "revoked": 0,
            "refused": 0,
            "malformed": 0,
            "crl_updates": 0,
        }

    def start(self) -> None:
        """Subscribe to every device's renewal requests (shared over the service's group).

        Raises:
            TransportError: the subscription failed.
        """
        for sub in self._topics.renewal_subscriptions(self._group):
            self._transport.subscribe(sub.filter, self.handle, qos=sub.qos)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def handle(self, message: Message) -> None:
        """One request: answer it on the device's response topic. Never raises."""
        try:
            kind, device_id = self._topics.parse(message.topic)
        except ContractError:
            self._count("malformed")
            return
        if kind != "cert_req" or device_id is None:
            self._count("malformed")
            return
        try:
            request = CertRequest.from_bytes(message.payload)
        except ContractError as exc:
            self._count("malformed")
            log.info("renewal request from %s refused: %s", device_id, str(exc)[:200])
            return
        response = self.answer(device_id, request)
        pub = self._topics.publication("cert_resp", device_id)
        try:
            self._transport.publish(pub.topic, response.to_bytes(), pub.qos, pub.retain)
        except TransportError as exc:  # the device asks again after its timeout
            log.warning("renewal response to %s not sent: %s", device_id, exc)

    def answer(self, device_id: str, request: CertRequest) -> CertResponse:
        """The response to one parsed request from ``device_id`` (the decision, no transport)."""
        rid = request.request_id
        try:
            if self._allowed is not None:
                reason = self._allowed(device_id)
                if reason is not None:
                    raise RenewalRefusedError(f"{device_id}: {reason}", reason=reason)
            if request.action == "renew":
                return self._renew(device_id, request)
            return self._confirm(device_id, request)
        except RenewalRefusedError as exc:
            self._count("refused")
            retry = exc.reason in ("rate_limited", "unavailable")
            log.info("renewal of %s refused: %s", device_id, exc.reason)
            return CertResponse(rid, "refused", reason=exc.reason, retry=retry)
        except CsrRejectedError as exc:
            self._count("refused")
            log.info("renewal CSR of %s rejected: %s", device_id, exc.reason)
            return CertResponse(rid, "refused", reason="csr_rejected", retry=False)
        except (PkiError, OSError) as exc:
            self._count("refused")
            log.error("renewal of %s failed at the CA: %s", device_id, exc)
            return CertResponse(rid, "refused", reason="unavailable", retry=True)

    def _renew(self, device_id: str, request: CertRequest) -> CertResponse:
        assert request.csr_pem is not None  # CertRequest guarantees it for renew
        mono = self._mono()
        with self._lock:
            last = self._last.get(device_id)
            if last is not None and mono - last < self._min_interval:
                raise RenewalRefusedError(f"{device_id} asked too soon", reason="rate_limited")
            self._last[device_id] = mono
        cert, stale = self._ca.renew_device(
            device_id,
            request.serial,
            request.csr_pem.encode("ascii"),
            now=self._now(),
            validity=self._validity,
        )
        self._count("issued")
        if stale:
            self._revoked(len(stale))
        return CertResponse(request.request_id, "issued", cert_pem=cert.decode("ascii"))

    def _confirm(self, device_id: str, request: CertRequest) -> CertResponse:
        older = self._ca.confirm_device(device_id, request.serial, now=self._now())
        self._count("confirmed")
        if older:
            self._revoked(len(older))
        return CertResponse(request.request_id, "confirmed", revoked=len(older))

    def _revoked(self, n: int) -> None:
        self._count("revoked", n)
        if self._crl_changed is None:
            return
        try:
            self._crl_changed()
            self._count("crl_updates")
        except (EdgefleetError, OSError) as exc:
            # The CRL file is already rewritten: the next reload (or restart) enforces it.
            log.error("broker CRL reload failed: %s", exc)
