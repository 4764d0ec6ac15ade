"""The admin HTTP API (routes, request bodies) and its typed client."""
