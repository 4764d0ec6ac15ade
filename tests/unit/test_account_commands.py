"""``fleet-server accounts`` / ``tokens`` in process against a fake admin client: passwords come
from a no-echo prompt (twice) or stdin, never argv, and never reach the output; the token's
secret is alone on stdout; account text from the server is shown escaped."""

from __future__ import annotations

from typing import Any

import click
import pytest
from click.testing import CliRunner

from fleet_server.cli import accounts as cli_accounts

AUTH = ("--url", "http://x", "--token", "t" * 20)


class Fake:
    """Stands in for ``AdminClient``; records every call."""

    calls: list[tuple[str, Any]]
    me: dict[str, Any]

    def __init__(self, url: str, token: str) -> None:
        pass

    def __enter__(self) -> Fake:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    @staticmethod
    def _account(name: str) -> dict[str, Any]:
        return {
            "name": name,
            "role": "viewer",
            "disabled": False,
            "has_password": True,
            "last_login_at": None,
            "locked_until": None,
        }

    def create_account(self, name: str, role: str, password: str | None) -> dict[str, Any]:
        Fake.calls.append(("create", (name, role, password)))
        return self._account(name)

    def whoami(self) -> dict[str, Any]:
        return Fake.me

    def account_command(self, name: str, command: str, body: Any = None) -> dict[str, Any]:
        Fake.calls.append((command, (name, body)))
        return self._account(name)

    def create_token(self, body: dict[str, Any]) -> dict[str, Any]:
        Fake.calls.append(("token", body))
        return {
            "id": "0123456789abcdef",
            "account": "bob\x1b[31m",
            "role": "viewer",
            "expires_at": "2026-09-01T00:00:00+00:00",
            "token": "eft_0123456789abcdef_" + "s" * 43,
        }


@pytest.fixture
def main(monkeypatch: pytest.MonkeyPatch) -> click.Group:
    Fake.calls = []
    Fake.me = {"account": "bob", "role": "viewer", "via": "token", "permissions": ["self"]}
    monkeypatch.setattr(cli_accounts, "AdminClient", Fake)

    @click.group()
    def group() -> None:
        pass

    cli_accounts.register_account_commands(group)
    return group


def test_create_prompts_twice_without_echo(main: click.Group) -> None:
    pw = "a good long password"
    r = CliRunner().invoke(
        main, ["accounts", "create", "bob", "--role", "viewer", *AUTH], input=f"{pw}\n{pw}\n"
    )
    assert r.exit_code == 0, r.output
    assert Fake.calls == [("create", ("bob", "viewer", pw))]
    assert pw not in r.output
    mismatch = CliRunner().invoke(
        main, ["accounts", "create", "bob", "--role", "viewer", *AUTH], input=f"{pw}\nother\n"
    )
    assert mismatch.exit_code != 0
    assert len(Fake.calls) == 1


def test_password_is_never_an_argument(main: click.Group) -> None:
    r = CliRunner().invoke(
        main, ["accounts", "create", "bob", "--role", "viewer", "--password", "x" * 12, *AUTH]
    )
    assert r.exit_code == 2  # no such option
    assert Fake.calls == []


def test_passwd_asks_for_the_current_one_unless_accounts_admin(main: click.Group) -> None:
    args = ["accounts", "passwd", "--password-stdin", *AUTH]
    r = CliRunner().invoke(main, args, input="old password!!\nnew password!!\n")
    assert r.exit_code == 0, r.output
    assert Fake.calls[-1] == (
        "password",
        ("bob", {"current_password": "old password!!", "password": "new password!!"}),
    )
    Fake.me = {**Fake.me, "permissions": ["accounts.admin", "self"]}
    r = CliRunner().invoke(main, [*args, "carol"], input="new password!!\n")
    assert r.exit_code == 0, r.output
    assert Fake.calls[-1] == ("password", ("carol", {"password": "new password!!"}))


def test_token_secret_alone_on_stdout_and_text_escaped(main: click.Group) -> None:
    r = CliRunner().invoke(main, ["tokens", "create", "--label", "ci", *AUTH])
    assert r.exit_code == 0, r.output
    assert r.stdout == "eft_0123456789abcdef_" + "s" * 43 + "\n"
    assert "shown once" in r.stderr
    assert "\x1b" not in r.stderr
    assert "bob\\x1b[31m" in r.stderr
    assert Fake.calls == [("token", {"expires_days": 90, "label": "ci"})]
