"""Device only: the fleet sync loop and what it drives: deploying signed updates, block downloads,
the telemetry outbox and its uplink.

Modules, each importing only those listed after it:
``loop`` (``SyncAgent``: threads, lifecycle, MQTT handlers, one step) ·
``desired_intake`` (root chain and desired-state documents, persisted once accepted) ·
``reporting`` (the retained reported state, ``status.json``) ·
``telemetry_feed`` (events and periodic reports into the uplink) ·
``deploy`` (apply an accepted state: revert, download, install) · ``download`` (windowed block
requests) · ``transfer_store`` (the resumable partial file) · ``uplink`` (acknowledged batches) ·
``outbox`` (the on-disk telemetry queue) ·
``outbox_sqlite`` (its sqlite3 errors and transactions).
Remote diagnostics, driven by ``loop``: ``commands`` (judge, run and answer signed commands) ·
``support_bundle`` (the bounded tar.gz) · ``upload`` (serve its blocks, the daily budget).
"""
