"""Capture upload and datasets (issue 15, part 5): the data for the next model.

Modules: ``store`` (a verified chunk checked, cleaned and stored by digest with its
provenance; exports) and ``service`` (policies per model and cohort, the signed commands that
carry them and collect chunks, the hooks on the diagnostics upload path). The chunk format is
``edge_agent.common.capture_chunk``; the tables are ``fleet_server.registry.tables.capture``.
"""
