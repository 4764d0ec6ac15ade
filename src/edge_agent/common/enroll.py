"""First-boot enrollment with a provisioning claim: the device's side of ``POST /v1/enroll``.

A device provisioned with a claim holds, in its identity directory, the fleet CA certificate
(``fleet-ca.crt``) and ``claim.json``: ``{"url": "https://<ca host>:<port>/v1/enroll",
"claim": "<name>.<secret>"}`` (written 0600 by provisioning, the same for a whole batch). At
first boot, with no certificate yet, ``enroll_with_claim`` generates the device key (it never
leaves the device), sends the CSR with the claim over TLS verified against the fleet CA (so the
claim goes only to the real fleet), and installs the certificate after checking it
(``IdentityStore.install_certificate``). ``pending`` means an operator must approve the device
first: ask again later. The claim file is removed once the device is enrolled.

``enroll_at_first_boot`` (the daemon runs it before it connects) retries an unreachable CA and
a pending approval with backoff. Knows nothing about MQTT.
"""

from __future__ import annotations

import logging
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from edge_agent.common.identity import IdentityStore
from edge_agent.errors import ClaimRefusedError, ContractError, IdentityError, TransportError
from edge_agent.strict_json import loads
from edge_agent.wire.ops.certs import ClaimEnrollment

__all__ = [
    "CLAIM_FILE",
    "ClaimConfig",
    "enroll_at_first_boot",
    "enroll_with_claim",
    "load_claim",
]

log = logging.getLogger(__name__)

CLAIM_FILE = "claim.json"
_MAX_RESPONSE = 64 * 1024


@dataclass(frozen=True)
class ClaimConfig:
    """Where to enroll and with which claim (``claim.json``)."""

    url: str
    claim: str


def load_claim(store: IdentityStore) -> ClaimConfig | None:
    """The provisioned claim, or None when the device has none.

    Raises:
        IdentityError: ``claim.json`` exists but is not ``{"url": "https://...", "claim": ...}``.
    """
    path = store.directory / CLAIM_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IdentityError(f"cannot read {CLAIM_FILE}: {exc}") from exc
    doc = loads(raw, max_bytes=4096, what=CLAIM_FILE, error=IdentityError)
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("url"), str)
        or not isinstance(doc.get("claim"), str)
        or not doc["url"].startswith("https://")
    ):
        raise IdentityError(f'{CLAIM_FILE} must be {{"url": "https://...", "claim": "..."}}')
    return ClaimConfig(doc["url"], doc["claim"])


def enroll_with_claim(
    store: IdentityStore, device_id: str, claim: ClaimConfig, *, now: datetime, timeout: float
) -> str:
    """Enroll this device under ``claim``; return ``enrolled`` or ``pending``.

    Raises:
        ClaimRefusedError: the CA refused (revoked, expired or used-up claim, an existing identity).
        IdentityError: no fleet CA provisioned, a bad device id, or a certificate that fails
            its checks.
        TransportError: the CA could not be reached or answered something unexpected (retry).
    """
    if not store.ca_path.exists():
        raise IdentityError(f"{store.directory}: no fleet CA provisioned")
    if not claim.url.startswith("https://"):
        raise IdentityError("the enrollment URL must be https://")
    csr = store.write_csr(device_id).decode("ascii")
    try:
        body = ClaimEnrollment(claim.claim, device_id, csr).to_bytes()
    except ContractError as exc:
        raise IdentityError(f"{CLAIM_FILE}: {exc}") from exc
    context = ssl.create_default_context(cafile=str(store.ca_path))
    request = urllib.request.Request(  # noqa: S310 - load_claim admits https:// only
        claim.url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as resp:  # noqa: S310
            status, data = resp.status, resp.read(_MAX_RESPONSE)
    except urllib.error.HTTPError as exc:
        status, data = exc.code, exc.read(_MAX_RESPONSE)
    except (OSError, ValueError) as exc:  # URLError, TLS, timeout are OSErrors
        raise TransportError(f"enrollment endpoint unreachable: {exc}") from exc
    try:
        answer = loads(
            data, max_bytes=_MAX_RESPONSE, what="enrollment answer", error=TransportError
        )
    except TransportError:
        answer = {}
    if not isinstance(answer, dict):
        answer = {}
    if status == 202:
        return "pending"
    if status == 403:
        reason = str(answer.get("reason", "unknown"))[:32]
        raise ClaimRefusedError(f"enrollment refused by the CA: {reason}", reason=reason)
    if status != 200 or not isinstance(answer.get("cert"), str):
        raise TransportError(f"enrollment endpoint answered {status}")
    store.install_certificate(answer["cert"].encode("ascii"), device_id, now)
    (store.directory / CLAIM_FILE).unlink(missing_ok=True)
    return "enrolled"


def enroll_at_first_boot(
    store: IdentityStore,
    device_id: str,
    *,
    wait: Callable[[float], bool],
    retry_min: float = 5.0,
    retry_max: float = 300.0,
    timeout: float = 30.0,
) -> bool:
    """Enroll with the provisioned claim unless the device already has a certificate.

    Retries an unreachable CA and a ``pending`` approval with exponential backoff
    (``wait(seconds)`` sleeps and returns True to give up, e.g. ``stop_event.wait``). Returns
    True when the device has a certificate (now or already), False when it has no claim or
    ``wait`` gave up.

    Raises:
        ClaimRefusedError: the CA refused the claim for good (revoked, expired, used up, taken).
        IdentityError: the claim file or the issued certificate is unusable.
    """
    if store.cert_path.exists():
        return True
    claim = load_claim(store)
    if claim is None:
        return False
    attempt = 0
    while True:
        try:
            outcome = enroll_with_claim(
                store, device_id, claim, now=datetime.now(UTC), timeout=timeout
            )
        except TransportError as exc:
            log.warning("first-boot enrollment: %s", exc)
        else:
            if outcome == "enrolled":
                log.info("first-boot enrollment: enrolled as %s", device_id)
                return True
            log.info("first-boot enrollment: waiting for an operator to approve %s", device_id)
        delay = min(retry_max, retry_min * 2.0 ** min(attempt, 32))
        attempt += 1
        if wait(delay):
            return False
