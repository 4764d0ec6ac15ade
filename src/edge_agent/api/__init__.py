"""The agent's local Open Inference Protocol (KServe v2) API: app, codec, limits, metrics, server.

``create_app(service, config)`` builds the Starlette app over an ``InferenceService``;
``serve(app, config)`` runs it with uvicorn on TCP and, optionally, a Unix socket, and drains
gracefully on SIGTERM. ``ApiMetrics`` holds the Prometheus series and the hooks other components
feed. The per-client token bucket is ``edge_agent.common.ratelimit``.
"""

from edge_agent.api.app import create_app
from edge_agent.api.metrics import ApiMetrics
from edge_agent.api.server import ServerHandle, serve

__all__ = ["ApiMetrics", "ServerHandle", "create_app", "serve"]
