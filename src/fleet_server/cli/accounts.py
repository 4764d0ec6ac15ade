"""``fleet-server accounts`` and ``fleet-server tokens``: operator accounts and API tokens.

Over the admin API (``--url``/``--token`` as every operator command; the token is an API
token of a named account, or the bootstrap token of a fresh install)::

    accounts whoami | list | show NAME | disable NAME | enable NAME
    accounts create NAME --role ROLE [--no-password] [--password-stdin]
    accounts set-role NAME ROLE
    accounts passwd [NAME] [--password-stdin]
    tokens create [--account NAME] [--role ROLE] [--expires-days N] [--label TEXT]
    tokens list [--account NAME] | tokens revoke TOKEN_ID

Offline, for a fresh install (directly in the registry of ``--config``, before any account
exists): ``accounts bootstrap --config FILE [NAME]`` creates the first admin account.

Passwords are never arguments (they would land in shell history and ``ps``): they are
prompted for without echo, twice, or read as the first line of stdin with
``--password-stdin``. A new token's secret is printed once, alone on stdout (the notes go
to stderr), so ``tokens create > file`` captures just the secret. Text that came from the
server is shown escaped.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from fleet_server.accounts.roles import Permission, Role
from fleet_server.admin.client import AdminClient
from fleet_server.cli.admin import admin_options, echo_table, emit, emit_json, json_option, shown

__all__ = ["register_account_commands"]

_ROLE = click.Choice([r.value for r in Role])
_ACCOUNT_HEADERS = ("NAME", "ROLE", "DISABLED", "PASSWORD", "LAST LOGIN", "LOCKED UNTIL")
_TOKEN_HEADERS = ("ID", "ACCOUNT", "ROLE", "EXPIRES", "REVOKED", "LAST USED", "LABEL")


def _password_stdin(func: Any) -> Any:
    return click.option(
        "--password-stdin", is_flag=True, help="Read the password from stdin's first line."
    )(func)


def _read_password(from_stdin: bool, prompt: str = "Password", *, confirm: bool = True) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    value: str = click.prompt(prompt, hide_input=True, confirmation_prompt=confirm, err=True)
    return value


def _time(value: Any) -> str | None:
    return None if value is None else str(value)[:19]


def _account_row(a: dict[str, Any]) -> tuple[Any, ...]:
    return (
        shown(a["name"], 64),
        a["role"],
        "yes" if a["disabled"] else "no",
        "yes" if a["has_password"] else "no",
        _time(a["last_login_at"]),
        _time(a["locked_until"]),
    )


def _token_row(t: dict[str, Any]) -> tuple[Any, ...]:
    return (
        t["id"],
        shown(t["account"], 64),
        t["role"],
        _time(t["expires_at"]),
        _time(t["revoked_at"]),
        _time(t["last_used_at"]),
        shown(t["label"], 40),
    )


def _show_account(a: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json(a)
    else:
        echo_table([_account_row(a)], _ACCOUNT_HEADERS)


def register_account_commands(cli: click.Group) -> None:
    """Add the ``accounts`` and ``tokens`` groups to ``cli``."""

    @cli.group("accounts")
    def accounts() -> None:
        """Operator accounts and their roles."""

    @accounts.command("whoami")
    @admin_options
    @json_option
    def whoami(url: str, token: str, as_json: bool) -> None:
        """Show the account and role the token acts as."""
        with AdminClient(url, token) as client:
            me = client.whoami()
        emit(me, as_json, f"{shown(me['account'], 64)} ({me['role']}, via {me['via']})")

    @accounts.command("list")
    @admin_options
    @json_option
    def list_accounts(url: str, token: str, as_json: bool) -> None:
        """List every account (accounts admins only)."""
        with AdminClient(url, token) as client:
            rows = client.accounts()
        if as_json:
            emit_json(rows)
        else:
            echo_table([_account_row(a) for a in rows], _ACCOUNT_HEADERS)

    @accounts.command("show")
    @admin_options
    @json_option
    @click.argument("name")
    def show(url: str, token: str, as_json: bool, name: str) -> None:
        """Show one account."""
        with AdminClient(url, token) as client:
            _show_account(client.account(name), as_json)

    @accounts.command("create")
    @admin_options
    @json_option
    @click.argument("name")
    @click.option("--role", type=_ROLE, required=True)
    @click.option("--no-password", is_flag=True, help="No login: API tokens only (automation).")
    @_password_stdin
    def create(
        url: str,
        token: str,
        as_json: bool,
        name: str,
        role: str,
        no_password: bool,
        password_stdin: bool,
    ) -> None:
        """Create an account (prompts for its password)."""
        password = None if no_password else _read_password(password_stdin)
        with AdminClient(url, token) as client:
            _show_account(client.create_account(name, role, password), as_json)

    for command, doc in (("disable", "Disable"), ("enable", "Enable")):

        @accounts.command(command, help=f"{doc} an account.")
        @admin_options
        @json_option
        @click.argument("name")
        def toggle(url: str, token: str, as_json: bool, name: str, _c: str = command) -> None:
            with AdminClient(url, token) as client:
                _show_account(client.account_command(name, _c), as_json)

    @accounts.command("set-role")
    @admin_options
    @json_option
    @click.argument("name")
    @click.argument("role", type=_ROLE)
    def set_role(url: str, token: str, as_json: bool, name: str, role: str) -> None:
        """Give an account another role."""
        with AdminClient(url, token) as client:
            _show_account(client.account_command(name, "role", {"role": role}), as_json)

    @accounts.command("passwd")
    @admin_options
    @json_option
    @click.argument("name", required=False)
    @_password_stdin
    def passwd(url: str, token: str, as_json: bool, name: str | None, password_stdin: bool) -> None:
        """Set a password: your own (asks for the current one) or, as an accounts admin,
        anyone's. With --password-stdin: the current password on the first line when one is
        asked for, the new one on the next."""
        with AdminClient(url, token) as client:
            me = client.whoami()
            target = name or str(me["account"])
            body: dict[str, Any] = {}
            if str(Permission.ACCOUNTS_ADMIN) not in me["permissions"]:
                body["current_password"] = _read_password(
                    password_stdin, "Current password", confirm=False
                )
            body["password"] = _read_password(password_stdin, "New password")
            _show_account(client.account_command(target, "password", body), as_json)

    @accounts.command("bootstrap")
    @click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        envvar="EDGEFLEET_SERVER_CONFIG",
        required=True,
        help="The server's TOML (its registry is written directly).",
    )
    @click.argument("name", default="admin")
    @_password_stdin
    def bootstrap(config_path: Path, name: str, password_stdin: bool) -> None:
        """Create the first admin account of a fresh install, offline (refused once any
        account exists: then use 'accounts create' over the admin API)."""
        from fleet_server.accounts.bootstrap import create_first_admin
        from fleet_server.config import load_config

        config = load_config(config_path)
        password = _read_password(password_stdin)
        Path(config.registry.state_dir).mkdir(parents=True, exist_ok=True)  # as serve does
        account = create_first_admin(config.registry.url, name, password)
        click.echo(f"created admin account {shown(account.name, 64)}")

    @cli.group("tokens")
    def tokens() -> None:
        """API tokens of accounts (for automation and the CLI)."""

    @tokens.command("create")
    @admin_options
    @json_option
    @click.option("--account", default=None, help="Another account's (accounts admins only).")
    @click.option("--role", type=_ROLE, default=None, help="Default: your own role.")
    @click.option("--expires-days", type=click.IntRange(1, 732), default=90, show_default=True)
    @click.option("--label", default="", help="What the token is for.")
    def tokens_create(
        url: str,
        token: str,
        as_json: bool,
        account: str | None,
        role: str | None,
        expires_days: int,
        label: str,
    ) -> None:
        """Create an API token; its secret is printed once (store it now)."""
        body: dict[str, Any] = {"expires_days": expires_days, "label": label}
        if account is not None:
            body["account"] = account
        if role is not None:
            body["role"] = role
        with AdminClient(url, token) as client:
            created = client.create_token(body)
        if as_json:
            emit_json(created)
            return
        click.echo(
            f"token {created['id']} of {shown(created['account'], 64)} ({created['role']}), "
            f"expires {_time(created['expires_at'])}; shown once:",
            err=True,
        )
        click.echo(created["token"])

    @tokens.command("list")
    @admin_options
    @json_option
    @click.option("--account", default=None, help="Another account's (accounts admins only).")
    def tokens_list(url: str, token: str, as_json: bool, account: str | None) -> None:
        """List API tokens (yours by default), revoked and expired ones included."""
        with AdminClient(url, token) as client:
            rows = client.tokens(account)
        if as_json:
            emit_json(rows)
        else:
            echo_table([_token_row(t) for t in rows], _TOKEN_HEADERS)

    @tokens.command("revoke")
    @admin_options
    @json_option
    @click.argument("token_id")
    def tokens_revoke(url: str, token: str, as_json: bool, token_id: str) -> None:
        """Revoke an API token by its id."""
        with AdminClient(url, token) as client:
            revoked = client.revoke_token(token_id)
        emit(revoked, as_json, f"revoked {revoked['id']}")
