"""Alembic environment for the fleet registry (run by ``Registry.upgrade``, no alembic.ini).

The caller puts an open SQLAlchemy ``Connection`` in ``config.attributes["connection"]``; when
absent (the ``alembic`` command line with ``-x url=...`` or ``sqlalchemy.url``), an engine is made
from the URL. ``render_as_batch`` lets later revisions alter tables on SQLite.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from fleet_server.registry.schema import METADATA, include_name

config = context.config
target_metadata = METADATA


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
        include_name=include_name,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit SQL to stdout instead of running it (``alembic upgrade --sql``)."""
    context.configure(
        url=context.get_x_argument(as_dictionary=True).get("url")
        or config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
        include_name=include_name,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run against the caller's connection, or one made from the configured URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise RuntimeError("no connection given and no sqlalchemy.url / -x url=... set")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
