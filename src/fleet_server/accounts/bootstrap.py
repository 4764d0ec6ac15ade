"""The first admin account of a fresh install, written directly into the registry.

Owns: ``create_first_admin``, what ``fleet-server accounts bootstrap`` runs (no server needed:
it opens the registry, migrates it to the current schema and creates the account). Refused
once any account exists: from then on accounts are made through the admin API, where they are
audited. Does not own the account rules (``fleet_server.accounts.store``).
"""

from __future__ import annotations

from datetime import UTC, datetime

from fleet_server.accounts.roles import Role
from fleet_server.accounts.store import Accounts
from fleet_server.accounts.values import Account
from fleet_server.errors import AccountExistsError
from fleet_server.registry.store import Registry

__all__ = ["create_first_admin"]


def create_first_admin(registry_url: str, name: str, password: str) -> Account:
    """Create the admin account ``name`` with ``password`` in the registry at ``registry_url``.

    Raises:
        AccountExistsError: the registry already has an account.
        AccountError: a bad name.
        PasswordPolicyError: the password breaks the policy.
        RegistryError: the database cannot be opened or migrated.
    """
    with Registry.open(registry_url) as registry:
        registry.upgrade()
        accounts = Accounts(registry, lambda: datetime.now(UTC))
        if accounts.list():
            raise AccountExistsError(
                "accounts exist already: create more with 'fleet-server accounts create'"
            )
        return accounts.create(name, Role.ADMIN, password)
