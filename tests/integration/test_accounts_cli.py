"""Accounts against real processes: ``fleet-server accounts bootstrap`` on a fresh registry,
then ``fleet-server serve`` (real Mosquitto) and the ``fleet-server`` CLI as subprocesses: the
bootstrap token creates a named operator and an API token for it; the CLI then works as that
account (its writes audited under its name), is refused what its role does not allow, changes
its own password, and stops working when the token is revoked or the account disabled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundles import DigitsBundles
from fleet import stop_process, wait_until
from mosquitto import MOSQUITTO, FleetBroker, fleet_broker
from served import TOKEN, server_config

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

FLEET = str(Path(sys.executable).parent / "fleet-server")
ROOT_PW = "root password for the fleet"
ALICE_PW = "alice's first password"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[FleetBroker]:
    with fleet_broker(tmp_path / "mqtt", ("cam-1",)) as b:
        yield b


def test_named_operator_account_through_the_cli(
    broker: FleetBroker, digits_bundles: DigitsBundles, tmp_path: Path
) -> None:
    config, port = server_config(tmp_path, broker, digits_bundles.keys.path)
    url = f"http://127.0.0.1:{port}"

    def run(
        *args: str, token: str = TOKEN, stdin: str = "", code: int | None = 0
    ) -> subprocess.CompletedProcess[str]:
        env = {"EDGEFLEET_ADMIN_URL": url, "EDGEFLEET_ADMIN_TOKEN": token}
        res = subprocess.run(
            [FLEET, *args],
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if code is not None:
            assert res.returncode == code, res.stdout + res.stderr
        return res

    boot = ("accounts", "bootstrap", "--config", str(config), "root", "--password-stdin")
    run(*boot, stdin=ROOT_PW + "\n")
    again = run(*boot, stdin=ROOT_PW + "\n", code=3)
    assert again.stderr.startswith("error[account_exists]")

    log = (tmp_path / "server.log").open("ab")

    def serve(**env: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [FLEET, "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
        wait_until(
            lambda: run("status", code=None).returncode != 7 or proc.poll() is not None,
            timeout=60,
            what="fleet-server up",
        )
        assert proc.poll() is None
        return proc

    server = serve()
    try:
        assert "admin (admin, via bootstrap-token)" in run("accounts", "whoami").stdout
        create = ("accounts", "create", "alice", "--role", "operator", "--password-stdin")
        run(*create, stdin=ALICE_PW + "\n")
        made = run("tokens", "create", "--account", "alice", "--label", "ci", "--expires-days", "7")
        secret = made.stdout.strip()
        assert secret.startswith("eft_")
        assert len(made.stdout.splitlines()) == 1  # only the secret on stdout
        assert "shown once" in made.stderr

        # The CLI as alice.
        me = json.loads(run("accounts", "whoami", "--json", token=secret).stdout)
        assert (me["account"], me["role"], me["via"]) == ("alice", "operator", "token")
        run("devices", "register", "cam-1", "--group", "lobby", token=secret)
        refused = run("models", "publish", str(digits_bundles.path(1)), token=secret, code=3)
        assert "403: role operator may not POST /v1/models" in refused.stderr
        assert (
            "403: role operator may not GET /v1/accounts"
            in run("accounts", "list", token=secret, code=3).stderr
        )
        entries = json.loads(
            run("audit", "list", "--json", "--actor", "token:alice", token=secret).stdout
        )
        actions = {(e["action"], e["phase"], e["status"]) for e in entries}
        assert ("POST /v1/devices", "outcome", 201) in actions
        assert ("POST /v1/models", "outcome", 403) in actions
        mine = json.loads(run("tokens", "list", "--json", token=secret).stdout)
        assert [t["label"] for t in mine] == ["ci"]

        # Alice changes her own password (current one first, then the new one).
        new_pw = "alice's second password"
        run("accounts", "passwd", "--password-stdin", token=secret, stdin=f"{ALICE_PW}\n{new_pw}\n")
        wrong = run(
            "accounts",
            "passwd",
            "--password-stdin",
            token=secret,
            stdin=f"nope\n{new_pw}\n",
            code=3,
        )
        assert "the current password is wrong" in wrong.stderr
        everything = run("audit", "export", "--format", "json").stdout
        for pw in (ROOT_PW, ALICE_PW, new_pw, secret):
            assert pw not in everything

        # The account's admin takes it away: disabled, then the token revoked.
        run("accounts", "disable", "alice")
        run("accounts", "whoami", token=secret, code=6)
        run("accounts", "enable", "alice")
        run("accounts", "whoami", token=secret)
        run("tokens", "revoke", mine[0]["id"])
        gone = run("accounts", "whoami", token=secret, code=6)
        assert gone.stderr.startswith("error[admin_unauthorized]")

        # Named admins exist: the bootstrap token is switched off (no token file needed).
        root = run("tokens", "create", "--account", "root", "--label", "ops").stdout.strip()
        stop_process(server)
        (tmp_path / "token").unlink()
        server = serve(EDGEFLEET_SERVER__API__BOOTSTRAP_TOKEN="false")
        run("status", code=6)  # the former bootstrap token
        me = json.loads(run("accounts", "whoami", "--json", token=root).stdout)
        assert (me["account"], me["role"], me["via"]) == ("root", "admin", "token")
    finally:
        stop_process(server)
        log.close()
