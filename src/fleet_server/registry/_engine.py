"""The registry's engine, database-error mapping and schema migrations.

Owns: parsing the database URL, the SQLite connection pragmas and ``BEGIN IMMEDIATE`` for write
transactions, turning SQLAlchemy errors into ``RegistryError``s (``guard``), and running the
Alembic revisions in ``migrations/`` on a connection. Does not own: sessions and transactions
(``store.Registry``), nor the schema (``tables``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from fleet_server.errors import RegistryError, RegistryUnavailableError

__all__ = [
    "MIGRATIONS",
    "WRITE_OPTION",
    "current_revision",
    "guard",
    "head_revision",
    "migrate",
    "open_engine",
]

MIGRATIONS: Final = Path(__file__).resolve().parent / "migrations"
WRITE_OPTION: Final = "edgefleet_write"  # execution option: this transaction will write
_MIGRATION_LOCK: Final = 0x65646766  # pg advisory lock key ("edgf") serialising upgrades


def open_engine(url: str | URL, *, echo: bool = False) -> Engine:
    """Create the engine for ``url`` (``sqlite:///path.db`` or ``postgresql+psycopg://...``).

    Raises:
        RegistryError: the URL cannot be parsed or names an unsupported database.
        RegistryUnavailableError: the database driver is missing.
    """
    try:
        parsed = make_url(url)
    except SQLAlchemyError as exc:
        raise RegistryError(f"invalid database URL: {exc}") from exc
    backend = parsed.get_backend_name()
    if backend not in {"sqlite", "postgresql"}:
        raise RegistryError(f"unsupported database {backend!r}: use sqlite or postgresql")
    if backend == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    try:
        if backend == "sqlite":
            engine = create_engine(parsed, echo=echo, connect_args={"timeout": 30.0})
            _install_sqlite_hooks(engine)
        else:
            engine = create_engine(parsed, echo=echo, pool_pre_ping=True)
    except (SQLAlchemyError, ImportError) as exc:
        raise RegistryUnavailableError(f"cannot create the database engine: {exc}") from exc
    return engine


def migrate(
    conn: Connection, dialect: str, run: Callable[[Config, str], None], revision: str
) -> None:
    """Run an Alembic command (``upgrade``/``downgrade``) to ``revision`` on ``conn``.

    ``conn`` must be in a write transaction; on PostgreSQL an advisory transaction lock makes
    workers that start at once migrate one after the other (the later ones then find head).

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the migration failed (the caller maps it).
    """
    cfg = _config()
    if dialect == "postgresql":
        # Several workers may start at once: one migrates, the others then find head.
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
    cfg.attributes["connection"] = conn
    run(cfg, revision)


def head_revision() -> str:
    """The newest schema revision this code ships."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None  # the package ships at least one revision
    return head


def current_revision(conn: Connection) -> str | None:
    """The schema's Alembic revision on ``conn`` (None for an empty database).

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the database cannot be read (the caller maps it).
    """
    return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def guard(doing: str, conflict: type[RegistryError] = RegistryUnavailableError) -> Iterator[None]:
    """Turn SQLAlchemy errors into ours; ``conflict`` is raised for a constraint violation.

    Raises:
        RegistryError: ``conflict`` for an ``IntegrityError`` (``doing`` names the operation).
        RegistryUnavailableError: any other SQLAlchemy error.
    """
    try:
        yield
    except IntegrityError as exc:
        raise conflict(f"conflict while {doing}: {exc.orig}") from exc
    except OperationalError as exc:
        raise RegistryUnavailableError(f"database unavailable while {doing}: {exc}") from exc
    except SQLAlchemyError as exc:
        raise RegistryUnavailableError(f"database error while {doing}: {exc}") from exc


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def _install_sqlite_hooks(engine: Engine) -> None:
    """WAL, foreign keys, FULL sync; and ``BEGIN IMMEDIATE`` for write transactions.

    pysqlite's own implicit BEGIN is switched off so SQLAlchemy's ``begin`` event decides the
    mode: a deferred transaction that later writes can fail with SQLITE_BUSY instead of waiting.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
