"""The device enrollment listener: ``POST /v1/enroll`` with a provisioning claim, over TLS.

A separate ASGI app on its own port, not a route of the admin API: devices reach it before
they have any identity, so it takes no bearer token; the claim secret in the body is the
credential, and the listener's TLS certificate is issued by the fleet CA, which the device was
provisioned with, so the device sends its claim only to the real fleet. Everything it can do is
bounded by the claim (``fleet_server.pki.claims``): a new identity, never an existing one, up to
the claim's limit, before its expiry, unless it is revoked.

Answers (JSON): 200 ``{"cert": PEM, "ca": PEM}``; 202 ``{"status": "pending"}`` (operator
approval required; ask again later); 400 ``bad_request`` (malformed body); 403
``claim_refused`` with a ``reason`` (``unknown``, ``revoked``, ``expired``, ``full``,
``device_exists``, ``key_mismatch``, ``csr_rejected``); 413 (body over its cap); 503 (the CA
cannot be read). Bodies are capped and parsed strictly; the device id is validated before it
is logged. Owns HTTP and JSON shapes only; decisions are the CA's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edge_agent.errors import ContractError
from edge_agent.wire.ops.certs import ClaimEnrollment
from fleet_server.admin.api import AdminServer
from fleet_server.admin.body import read_body
from fleet_server.errors import (
    AdminBodyTooLargeError,
    AdminInputError,
    ClaimPendingError,
    ClaimRefusedError,
    PkiError,
)
from fleet_server.pki.ca import CertificateAuthority

__all__ = ["EnrollmentServer", "create_enrollment_app"]

log = logging.getLogger(__name__)
MAX_BODY = 16 * 1024


def _utcnow() -> datetime:
    return datetime.now(UTC)


def create_enrollment_app(
    ca: CertificateAuthority,
    *,
    validity: timedelta = timedelta(days=365),
    on_enrolled: Callable[[str, str], None] | None = None,
    now: Callable[[], datetime] = _utcnow,
) -> Starlette:
    """The enrollment ASGI app over ``ca``.

    ``on_enrolled(device_id, claim_name)`` runs after a certificate is issued (e.g. to enroll
    the device in the registry); its failure is logged, the certificate is still returned.
    """
    lock = threading.Lock()  # the CA locks its files too; this keeps one signer per process

    def enroll_sync(req: ClaimEnrollment) -> bytes:
        with lock:
            return ca.enroll_with_claim(
                req.claim, req.device_id, req.csr_pem.encode("ascii"), now=now(), validity=validity
            )

    async def enroll(request: Request) -> Response:
        try:
            body = await read_body(request, MAX_BODY)
            req = ClaimEnrollment.from_bytes(body)
        except AdminBodyTooLargeError as exc:
            return JSONResponse({"error": str(exc)[:200], "code": exc.code}, 413)
        except AdminInputError as exc:
            return JSONResponse({"error": str(exc)[:200], "code": exc.code}, 400)
        except ContractError as exc:
            return JSONResponse({"error": str(exc)[:200], "code": "bad_request"}, 400)
        claim_name = req.claim.split(".", 1)[0]
        try:
            cert = await run_in_threadpool(enroll_sync, req)
        except ClaimPendingError:
            log.info(
                "enrollment of %s under claim %s waits for approval", req.device_id, claim_name
            )
            return JSONResponse({"status": "pending"}, 202)
        except ClaimRefusedError as exc:
            log.info("enrollment of %s refused: %s", req.device_id, exc.reason)
            return JSONResponse(
                {"error": str(exc)[:200], "code": exc.code, "reason": exc.reason}, 403
            )
        except (PkiError, OSError) as exc:
            log.error("enrollment of %s failed at the CA: %s", req.device_id, exc)
            return JSONResponse({"error": "the CA is unavailable", "code": "unavailable"}, 503)
        log.info("enrolled %s under claim %s", req.device_id, claim_name)
        if on_enrolled is not None:
            try:
                on_enrolled(req.device_id, claim_name)
            except Exception:  # the certificate exists: report the hook, answer the device
                log.exception("post-enrollment hook failed for %s", req.device_id)
        return JSONResponse({"cert": cert.decode("ascii"), "ca": ca.cert_pem.decode("ascii")})

    return Starlette(routes=[Route("/v1/enroll", enroll, methods=["POST"])])


class EnrollmentServer(AdminServer):
    """The enrollment app served by uvicorn over TLS in a background thread."""

    thread_name = "enrollment"
    not_started = "the enrollment listener did not start (port in use, TLS files?)"

    def __init__(
        self, app: Starlette, host: str, port: int, *, certfile: Path, keyfile: Path
    ) -> None:
        """Prepare the server; ``port`` 0 picks a free port (see ``port`` after ``start``)."""
        super().__init__(
            app,
            host,
            port,
            ssl_certfile=str(certfile),
            ssl_keyfile=str(keyfile),
            timeout_graceful_shutdown=5,  # a device's idle keep-alive must not hold a stop
        )
