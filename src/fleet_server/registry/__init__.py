"""The fleet registry: devices, bundles, desired/reported state, rollouts and telemetry in SQL.

SQLAlchemy 2 over SQLite (default, WAL) or PostgreSQL (by URL, for several workers); the schema is
managed by the Alembic revisions in ``migrations/``. Open with ``store.Registry.open(url)`` and
call ``upgrade()`` before use. Import each name from the module that owns it (this package
re-exports nothing):

- ``store``: ``Registry``, every read and write of devices, bundles, desired state and telemetry;
- ``values``: the records it returns (``DeviceRecord``, ``BundleRecord``, ``TelemetryEntry``, ...);
- ``rollouts``: rollout persistence (``create_rollout``, ``RolloutEvent``, quarantine, ...);
- ``version_history``: one model version's rollouts and quarantine, read together;
- ``orm``, ``tables`` (by area), ``schema``: the tables and the complete metadata;
- ``_catalog``, ``_checks``, ``_engine``, ``_ingest``: the store's internals.

``RegistryError`` and its subclasses live in ``fleet_server.errors``.
"""
