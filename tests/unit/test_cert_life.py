"""Certificate life without a broker: the CA's renewal and claim decisions, the renewal
service's answers, the device's renewal state machine on fakes, and the CLI around claims.

The real-broker stories (renewal across expiry under traffic, kill -9 at each step, 100
devices enrolling with one claim) are in ``tests/integration/test_cert_renewal.py`` and
``tests/integration/test_claims.py``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from clock import FakeClock
from edge_agent.common.identity import IdentityStore, build_csr, generate_device_key, renewal_due
from edge_agent.common.mqtt_types import Message
from edge_agent.errors import IdentityError, TransportError
from edge_agent.sync.ops.renewal import CertRenewer, RenewalPolicy
from edge_agent.wire.ops.certs import CertRequest, CertResponse
from fleet_server.cli import main as cli
from fleet_server.errors import (
    ClaimPendingError,
    ClaimRefusedError,
    CsrRejectedError,
    PkiError,
    RenewalRefusedError,
)
from fleet_server.pki.ca import CertificateAuthority
from fleet_server.pki.claims import admit, new_claim
from fleet_server.pki.crl_reload import CoalescedReload
from fleet_server.pki.renewal import RenewalService
from support import wait_until

NOW = datetime(2026, 6, 1, tzinfo=UTC)
DAY = timedelta(days=1)


def _ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", now=NOW)


def _enrolled(ca: CertificateAuthority, root: Path, device_id: str) -> IdentityStore:
    store = IdentityStore(root / device_id)
    store.provision_ca(ca.cert_pem)
    cert = ca.sign_csr(store.write_csr(device_id), device_id, now=NOW, validity=30 * DAY)
    store.install_certificate(cert, device_id, NOW)
    return store


def _csr(device_id: str) -> bytes:
    return build_csr(generate_device_key(), device_id)


def _serials(ca: CertificateAuthority, name: str) -> list[tuple[int, bool]]:
    return [(c.serial, c.revoked_at is not None) for c in ca.issued() if c.name == name]


def _crl_serials(ca: CertificateAuthority) -> set[int]:
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    return {r.serial_number for r in crl}


# ----------------------------------------------------------------------------- the CA
def test_renew_then_confirm_revokes_the_old_certificate_only_at_confirm(tmp_path: Path) -> None:
    ca = _ca(tmp_path)
    store = _enrolled(ca, tmp_path, "dev-1")
    old = store.current_certificate().serial_number
    pem, stale = ca.renew_device("dev-1", old, _csr("dev-1"), now=NOW + DAY, validity=30 * DAY)
    new = x509.load_pem_x509_certificate(pem).serial_number
    assert stale == []
    assert _serials(ca, "dev-1") == [(old, False), (new, False)]  # both live until confirmed
    assert ca.confirm_device("dev-1", new, now=NOW + DAY) == [old]
    assert _serials(ca, "dev-1") == [(old, True), (new, False)]
    assert _crl_serials(ca) == {old}
    assert ca.confirm_device("dev-1", new, now=NOW + DAY) == []  # idempotent
    assert ca.device_status("dev-1", now=NOW + DAY) == "enrolled"
    # Once the revoked certificate has expired, the CRL no longer needs to list it.
    ca.write_crl(now=NOW + 31 * DAY)
    assert _crl_serials(ca) == set()


def test_an_unconfirmed_renewal_is_revoked_by_the_next_one(tmp_path: Path) -> None:
    ca = _ca(tmp_path)
    store = _enrolled(ca, tmp_path, "dev-1")
    old = store.current_certificate().serial_number
    first, _ = ca.renew_device("dev-1", old, _csr("dev-1"), now=NOW)
    lost = x509.load_pem_x509_certificate(first).serial_number
    _, stale = ca.renew_device("dev-1", old, _csr("dev-1"), now=NOW)
    assert stale == [lost]
    assert lost in _crl_serials(ca)
    assert sum(1 for _s, revoked in _serials(ca, "dev-1") if not revoked) == 2  # current + one


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unknown serial", "unknown_certificate"),
        ("another device's serial", "unknown_certificate"),
        ("revoked serial", "revoked"),
        ("expired serial", "unknown_certificate"),
    ],
)
def test_renewal_refusals(tmp_path: Path, case: str, reason: str) -> None:
    ca = _ca(tmp_path)
    mine = _enrolled(ca, tmp_path, "dev-1").current_certificate().serial_number
    theirs = _enrolled(ca, tmp_path, "dev-2").current_certificate().serial_number
    serial, now = {
        "unknown serial": (12345, NOW),
        "another device's serial": (theirs, NOW),
        "revoked serial": (mine, NOW),
        "expired serial": (mine, NOW + 31 * DAY),
    }[case]
    if case == "revoked serial":
        ca.revoke("dev-1", now=NOW)
    with pytest.raises(RenewalRefusedError) as refused:
        ca.renew_device("dev-1", serial, _csr("dev-1"), now=now)
    assert refused.value.reason == reason
    with pytest.raises(RenewalRefusedError):
        ca.confirm_device("dev-1", serial, now=now)
    assert [c for c in ca.issued() if c.name == "dev-1"][-1].serial == mine  # nothing issued


def test_a_renewal_csr_for_another_identity_is_rejected(tmp_path: Path) -> None:
    ca = _ca(tmp_path)
    serial = _enrolled(ca, tmp_path, "dev-1").current_certificate().serial_number
    _enrolled(ca, tmp_path, "dev-2")
    with pytest.raises(CsrRejectedError) as rejected:
        ca.renew_device("dev-1", serial, _csr("dev-2"), now=NOW)
    assert rejected.value.reason == "cn_mismatch"


# ------------------------------------------------------------------ the renewal service
class _Transport:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def subscribe(self, *_a: object, **_k: object) -> None:
        pass

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.sent.append((topic, payload))


def _ask(service: RenewalService, topic: str, payload: bytes) -> CertResponse | None:
    transport: _Transport = service._transport  # type: ignore[assignment]
    before = len(transport.sent)
    service.handle(Message(topic, payload, 1, False))
    if len(transport.sent) == before:
        return None
    out_topic, body = transport.sent[-1]
    assert out_topic == topic.replace("cert/req", "cert/resp")
    return CertResponse.from_bytes(body)


def test_the_service_answers_refuses_and_rate_limits(tmp_path: Path) -> None:
    ca = _ca(tmp_path)
    serial = _enrolled(ca, tmp_path, "dev-1").current_certificate().serial_number
    clock = FakeClock()
    reloads: list[int] = []
    service = RenewalService(
        ca,
        _Transport(),  # type: ignore[arg-type]
        min_interval=10.0,
        crl_changed=lambda: reloads.append(1),
        now=lambda: NOW,
        monotonic=clock,
    )
    topic = "edgefleet/devices/dev-1/cert/req"
    renew = CertRequest("renew", "r" * 16, serial, _csr("dev-1").decode())
    issued = _ask(service, topic, renew.to_bytes())
    assert issued is not None
    assert issued.outcome == "issued"
    limited = _ask(service, topic, CertRequest("renew", "s" * 16, serial, renew.csr_pem).to_bytes())
    assert limited is not None
    assert (limited.outcome, limited.reason, limited.retry) == ("refused", "rate_limited", True)
    new = x509.load_pem_x509_certificate((issued.cert_pem or "").encode()).serial_number
    confirmed = _ask(service, topic, CertRequest("confirm", "t" * 16, new).to_bytes())
    assert confirmed is not None
    assert (confirmed.outcome, confirmed.revoked) == ("confirmed", 1)
    assert reloads == [1]
    # The CSR of another device, from dev-1's topic: refused for good.
    clock.advance(11)
    other = CertRequest("renew", "u" * 16, new, _csr("dev-2").decode())
    refused = _ask(service, topic, other.to_bytes())
    assert refused is not None
    assert (refused.reason, refused.retry) == ("csr_rejected", False)
    # Garbage and foreign topics get nothing and are counted.
    assert _ask(service, topic, b"{not json") is None
    assert _ask(service, "edgefleet/devices/dev-1/telemetry", renew.to_bytes()) is None
    assert _ask(service, "elsewhere/devices/dev-1/cert/req", renew.to_bytes()) is None
    assert service.counts["malformed"] == 3
    assert service.counts["issued"] == 1


def test_the_registry_check_refuses_a_revoked_device(tmp_path: Path) -> None:
    ca = _ca(tmp_path)
    serial = _enrolled(ca, tmp_path, "dev-1").current_certificate().serial_number
    service = RenewalService(ca, _Transport(), allowed=lambda _d: "revoked")  # type: ignore[arg-type]
    answer = service.answer("dev-1", CertRequest("renew", "r" * 16, serial, _csr("dev-1").decode()))
    assert (answer.outcome, answer.reason) == ("refused", "revoked")
    assert len([c for c in ca.issued() if c.name == "dev-1"]) == 1


# --------------------------------------------------------------------------- claims
def test_claim_decisions() -> None:
    secret, record = new_claim("b", now=NOW, ttl=DAY, limit=2, require_approval=False)
    ok = admit(record, secret, "d-1", "k1", known_device=False, now=NOW)
    assert ok.enrolled == ("d-1",)
    ok = admit(ok, secret, "d-2", "k2", known_device=False, now=NOW)
    cases = [
        (ok, secret, "d-3", False, NOW, "full"),
        (record, secret + "x", "d-1", False, NOW, "unknown"),
        (None, secret, "d-1", False, NOW, "unknown"),
        (record, secret, "d-1", True, NOW, "device_exists"),
        (record, secret, "d-1", False, NOW + 2 * DAY, "expired"),
    ]
    for rec, sec, dev, known, now, reason in cases:
        with pytest.raises(ClaimRefusedError) as refused:
            admit(rec, sec, dev, "k", known_device=known, now=now)
        assert refused.value.reason == reason, (dev, reason)


def test_claim_approval_is_keyed_by_the_devices_key() -> None:
    secret, record = new_claim("g", now=NOW, ttl=DAY, limit=5, require_approval=True)
    with pytest.raises(ClaimPendingError) as pending:
        admit(record, secret, "d-1", "key-a", known_device=False, now=NOW)
    waiting = pending.value.record
    with pytest.raises(ClaimRefusedError) as refused:
        admit(waiting, secret, "d-1", "key-b", known_device=False, now=NOW)  # type: ignore[arg-type]
    assert refused.value.reason == "key_mismatch"


@pytest.mark.parametrize(
    ("name", "limit", "ttl"),
    [("Bad", 1, DAY), ("-x", 1, DAY), ("ok", 0, DAY), ("ok", 10**6, DAY), ("ok", 1, -DAY)],
)
def test_bad_claims_are_refused(name: str, limit: int, ttl: timedelta) -> None:
    with pytest.raises(PkiError):
        new_claim(name, now=NOW, ttl=ttl, limit=limit, require_approval=False)


def test_claims_cli(tmp_path: Path) -> None:
    ca = _ca(tmp_path)
    runner = CliRunner()
    base = ["--ca-dir", str(ca.directory)]
    made = runner.invoke(cli.cli, ["claims", "create", *base, "line-1", "--limit", "3"])
    assert made.exit_code == 0, made.output
    secret = made.output.strip()
    assert secret.startswith("line-1.")
    assert secret not in ca.directory.joinpath("state.json").read_text()  # stored hashed
    runner.invoke(cli.cli, ["claims", "create", *base, "gated", "--limit", "3", "--approval"])
    assert [c.require_approval for c in ca.claims()] == [False, True]
    listed = runner.invoke(cli.cli, ["claims", "list", *base])
    assert "line-1\tactive\t0/3" in listed.output
    refused = runner.invoke(cli.cli, ["claims", "approve", *base, "gated"])
    assert refused.exit_code != 0  # neither devices nor --all
    assert runner.invoke(cli.cli, ["claims", "revoke", *base, "line-1"]).exit_code == 0
    assert "line-1\trevoked" in runner.invoke(cli.cli, ["claims", "list", *base]).output
    unknown = runner.invoke(cli.cli, ["claims", "revoke", *base, "nope"])
    assert unknown.exit_code != 0


# ------------------------------------------------------------------ the device's renewer
class _Fakes:
    def __init__(self, ca: CertificateAuthority, store: IdentityStore) -> None:
        self.ca, self.store = ca, store
        self.clock = FakeClock()
        self.wall = NOW + 20 * DAY  # past 2/3 of the 30-day certificate
        self.sent: list[CertRequest] = []
        self.events: list[tuple[str, str]] = []
        self.switch_ok = True
        self.switched: list[Path] = []

    def renewer(self) -> CertRenewer:
        def switch(cert: Path, _key: Path, _timeout: float) -> None:
            if not self.switch_ok:
                raise TransportError("refused")
            self.switched.append(cert)

        return CertRenewer(
            self.store,
            "dev-1",
            publish=lambda b: self.sent.append(CertRequest.from_bytes(b)),
            switch=switch,
            event=lambda k, d: self.events.append((k, d)),
            policy=RenewalPolicy(fraction=2 / 3, timeout=5.0, retry_min=10.0, retry_max=100.0),
            now=lambda: self.wall,
            monotonic=self.clock,
            rand=lambda: 1.0,
        )

    def answer(self, renewer: CertRenewer, response: CertResponse) -> None:
        renewer.on_response(Message("t", response.to_bytes(), 1, False))
        renewer.drive()


def test_the_renewer_renews_switches_promotes_and_confirms(tmp_path: Path) -> None:
    ca = _ca(tmp_path)
    store = _enrolled(ca, tmp_path, "dev-1")
    old = store.current_certificate()
    f = _Fakes(ca, store)
    renewer = f.renewer()
    f.wall = NOW + 10 * DAY  # not due yet
    renewer.drive()
    assert f.sent == []
    f.wall = renewal_due(old, 2 / 3)
    renewer.drive()
    (req,) = f.sent
    assert (req.action, req.serial) == ("renew", old.serial_number)
    assert store.next_key_path.exists()
    pem, _ = ca.renew_device("dev-1", req.serial, (req.csr_pem or "").encode(), now=f.wall)
    f.answer(renewer, CertResponse(req.request_id, "issued", cert_pem=pem.decode()))
    assert f.switched == [store.next_cert_path]
    new = store.current_certificate()
    assert new.serial_number != old.serial_number
    assert not store.next_key_path.exists()
    assert f.events[0][0] == "cert_renewed"
    confirm = f.sent[-1]
    assert (confirm.action, confirm.serial, renewer.state) == (
        "confirm",
        new.serial_number,
        "confirming",
    )
    f.answer(renewer, CertResponse(confirm.request_id, "confirmed", revoked=1))
    assert renewer.state == "idle"
    assert renewer.status()["renewals"] == 1


@pytest.mark.parametrize("fault", ["timeout", "refused", "switch", "foreign_cert", "late"])
def test_a_failed_renewal_keeps_the_old_pair_and_backs_off(tmp_path: Path, fault: str) -> None:
    ca = _ca(tmp_path)
    store = _enrolled(ca, tmp_path, "dev-1")
    before = (store.key_path.read_bytes(), store.cert_path.read_bytes())
    f = _Fakes(ca, store)
    renewer = f.renewer()
    renewer.drive()
    (req,) = f.sent
    if fault == "timeout":
        f.clock.advance(6)
        renewer.drive()
    elif fault == "refused":
        f.answer(renewer, CertResponse(req.request_id, "refused", reason="revoked", retry=False))
    elif fault == "late":  # an answer to another request does not count; then the timeout
        pem, _ = ca.renew_device("dev-1", req.serial, (req.csr_pem or "").encode(), now=f.wall)
        f.answer(renewer, CertResponse("x" * 16, "issued", cert_pem=pem.decode()))
        assert renewer.state == "requested"
        f.clock.advance(6)
        renewer.drive()
    else:
        if fault == "foreign_cert":  # signed by another CA: must not be installed
            ca = CertificateAuthority.init(tmp_path / "other", now=NOW)
            ca.sign_csr(_csr("dev-1"), "dev-1", now=NOW)
        else:
            f.switch_ok = False
        pem = ca.sign_csr((req.csr_pem or "").encode(), "dev-1", now=f.wall)
        f.answer(renewer, CertResponse(req.request_id, "issued", cert_pem=pem.decode()))
    assert (store.key_path.read_bytes(), store.cert_path.read_bytes()) == before
    assert not store.next_key_path.exists()
    assert not store.next_cert_path.exists()
    assert renewer.state == "idle"
    assert renewer.failures == 1
    assert f.events[-1][0] == "cert_renewal_failed"
    # Backoff: nothing is sent again before it has passed (retry_min 10 s; 100 s if refused).
    wait = 100.0 if fault == "refused" else 10.0
    f.clock.advance(wait - 1)
    renewer.drive()
    assert len(f.sent) == 1
    f.clock.advance(1)
    renewer.drive()
    assert len(f.sent) == 2


def test_renewal_due_fraction_bounds() -> None:
    with pytest.raises(IdentityError):
        renewal_due(None, 1.0)  # type: ignore[arg-type]


# ------------------------------------------------------------------ CRL reload coalescing
def test_a_burst_of_revocations_costs_one_reload_and_failures_are_counted() -> None:
    calls: list[int] = []
    reload = CoalescedReload(lambda: calls.append(1), interval=0.2)
    try:
        for _ in range(50):
            reload()
        wait_until(lambda: reload.runs == 1, 5, what="one reload for the burst")
        reload()
        wait_until(lambda: reload.runs == 2, 5, what="a later request reloads again")
    finally:
        reload.close()
    assert calls == [1, 1]

    def broken() -> None:
        raise PkiError("no broker")

    failing = CoalescedReload(broken, interval=0.0)
    failing()
    wait_until(lambda: failing.failures == 1, 5, what="the failure counted")
    failing.close()
    assert failing.runs == 0
