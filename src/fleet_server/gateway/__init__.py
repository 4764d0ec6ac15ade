"""The server end of every device topic: subscriptions, parsing, ingest, acks, rate limits and
per-device misbehaviour counters.
"""
