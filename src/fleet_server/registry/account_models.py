"""The tables of operator accounts, their API tokens and console sessions.

Owns: ``accounts``, ``api_tokens`` and ``sessions`` (on the registry's ``Base``; the Alembic
revision ``0008_accounts`` creates them). Secrets are never stored: an account keeps an argon2id
hash of its password, a token and a session keep the SHA-256 of their random secret. Does not
own any rule about them (``fleet_server.accounts.store`` reads and writes these rows).
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from sqlalchemy import Boolean, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from fleet_server.registry.orm import SHA256_LEN, Base

__all__ = [
    "ACCOUNT_NAME_LEN",
    "CLIENT_LEN",
    "CREDENTIAL_ID_LEN",
    "HASH_LEN",
    "LABEL_LEN",
    "ROLE_LEN",
    "AccountRow",
    "ApiTokenRow",
    "SessionRow",
]

ACCOUNT_NAME_LEN: Final = 64
ROLE_LEN: Final = 32
HASH_LEN: Final = 256
CREDENTIAL_ID_LEN: Final = 32
LABEL_LEN: Final = 200
CLIENT_LEN: Final = 64


class AccountRow(Base):
    """One operator account (``password_hash`` ``None``: no password login, tokens only)."""

    __tablename__ = "accounts"

    name: Mapped[str] = mapped_column(String(ACCOUNT_NAME_LEN), primary_key=True)
    role: Mapped[str] = mapped_column(String(ROLE_LEN))
    password_hash: Mapped[str | None] = mapped_column(String(HASH_LEN), nullable=True)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column()
    changed_at: Mapped[datetime] = mapped_column()
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(nullable=True)
    last_login_at: Mapped[datetime | None] = mapped_column(nullable=True)


class ApiTokenRow(Base):
    """One API token of an account: its public id, role, expiry and the SHA-256 of its secret."""

    __tablename__ = "api_tokens"
    __table_args__ = (Index("ix_api_tokens_account", "account"),)

    id: Mapped[str] = mapped_column(String(CREDENTIAL_ID_LEN), primary_key=True)
    account: Mapped[str] = mapped_column(
        String(ACCOUNT_NAME_LEN), ForeignKey("accounts.name", ondelete="CASCADE")
    )
    role: Mapped[str] = mapped_column(String(ROLE_LEN))
    label: Mapped[str] = mapped_column(String(LABEL_LEN))
    secret_sha256: Mapped[str] = mapped_column(String(SHA256_LEN))
    created_at: Mapped[datetime] = mapped_column()
    expires_at: Mapped[datetime] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(nullable=True)


class SessionRow(Base):
    """One console session: its public id, account, timeouts and the SHA-256 of its secret."""

    __tablename__ = "sessions"
    __table_args__ = (Index("ix_sessions_account", "account"),)

    id: Mapped[str] = mapped_column(String(CREDENTIAL_ID_LEN), primary_key=True)
    account: Mapped[str] = mapped_column(
        String(ACCOUNT_NAME_LEN), ForeignKey("accounts.name", ondelete="CASCADE")
    )
    secret_sha256: Mapped[str] = mapped_column(String(SHA256_LEN))
    client: Mapped[str] = mapped_column(String(CLIENT_LEN))
    created_at: Mapped[datetime] = mapped_column()
    last_seen_at: Mapped[datetime] = mapped_column()
    expires_at: Mapped[datetime] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column(nullable=True)
