"""The agent's local Open Inference Protocol (KServe v2) API: app, codec, limits, metrics, server.

``app.create_app(service, config)`` builds the Starlette app over an ``InferenceService``;
``server`` runs it with uvicorn on TCP and, optionally, a Unix socket, and drains gracefully on
SIGTERM. ``metrics.ApiMetrics`` holds the Prometheus series and the hooks other components feed.
Requests are decoded by ``decode`` (with ``header_cache``), responses encoded by ``codec``;
``grpc_v2`` is the protocol's gRPC half. The per-client token bucket is
``edge_agent.common.ratelimit``. Import each name from its module; this package re-exports nothing.
"""
